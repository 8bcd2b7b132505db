"""Noise schedules, inference timesteps and the per-step formulas the samplers and losses share.

Everything here reproduces the diffusers schedulers (LCM, TCD, DDIM, DPM-Solver multistep) number
for number: ``alphas_cumprod`` is built in float32 the way torch builds it, and the timestep
functions repeat each scheduler's ``set_timesteps`` (including its quirks and its errors), so a
model distilled or sampled here behaves exactly as it would under diffusers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Config keys that change the numbers but that lcm-jax does not implement: refuse, never ignore.
_UNSUPPORTED_IF_TRUE = ("thresholding", "rescale_betas_zero_snr")


# ---------------------------------------------------------------------------------------------
# Noise schedule
# ---------------------------------------------------------------------------------------------


def _torch_linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """`torch.linspace(start, end, num, dtype=torch.float32)` bit for bit.

    torch takes a float32 step and fills the first half forwards from `start`, the second half
    backwards from `end`, each product evaluated in double before rounding to float32.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(max(num - 1, 1))
    i = np.arange(num, dtype=np.float64)
    forward = np.float64(start32) + np.float64(step) * i
    backward = np.float64(end32) - np.float64(step) * (num - 1 - i)
    return np.where(i < num // 2, forward, backward).astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the squaredcos_cap_v2 schedule (Nichol & Dhariwal 2021, eq. 17), in double."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float64).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The discrete forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    Field names and defaults follow the diffusers scheduler configs of Stable Diffusion / LCM.
    `timestep_spacing=None` lets each sampler use its diffusers default. Frozen and hashable, so
    it can be a static argument of a jitted function.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    trained_betas: Optional[tuple[float, ...]] = None
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: Optional[str] = None
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES and self.trained_betas is None:
            raise ValueError(
                f"beta_schedule {self.beta_schedule!r} is not supported; choose one of {BETA_SCHEDULES}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}"
            )
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps is "
                    f"{self.num_train_timesteps}; they must agree"
                )

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from a diffusers `scheduler_config.json` dict (any SD-family scheduler class).

        Keys that only concern a particular scheduler's sampling (`_class_name`,
        `original_inference_steps`, `solver_order`, ...) are ignored; keys that would change the
        noise schedule in a way lcm-jax does not implement raise.
        """
        for key in _UNSUPPORTED_IF_TRUE:
            if config.get(key):
                raise ValueError(
                    f"scheduler config sets {key}={config[key]!r}, which lcm-jax does not implement; "
                    f"set it to false or remove it"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names and v is not None}
        return cls(**kwargs)

    @property
    def betas(self) -> np.ndarray:
        """beta_t, float32 (T,), as diffusers builds them."""
        t = self.num_train_timesteps
        if self.trained_betas is not None:
            return np.asarray(self.trained_betas, dtype=np.float32)
        if self.beta_schedule == "linear":
            return _torch_linspace_f32(self.beta_start, self.beta_end, t)
        if self.beta_schedule == "scaled_linear":
            return _torch_linspace_f32(self.beta_start**0.5, self.beta_end**0.5, t) ** 2
        return _cosine_betas(t)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """abar_t = prod_{s<=t} (1 - beta_s), float32 (T,); torch accumulates the product in double."""
        alphas = np.float32(1.0) - self.betas
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)

    @property
    def final_alpha_cumprod(self) -> np.float32:
        """abar used after the last timestep (`set_alpha_to_one` in DDIM/LCM/TCD)."""
        return np.float32(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    def alpha_bar(self, timesteps: np.ndarray) -> np.ndarray:
        """abar at integer timesteps; a negative timestep means 'after the end' (final_alpha_cumprod)."""
        timesteps = np.asarray(timesteps)
        table = self.alphas_cumprod
        return np.where(timesteps >= 0, table[np.clip(timesteps, 0, None)], self.final_alpha_cumprod)


# ---------------------------------------------------------------------------------------------
# Per-step formulas (jnp; used inside jitted samplers and losses)
# ---------------------------------------------------------------------------------------------


def x0_eps_from_alpha_sigma(model_output: jax.Array, x_t: jax.Array, alpha: jax.Array,
                            sigma: jax.Array, prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from a model output, for x_t = alpha x0 + sigma eps and v = alpha eps - sigma x0."""
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output, alpha * model_output + sigma * x_t
    if prediction_type == "sample":
        return model_output, (x_t - alpha * model_output) / sigma
    raise ValueError(
        f"prediction_type {prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")


