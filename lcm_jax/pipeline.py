"""LCMPipeline: tokenizer + text encoder + jitted few-step sampler + VAE decode.

    pipe = LCMPipeline.from_pretrained("path/to/diffusers/pipeline")
    images = pipe("a red circle", num_inference_steps=4, guidance_scale=8.5)  # (B,H,W,3) in [0,1]

A UNet with `time_cond_proj_dim` (a distilled LCM) is conditioned on w = guidance_scale - 1 and
runs without classifier-free guidance, as diffusers' LatentConsistencyModelPipeline; a plain UNet
(a teacher, or SD + LCM-LoRA) uses classifier-free guidance when guidance_scale > 1, as
StableDiffusionPipeline. An SDXL folder (text_encoder_2/, tokenizer_2/) is conditioned as
StableDiffusionXLPipeline: both encoders' penultimate states, the pooled text embeds and the
(height, width, 0, 0, height, width) micro-conditioning. The whole sample (all UNet steps and the
VAE decode) is one XLA program, compiled once per (sampler, steps, batch, size) and kept in XLA's
persistent compilation cache; with LCM_JAX_STORE_EXECUTABLES=1 the compiled program itself is
stored (`lcm_jax.executables`), so a new process loads it without tracing or compiling.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import sampling, schedules
from lcm_jax.convert.common import WeightsError
from lcm_jax.executables import ExecutableCache

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "lcm_jax", "xla")
SAMPLERS = ("lcm", "tcd", "ddim", "dpm")


def enable_compilation_cache(path: Optional[str] = None) -> str:
    """Persistent XLA cache so a second process reuses compiled samplers (env LCM_JAX_CACHE_DIR)."""
    path = path or os.environ.get("LCM_JAX_CACHE_DIR", DEFAULT_CACHE_DIR)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@dataclasses.dataclass
class Components:
    """The loaded parts of a diffusers pipeline folder."""
    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoder: Any
    text_params: Any
    tokenizer: Any
    schedule: schedules.NoiseSchedule
    scheduler_config: dict
    text_encoder_2: Any = None      # SDXL's second CLIP encoder (with projection); None for SD 1/2
    text_params_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: CFG without a negative prompt uses zeros

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def load_components(folder: str, dtype=jnp.float32, variant: Optional[str] = None,
                    with_unet: bool = True) -> Components:
    """Loads unet/, vae/, text_encoder/, tokenizer/ and scheduler/ of a diffusers pipeline folder
    (and text_encoder_2/, tokenizer_2/ when model_index.json names them: SDXL).

    with_unet=False loads everything but the UNet (a teacher trained from scratch on top of an
    existing VAE and text encoder); the unet fields are then None.
    """
    from lcm_jax.convert.clip import load_text_encoder, load_tokenizer
    from lcm_jax.convert.unet import load_unet
    from lcm_jax.convert.vae import load_vae

    index = os.path.join(folder, "model_index.json")
    if not os.path.exists(index):
        raise WeightsError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json "
                           "(expected subfolders unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    with open(index) as f:
        parts = json.load(f)
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    try:
        with open(sched_path) as f:
            sched_cfg = json.load(f)
    except FileNotFoundError as e:
        raise WeightsError(f"{sched_path} not found: a pipeline folder needs scheduler/") from e
    unet, up = (load_unet(os.path.join(folder, "unet"), dtype=dtype, variant=variant)
                if with_unet else (None, None))
    vae, vp = load_vae(os.path.join(folder, "vae"), dtype=dtype, variant=variant)
    te, tp = load_text_encoder(os.path.join(folder, "text_encoder"), dtype=dtype, variant=variant)
    tok = load_tokenizer(os.path.join(folder, "tokenizer"))
    sdxl = {}
    if all((parts.get(k) or [None])[0] for k in ("text_encoder_2", "tokenizer_2")):
        te2, tp2 = load_text_encoder(os.path.join(folder, "text_encoder_2"), dtype=dtype, variant=variant)
        sdxl = dict(text_encoder_2=te2, text_params_2=tp2,
                    tokenizer_2=load_tokenizer(os.path.join(folder, "tokenizer_2")),
                    force_zeros_for_empty_prompt=bool(parts.get("force_zeros_for_empty_prompt", True)))
    return Components(unet, up, vae, vp, te, tp, tok,
                      schedules.NoiseSchedule.from_scheduler_config(sched_cfg), sched_cfg, **sdxl)


def sdxl_text_embeddings(te1, params1, te2, params2, ids1: jax.Array,
                         ids2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SDXL's prompt conditioning from both encoders' token ids: their penultimate hidden states
    concatenated on the feature axis (B, L, D1 + D2), and the second encoder's projected pooled
    output (B, P) that feeds the UNet's add_embedding."""
    h1 = te1.apply({"params": params1}, ids1).hidden_states[-2]
    out2 = te2.apply({"params": params2}, ids2)
    return jnp.concatenate([h1, out2.hidden_states[-2]], axis=-1), out2.text_embeds