def predict_x0_eps(model_output: jax.Array, x_t: jax.Array, alpha_bar_t: jax.Array,
                   prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from a model output at noise level abar_t (broadcastable, e.g. (B, 1, 1, 1))."""
    alpha_bar_t = jnp.asarray(alpha_bar_t, jnp.float32)
    return x0_eps_from_alpha_sigma(model_output, x_t, jnp.sqrt(alpha_bar_t), jnp.sqrt(1 - alpha_bar_t),
                                   prediction_type)


def output_for_x0(x0: jax.Array, x_t: jax.Array, alpha_bar_t: jax.Array, prediction_type: str) -> jax.Array:
    """The model output whose predict_x0_eps at (x_t, abar_t) is `x0`: its inverse in x0."""
    alpha_bar_t = jnp.asarray(alpha_bar_t, jnp.float32)
    alpha, sigma = jnp.sqrt(alpha_bar_t), jnp.sqrt(1 - alpha_bar_t)
    eps = (x_t - alpha * x0) / sigma
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(
        f"prediction_type {prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")


def ddim_step(x_t: jax.Array, eps: jax.Array, x0: jax.Array, alpha_bar_t: jax.Array,
              alpha_bar_prev: jax.Array) -> jax.Array:
    """One deterministic DDIM update (Song et al. 2021, eq. 12 with sigma=0): x_prev from (x0, eps).

    `x_t` and `alpha_bar_t` are already folded into (x0, eps); they are accepted so that callers
    read as the ODE step x_t -> x_prev.
    """
    del x_t, alpha_bar_t
    alpha_bar_prev = jnp.asarray(alpha_bar_prev, jnp.float32)
    return jnp.sqrt(alpha_bar_prev) * x0 + jnp.sqrt(1 - alpha_bar_prev) * eps


def scalings_for_boundary_conditions(timestep, sigma_data: float = 0.5,
                                     timestep_scaling: float = 10.0):
    """LCM's (c_skip, c_out) at a discrete timestep, so that f(x, 0) = x (LCM paper, eq. 9).

    Computed in float32 like LCMScheduler given a tensor timestep. A `jax.Array` input gives jnp
    outputs (usable under jit); anything else gives numpy.
    """
    xp = jnp if isinstance(timestep, jax.Array) else np
    scaled = xp.asarray(timestep).astype(xp.float32) * xp.float32(timestep_scaling)
    sigma_data2 = xp.float32(sigma_data) ** 2
    c_skip = sigma_data2 / (scaled**2 + sigma_data2)
    c_out = scaled / xp.sqrt(scaled**2 + sigma_data2)
    return c_skip, c_out


# ---------------------------------------------------------------------------------------------
# Inference timesteps (numpy; computed once, outside jit)
# ---------------------------------------------------------------------------------------------


def _check_custom_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> None:
    for i in range(1, len(timesteps)):
        if timesteps[i] >= timesteps[i - 1]:
            raise ValueError(f"custom timesteps must be in descending order, got {list(timesteps)}")
    if len(timesteps) == 0 or timesteps[-1] < 0:
        raise ValueError(
            f"custom timesteps must be a non-empty list of non-negative ints, got {list(timesteps)}")
    if timesteps[0] >= num_train_timesteps:
        raise ValueError(
            f"custom timesteps must start below num_train_timesteps={num_train_timesteps}, "
            f"got {timesteps[0]}"
        )


def _custom_timesteps(timesteps: Sequence[int], num_train_timesteps: int, strength: float) -> np.ndarray:
    _check_custom_timesteps(timesteps, num_train_timesteps)
    timesteps = np.asarray(timesteps, dtype=np.int64)
    n = len(timesteps)
    t_start = max(n - min(int(n * strength), n), 0)
    return timesteps[t_start:]


def _subsample(origin: np.ndarray, num_inference_steps: int) -> np.ndarray:
    """`num_inference_steps` timesteps evenly spaced in index over `origin`, from the top."""
    origin = origin[::-1].copy()
    idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[idx]


def _check_counts(num_inference_steps: int, num_origin: int, original_steps: int, strength: float,
                  num_train_timesteps: int) -> None:
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} cannot exceed "
            f"num_train_timesteps={num_train_timesteps}"
        )
    if num_origin // num_inference_steps < 1:
        raise ValueError(
            f"original_inference_steps x strength = {original_steps} x {strength} is smaller than "
            f"num_inference_steps={num_inference_steps}; lower num_inference_steps or raise strength"
        )
    if num_inference_steps > original_steps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} cannot exceed original_inference_steps="
            f"{original_steps}: the schedule is a subset of the original one"
        )


def _skipping_origin(original_steps: int, num_train_timesteps: int, strength: float) -> np.ndarray:
    """The distillation schedule of LCM: every k-th train timestep, ending at T - 1."""
    if original_steps > num_train_timesteps:
        raise ValueError(
            f"original_inference_steps={original_steps} cannot exceed "
            f"num_train_timesteps={num_train_timesteps}"
        )
    k = num_train_timesteps // original_steps
    return np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * k - 1


def _check_one_of(num_inference_steps, timesteps) -> None:
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps or timesteps (custom timesteps)")


def lcm_timesteps(num_inference_steps: Optional[int], original_inference_steps: int = 50,
                  num_train_timesteps: int = 1000, strength: float = 1.0,
                  timesteps: Optional[Sequence[int]] = None) -> np.ndarray:
    """LCMScheduler.set_timesteps: `num_inference_steps` picks from the `original_inference_steps`
    skipping schedule the model was distilled on; or pass custom descending `timesteps`."""
    _check_one_of(num_inference_steps, timesteps)
    origin = _skipping_origin(original_inference_steps, num_train_timesteps, strength)
    if timesteps is not None:
        return _custom_timesteps(timesteps, num_train_timesteps, strength)
    _check_counts(num_inference_steps, len(origin), original_inference_steps, strength, num_train_timesteps)
    return _subsample(origin, num_inference_steps)


def tcd_timesteps(num_inference_steps: Optional[int], original_inference_steps: Optional[int] = None,
                  num_train_timesteps: int = 1000, strength: float = 1.0,
                  timesteps: Optional[Sequence[int]] = None,
                  config_original_inference_steps: int = 50) -> np.ndarray:
    """TCDScheduler.set_timesteps, quirk included: with `original_inference_steps=None` it is the
    LCM skipping schedule of `config_original_inference_steps`; an explicit value makes it pick
    from all train timesteps instead (as diffusers does)."""
    _check_one_of(num_inference_steps, timesteps)
    if original_inference_steps is None:
        original_steps = config_original_inference_steps
        origin = _skipping_origin(original_steps, num_train_timesteps, strength)
    else:
        original_steps = original_inference_steps
        origin = np.arange(0, int(num_train_timesteps * strength), dtype=np.int64)
    if timesteps is not None:
        return _custom_timesteps(timesteps, num_train_timesteps, strength)
    _check_counts(num_inference_steps, len(origin), original_steps, strength, num_train_timesteps)
    return _subsample(origin, num_inference_steps)


def pcm_edges(num_ddim_timesteps: int, phases: int) -> np.ndarray:
    """PCM's phase edges (Wang et al. 2024) as indices into the N-step skipping grid extended with
    t = 0 at index 0 (index i >= 1 is t = i (T // N) - 1): floor(i N / M) for i = 0..M."""
    if not 1 <= phases <= num_ddim_timesteps:
        raise ValueError(f"pcm_phases={phases}: must be in [1, num_ddim_timesteps={num_ddim_timesteps}]")
    return (np.arange(phases + 1) * num_ddim_timesteps) // phases


def pcm_timesteps(num_train_timesteps: int, num_ddim_timesteps: int, phases: int) -> np.ndarray:
    """PCM's deterministic sampler timesteps, descending: the phases' upper edges (t_N first). The
    TCD sampler at gamma = 0 on them steps exactly from edge to edge, and from the last to 0."""
    upper = pcm_edges(num_ddim_timesteps, phases)[1:][::-1]
    return (upper * (num_train_timesteps // num_ddim_timesteps) - 1).astype(np.int64)


def _check_spacing(timestep_spacing: str) -> None:
    if timestep_spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(
            f"timestep_spacing {timestep_spacing!r} is not supported; "
            f"choose 'leading', 'trailing' or 'linspace'"
        )


def ddim_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                   timestep_spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
    """DDIMScheduler.set_timesteps (int64, descending)."""
    _check_spacing(timestep_spacing)
    n, t = num_inference_steps, num_train_timesteps
    if n > t:
        raise ValueError(f"num_inference_steps={n} cannot exceed num_train_timesteps={t}")
    if timestep_spacing == "linspace":
        return np.linspace(0, t - 1, n).round()[::-1].astype(np.int64)
    if timestep_spacing == "leading":
        return (np.arange(0, n) * (t // n)).round()[::-1].astype(np.int64) + steps_offset
    return np.round(np.arange(t, 0, -t / n)).astype(np.int64) - 1


def dpm_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                  timestep_spacing: str = "linspace", steps_offset: int = 0) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps with its default sigmas (int64, descending)."""
    _check_spacing(timestep_spacing)
    n, t = num_inference_steps, num_train_timesteps
    if timestep_spacing == "linspace":
        return np.linspace(0, t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if timestep_spacing == "leading":
        return (np.arange(0, n + 1) * (t // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    return np.arange(t, 0, -t / n).round().astype(np.int64) - 1


FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def _train_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """sigma = sqrt((1 - abar) / abar) at every train timestep, float32 as diffusers."""
    ac = schedule.alphas_cumprod
    return np.sqrt((np.float32(1) - ac) / ac)


def karras_sigmas(schedule: NoiseSchedule, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022, eq. 5) sigmas between the schedule's extremes, descending (float64)."""
    train = _train_sigmas(schedule)
    lo, hi = float(train[0]) ** (1 / rho), float(train[-1]) ** (1 / rho)
    return (hi + np.linspace(0, 1, num_inference_steps) * (lo - hi)) ** rho


def karras_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> np.ndarray:
    """The timesteps of the Karras sigmas: log-sigma interpolated on the train grid, rounded
    (except for squaredcos_cap_v2), as DPMSolverMultistepScheduler with use_karras_sigmas."""
    log_train = np.log(_train_sigmas(schedule))
    log_sigma = np.log(np.maximum(karras_sigmas(schedule, num_inference_steps), 1e-10))
    dists = log_sigma[None, :] - log_train[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_train) - 2)
    w = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0, 1)
    t = (1 - w) * low + w * (low + 1)
    return (t if schedule.beta_schedule == "squaredcos_cap_v2" else t.round()).astype(np.int64)


def dpm_sigmas(schedule: NoiseSchedule, timesteps: np.ndarray, final_sigmas_type: str = "zero",
               use_karras_sigmas: bool = False, num_inference_steps: Optional[int] = None) -> np.ndarray:
    """DPM-Solver's sigmas for `timesteps`, then the final sigma (0, or the smallest train sigma
    with 'sigma_min'), float32. Karras sigmas are those of the whole `num_inference_steps`
    schedule (default len(timesteps)), of which `timesteps` may be the tail (img2img)."""
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(f"final_sigmas_type {final_sigmas_type!r} is not supported; choose one of "
                         f"{FINAL_SIGMAS_TYPES}")
    timesteps = np.asarray(timesteps)
    train = _train_sigmas(schedule)
    if use_karras_sigmas:
        sigmas = karras_sigmas(schedule, num_inference_steps or len(timesteps))[-len(timesteps):]
    else:
        sigmas = train[timesteps]
    last = train[0] if final_sigmas_type == "sigma_min" else 0.0
    return np.concatenate([sigmas, [last]]).astype(np.float32)


def check_strength(strength: float) -> None:
    """img2img/inpainting strength: the fraction of the noise schedule run, in (0, 1]."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")


def img2img_timesteps(timesteps: np.ndarray, strength: float) -> np.ndarray:
    """The tail of a teacher sampler's schedule that img2img runs from a noised image: the last
    int(len * strength) timesteps (diffusers' get_timesteps, first-order schedulers)."""
    check_strength(strength)
    n = len(timesteps)
    keep = min(int(n * strength), n)
    if keep == 0:
        raise ValueError(f"strength={strength} x num_inference_steps={n} leaves no step to run; "
                         f"raise strength or num_inference_steps")
    return np.asarray(timesteps)[n - keep:]


def sampler_timesteps(sampler: str, num_inference_steps: int, scheduler_config: dict,
                      num_train_timesteps: int, original_inference_steps: Optional[int] = None,
                      timesteps: Optional[Sequence[int]] = None, strength: float = 1.0) -> np.ndarray:
    """The timesteps a pipeline's sampler runs, as diffusers' schedulers pick them from the
    pipeline's scheduler config. LCM picks from the skipping-step grid of
    `original_inference_steps` (None: the config's, else 50, as diffusers). strength < 1
    (img2img) limits LCM/TCD to that part of the grid (their set_timesteps(strength=...)) and
    keeps the tail of the DDIM/DPM schedule (`img2img_timesteps`)."""
    T, sc = num_train_timesteps, scheduler_config
    if original_inference_steps is None:
        original_inference_steps = int(sc.get("original_inference_steps", 50))
    if sampler == "lcm":
        return lcm_timesteps(None if timesteps else num_inference_steps, original_inference_steps, T,
                             strength=strength, timesteps=timesteps)
    if sampler == "tcd":
        # TCDPipeline's default: pick from the model's 50-step grid (an explicit
        # original_inference_steps would switch TCD to all T training steps).
        return tcd_timesteps(None if timesteps else num_inference_steps, None, T, strength=strength,
                             timesteps=timesteps)
    if sampler == "ddim":
        ts = ddim_timesteps(num_inference_steps, T, timestep_spacing=sc.get("timestep_spacing", "leading"),
                            steps_offset=sc.get("steps_offset", 0))
    elif sc.get("use_karras_sigmas"):
        ts = karras_timesteps(NoiseSchedule.from_scheduler_config(sc), num_inference_steps)
    else:
        ts = dpm_timesteps(num_inference_steps, T, timestep_spacing=sc.get("timestep_spacing", "linspace"),
                           steps_offset=sc.get("steps_offset", 0))
    return ts if strength == 1.0 else img2img_timesteps(ts, strength)