def sdxl_time_ids(batch: int, height: int, width: int) -> np.ndarray:
    """SDXL micro-conditioning (original size, crop top-left, target size) = (h, w, 0, 0, h, w)."""
    return np.tile(np.asarray([height, width, 0, 0, height, width], np.float32), (batch, 1))


def _check_call(num_inference_steps: int, guidance_scale: float, height: int, width: int,
                sampler: str) -> None:
    if int(num_inference_steps) < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 8 (the VAE's factor), "
                         f"got {height}x{width}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} unknown; choose one of {SAMPLERS}")


class LCMPipeline:
    """Text-to-image with a latent consistency model (or its teacher, for baselines)."""

    def __init__(self, components: Components, cache_dir: Optional[str] = None):
        # Weights become device arrays once, here (which reads the memory-mapped files): a call
        # then passes device buffers instead of converting host arrays every time.
        weights = ("unet_params", "vae_params", "text_params", "text_params_2")
        self.c = components = dataclasses.replace(components, **{
            k: jax.device_put(getattr(components, k)) for k in weights
            if getattr(components, k) is not None})
        self.unet_params = components.unet_params
        self.cache_dir = enable_compilation_cache(cache_dir)
        self._compiled: dict = {}
        # Opt-in (LCM_JAX_STORE_EXECUTABLES=1): compiled samplers on disk, so a new process skips
        # trace, lowering and compile. Off by default: on XLA:CPU, loading a stored executable
        # into a process that has already compiled a similar one can fail at run time
        # ("Function ... not found"); a fresh process is fine.
        store = os.environ.get("LCM_JAX_STORE_EXECUTABLES", "0") == "1"
        self._executables = ExecutableCache(
            os.path.join(self.cache_dir, "executables") if store else None)

    @classmethod
    def from_pretrained(cls, folder: str, dtype=jnp.float32, variant: Optional[str] = None,
                        cache_dir: Optional[str] = None) -> "LCMPipeline":
        return cls(load_components(folder, dtype=dtype, variant=variant), cache_dir=cache_dir)

    # ----------------------------------------------------------------------------- LoRA
    def load_lora_weights(self, path: str, fuse: bool = True, scale: float = 1.0) -> None:
        """Adds LCM-LoRA weights (PEFT/diffusers or kohya safetensors) to the UNet.

        fuse=True merges them into the UNet's kernels once; fuse=False keeps the factors and
        merges inside the jitted sampler (same numbers; the base weights stay untouched).
        """
        from lcm_jax.convert.lora import load_lora
        from lcm_jax.models import lora as lora_lib

        factors, alpha_scale = load_lora(path, self.c.unet_params)
        merged_scale = scale * alpha_scale
        if fuse:
            self.unet_params = jax.jit(lora_lib.merge, static_argnums=2)(self.unet_params, factors, merged_scale)
            self._lora = None
        else:
            self._lora = (factors, merged_scale)
        self._compiled.clear()

    def unet_call_params(self):
        lora = getattr(self, "_lora", None)
        return (self.unet_params, None) if lora is None else (self.unet_params, lora[0])

    # ----------------------------------------------------------------------------- text
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[jax.Array, Optional[jax.Array]]:
        """(embeddings (B, 77, D) the UNet attends to, pooled (B, P) or None); warns about
        truncated prompts. SD 1.x/2.x: CLIP's last hidden state and no pooled embeds; SDXL: see
        `sdxl_text_embeddings`."""
        ids = [self._token_ids(tok, prompts) for tok in (self.c.tokenizer, self.c.tokenizer_2)
               if tok is not None]
        params = (self.c.text_params, self.c.text_params_2)
        fingerprint = repr(("text", self.c.text_encoder, self.c.text_encoder_2))
        return self._executables(self._text_fn, fingerprint, params, *ids)

    @staticmethod
    def _token_ids(tokenizer, prompts: Sequence[str]) -> jax.Array:
        from lcm_jax.convert.clip import encode_prompt_ids

        ids, truncated = encode_prompt_ids(tokenizer, list(prompts))
        for p in truncated:
            warnings.warn(f"prompt truncated to {ids.shape[1]} tokens (CLIP's limit): {p!r}")
        return jnp.asarray(ids)

    @functools.cached_property
    def _text_fn(self):
        te, te2 = self.c.text_encoder, self.c.text_encoder_2
        if te2 is None:
            return jax.jit(lambda p, ids: (te.apply({"params": p[0]}, ids).last_hidden_state, None))
        return jax.jit(lambda p, ids1, ids2: sdxl_text_embeddings(te, p[0], te2, p[1], ids1, ids2))

    def _negative_prompt(self, negative_prompt, text: jax.Array, pooled: Optional[jax.Array]):
        """The unconditional side of CFG: the encoded negative prompt ("" when none), or zeros
        when there is none and the pipeline sets force_zeros_for_empty_prompt (SDXL)."""
        b = text.shape[0]
        if negative_prompt is None and self.c.force_zeros_for_empty_prompt:
            return jnp.zeros_like(text), (None if pooled is None else jnp.zeros_like(pooled))
        neg = negative_prompt if negative_prompt is not None else ""
        return self.encode_prompt([neg] * b if isinstance(neg, str) else list(neg))

    # ----------------------------------------------------------------------------- sampling
    def timesteps(self, sampler: str, num_inference_steps: int,
                  original_inference_steps: Optional[int] = None,
                  timesteps: Optional[Sequence[int]] = None) -> np.ndarray:
        """The sampler's timesteps. LCM picks from the skipping-step grid of
        `original_inference_steps` (None: the scheduler config's, else 50, as diffusers)."""
        T = self.c.schedule.num_train_timesteps
        sc = self.c.scheduler_config
        if original_inference_steps is None:
            original_inference_steps = int(sc.get("original_inference_steps", 50))
        if sampler == "lcm":
            return schedules.lcm_timesteps(None if timesteps else num_inference_steps,
                                           original_inference_steps, T, timesteps=timesteps)
        if sampler == "tcd":
            # TCDPipeline's default: pick from the model's 50-step grid (an explicit
            # original_inference_steps would switch TCD to all T training steps).
            return schedules.tcd_timesteps(None if timesteps else num_inference_steps, None, T,
                                           timesteps=timesteps)
        if sampler == "ddim":
            return schedules.ddim_timesteps(num_inference_steps, T,
                                            timestep_spacing=sc.get("timestep_spacing", "leading"),
                                            steps_offset=sc.get("steps_offset", 0))
        return schedules.dpm_timesteps(num_inference_steps, T,
                                       timestep_spacing=sc.get("timestep_spacing", "linspace"),
                                       steps_offset=sc.get("steps_offset", 0))

    @functools.cached_property
    def _jitted_parts(self):
        """The UNet call and the VAE decode compiled on their own (compile='model')."""
        return jax.jit(self._apply_unet), jax.jit(functools.partial(decode_latents, self.c.vae))

    def _apply_unet(self, params, x, t, text, t_cond, added=None):
        return self.c.unet.apply({"params": params}, x, t, text, timestep_cond=t_cond,
                                 added_cond_kwargs=added)

    def _generate_fn(self, sampler: str, ts: tuple, use_cfg: bool, gamma: float, compile: str):
        schedule = self.c.schedule
        w_dim = self.c.unet.config.time_cond_proj_dim
        ts = np.asarray(ts)
        eager = compile != "whole"
        if compile == "model":
            apply_unet, decode = self._jitted_parts
        else:
            apply_unet, decode = self._apply_unet, functools.partial(decode_latents, self.c.vae)

        def generate(unet_params, vae_params, lora, cond, latents, w, rng, noises):
            from lcm_jax.models import layers
            from lcm_jax.models import lora as lora_lib

            if lora is not None:
                unet_params = lora_lib.merge(unet_params, lora[0], lora[1])
            b = latents.shape[0]
            text, uncond, added, uncond_added = cond
            t_cond = None if w_dim is None else layers.guidance_scale_embedding(
                jnp.full((b,), w - 1.0), w_dim)

            def model_fn(x, t):
                if use_cfg:  # one batch of 2B: unconditional rows first, as diffusers
                    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]),
                                        (x, t, uncond, uncond_added), (x, t, text, added))
                    out = apply_unet(unet_params, *both[:3], None, both[3])
                    out_u, out_c = jnp.split(out, 2)
                    return out_u + w * (out_c - out_u)
                return apply_unet(unet_params, x, t, text, t_cond, added)

            if sampler == "lcm":
                z = sampling.lcm_sample(model_fn, latents, schedule, ts, rng, noises=noises, debug=eager)
            elif sampler == "tcd":
                z = sampling.tcd_sample(model_fn, latents, schedule, ts, rng, gamma=gamma,
                                        noises=noises, debug=eager)
            elif sampler == "ddim":
                z = sampling.ddim_sample(model_fn, latents, schedule, ts, debug=eager)
            else:
                z = sampling.dpm_solver_pp_sample(model_fn, latents, schedule, ts, debug=eager)
            return decode(vae_params, z)

        return jax.jit(generate) if compile == "whole" else generate

    def __call__(self, prompt: Union[str, Sequence[str]], num_inference_steps: int = 4,
                 guidance_scale: float = 8.5, height: int = 512, width: int = 512,
                 latents: Optional[np.ndarray] = None, seed: int = 0,
                 original_inference_steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
                 negative_prompt: Optional[Union[str, Sequence[str]]] = None,
                 sampler: str = "lcm", gamma: float = 0.3, noises: Optional[np.ndarray] = None,
                 debug: bool = False, compile: str = "whole") -> np.ndarray:
        """Images (B, H, W, 3) float32 in [0, 1]. `latents` (NHWC) replace the seeded noise;
        `noises` (steps, B, h, w, c) replace the re-noising draws of LCM/TCD (for comparisons).

        compile: 'whole' (the sample is one XLA program, compiled per sampler and step count),
        'model' (only the UNet call and the VAE decode are compiled, once for every sampler and
        step count: for sweeps), or 'none' (eager; also `debug=True`).
        """
        _check_call(num_inference_steps, guidance_scale, height, width, sampler)
        compile = "none" if debug else compile
        if compile not in ("whole", "model", "none"):
            raise ValueError(f"compile must be 'whole', 'model' or 'none', got {compile!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        text, pooled = self.encode_prompt(prompts)
        b = len(prompts)
        use_cfg = self.c.unet.config.time_cond_proj_dim is None and guidance_scale > 1.0
        uncond = uncond_pooled = added = uncond_added = None
        if use_cfg:
            uncond, uncond_pooled = self._negative_prompt(negative_prompt, text, pooled)
        if pooled is not None:
            time_ids = jnp.asarray(sdxl_time_ids(b, height, width))
            added = {"text_embeds": pooled, "time_ids": time_ids}
            if use_cfg:
                uncond_added = {"text_embeds": uncond_pooled, "time_ids": time_ids}
        shape = (b, height // 8, width // 8, self.c.unet.config.in_channels)
        rng = jax.random.PRNGKey(seed)
        rng_lat, rng_steps = jax.random.split(rng)
        if latents is None:
            latents = jax.random.normal(rng_lat, shape, jnp.float32)
        elif tuple(np.shape(latents)) != shape:
            raise ValueError(f"latents have shape {tuple(np.shape(latents))}, expected {shape} "
                             "(NHWC, height/8 x width/8)")
        ts = self.timesteps(sampler, num_inference_steps, original_inference_steps, timesteps)
        key = (sampler, tuple(int(t) for t in ts), use_cfg, gamma, compile, noises is None)
        if key not in self._compiled:
            self._compiled[key] = self._generate_fn(sampler, key[1], use_cfg, gamma, compile)
        params, lora = self.unet_call_params()
        lora_arg = None if lora is None else (lora, self._lora[1])
        (params, vae_params, lora_arg), cond, latents = self._place(
            (params, self.c.vae_params, lora_arg), (text, uncond, added, uncond_added),
            jnp.asarray(latents, jnp.float32))
        args = (params, vae_params, lora_arg, cond, latents, jnp.float32(guidance_scale), rng_steps,
                None if noises is None else jnp.asarray(noises, jnp.float32))
        if compile == "whole":
            from lcm_jax.models import layers
            fingerprint = repr(("sample", self.c.unet, self.c.vae, self.c.schedule, key,
                                layers.attention_implementation()))
            images = self._executables(self._compiled[key], fingerprint, *args)
        else:
            images = self._compiled[key](*args)
        return np.asarray(jax.device_get(images), np.float32)

    def _place(self, weights, cond, latents):
        """Splits the batch (latents and the conditioning pytree) over every local device ('data'
        axis) when it divides evenly; weights are replicated. On one device this changes nothing."""
        n = jax.local_device_count()
        if n == 1 or latents.shape[0] % n:
            return weights, cond, latents
        from lcm_jax import sharding
        mesh = sharding.make_mesh(n, 1, jax.local_devices())
        rep, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        weights = jax.device_put(weights, rep)
        cond, latents = jax.device_put((cond, latents), batch)
        return weights, cond, latents


def decode_latents(vae, vae_params, z: jax.Array) -> jax.Array:
    """Scaled latents -> images in [0, 1] (undo scaling/shift, decode, (x + 1) / 2, clip)."""
    z = z / vae.scaling_factor + (vae.shift_factor or 0.0)
    image = vae.apply({"params": vae_params}, z, method="decode")
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def pipeline_from_training(config, models, state) -> "LCMPipeline":
    """An LCMPipeline over a training run's student: the EMA target for LCD/LCF (the network the
    LCM recipe keeps), the LoRA-merged teacher for LCM-LoRA, the params for diffusion."""
    if config.method == "lcm_lora":
        from lcm_jax.models import lora as lora_lib
        params = lora_lib.merge(models.frozen["teacher"], state.params,
                                config.lora.alpha / config.lora.rank)
    else:
        params = state.target_params if state.target_params is not None else state.params
    # The LCM sampler picks its steps from the grid the student was distilled on (N DDIM steps).
    grid = {} if config.method == "diffusion" else {
        "original_inference_steps": int(config.loss.num_ddim_timesteps)}
    comps = Components(models.unet, params, models.vae, models.frozen["vae"], models.text_encoder,
                       models.frozen["text_encoder"], models.tokenizer, models.schedule, grid,
                       models.text_encoder_2, models.frozen.get("text_encoder_2"), models.tokenizer_2,
                       force_zeros_for_empty_prompt=models.text_encoder_2 is not None)
    return LCMPipeline(comps)


def training_sample_grid(config, models, workdir: str, state, step: int) -> str:
    """Writes samples/step_XXXXXX.png: the config's sample prompts at 1, 2 and 4 LCM steps."""
    from lcm_jax.evaluate import save_grid

    pipe = pipeline_from_training(config, models, state)
    size = config.data.resolution
    guidance = 1.0 if config.method == "lcm_lora" else 1.0 + (config.loss.w_min + config.loss.w_max) / 2
    rows = [pipe(list(config.sample_prompts), num_inference_steps=n, guidance_scale=guidance,
                 height=size, width=size, seed=0) for n in (1, 2, 4)]
    path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
    save_grid(np.concatenate(rows), path, nrow=len(config.sample_prompts),
              labels=["1 step", "2 steps", "4 steps"])
    return path
