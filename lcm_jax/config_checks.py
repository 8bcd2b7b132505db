"""A training config checked before anything is compiled or written (`check_config`): every field's
range (lcm_jax/defaults.py lists them), the batch's divisibility over processes, devices and
gradient-accumulation steps, method and data-source names, and the paths that must exist. Every
problem is one clause `field=value: what is allowed`; all of a config's problems are raised
together in one ConfigError."""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Optional

from lcm_jax import fs
from lcm_jax.errors import ConfigError

Check = Callable[[Any], Optional[str]]  # value -> what is allowed when the value is not, else None

DTYPES = ("float32", "bfloat16", "float16")
PATH_SOURCES = ("folder", "webdataset", "parquet", "array_record")  # read data.path


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int) -> Check:
    """An integer >= lo."""
    return lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= lo \
        else f"must be an integer >= {lo}"


def number(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A finite number in the interval lo..hi (open ends as asked)."""
    def check(v):
        ok = _is_number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if ok:
            return None
        if hi == math.inf:
            return f"must be a finite number {'>' if lo_open else '>='} {lo:g}"
        return f"must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return check


def one_of(*names: str) -> Check:
    return lambda v: None if v in names else f"choose one of {names}"


POSITIVE = number(0.0, lo_open=True)
NON_NEGATIVE = number(0.0)
PROBABILITY = number(0.0, 1.0)
DECAY = number(0.0, 1.0, hi_open=True)   # EMA decays and Adam's betas: [0, 1)

FIELDS: dict[str, Check] = {
    "seed": integer(0), "total_steps": integer(1), "batch_size": integer(1),
    "log_every": integer(1), "checkpoint_every": integer(1), "keep_checkpoints": integer(1),
    "eval_every": integer(0), "sample_every": integer(0), "eval_endpoint_batch": integer(1),
    "diffusion_ema_decay": DECAY, "eval_ema_decay": DECAY,
    "model.time_cond_proj_dim": integer(0), "model.w_embedding_init": one_of("zeros", "uniform"),
    "model.prediction_type": one_of("epsilon", "v_prediction"),
    "model.compute_dtype": one_of(*DTYPES), "model.param_dtype": one_of(*DTYPES),
    "model.teacher_dtype": one_of(*DTYPES), "model.init_seed": integer(0),
    "loss.num_ddim_timesteps": integer(1), "loss.w_min": NON_NEGATIVE, "loss.w_max": NON_NEGATIVE,
    "loss.loss_type": one_of("l2", "huber"), "loss.huber_c": POSITIVE, "loss.sigma_data": POSITIVE,
    "loss.timestep_scaling": POSITIVE, "loss.timestep_weighting": one_of("uniform", "snr"),
    "loss.timestep_sampling": one_of("uniform", "sampler"),
    "loss.student_prediction": one_of("teacher", "epsilon", "x0", "v"), "loss.pcm_phases": integer(1),
    "loss.coarse_ddim_timesteps": integer(0), "loss.coarse_fraction": PROBABILITY,
    "loss.lora_target_ema": lambda v: None if isinstance(v, bool) else "must be true or false",
    "loss.ema_decay": DECAY, "loss.solver": one_of("ddim"), "loss.lcf_w": NON_NEGATIVE,
    "lora.rank": integer(1), "lora.alpha": POSITIVE,
    "optim.learning_rate": POSITIVE, "optim.schedule": one_of("constant", "cosine"),
    "optim.warmup_steps": integer(0), "optim.b1": DECAY, "optim.b2": DECAY, "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE, "optim.grad_clip": NON_NEGATIVE,
    "optim.grad_accum_steps": integer(1),
    "mesh.data": lambda v: None if v == -1 or (isinstance(v, int) and v >= 1) else "must be -1 (all "
                           "devices not used by fsdp) or an integer >= 1",
    "mesh.fsdp": integer(1),
    "data.min_size": integer(0),
    "data.max_aspect_ratio": lambda v: None if v == 0 or (_is_number(v) and v >= 1) else
                                       "must be 0 (off) or a number >= 1",
    "data.crop": one_of("center", "random"), "data.flip_prob": PROBABILITY,
    "data.num_workers": integer(0), "data.prefetch_batches": integer(1),
    "data.resolution": integer(8), "data.latent_size": integer(1), "data.text_len": integer(1),
    "data.caption_dropout": PROBABILITY, "data.num_examples": integer(1),
    "data.cache_size": integer(0),
}


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def field_problems(config) -> list[str]:
    """`field=value: allowed` for every field of FIELDS out of its range."""
    out = []
    for name, check in FIELDS.items():
        value = _get(config, name)
        if value is not _MISSING and (why := check(value)) is not None:
            out.append(f"{name}={value!r}: {why}")
    return out


def division_problems(config, num_processes: int, num_devices: int) -> list[str]:
    """The global batch over processes, devices and micro-batches; the mesh over the devices;
    the guidance range."""
    out, b = [], config.batch_size
    if not isinstance(b, int) or b < 1:
        return out  # field_problems names it
    accum = config.optim.grad_accum_steps
    for n, what in ((num_processes, f"the {num_processes} processes"),
                    (num_devices, f"the {num_devices} devices"),
                    (accum, f"optim.grad_accum_steps={accum} (equal micro-batches)")):
        if isinstance(n, int) and n >= 1 and b % n:
            out.append(f"batch_size={b}: must be divisible by {what}")
    data, fsdp = config.mesh.data, config.mesh.fsdp
    if isinstance(fsdp, int) and fsdp >= 1 and isinstance(data, int):
        if (data == -1 and num_devices % fsdp) or (data >= 1 and data * fsdp != num_devices):
            out.append(f"mesh.data={data}, mesh.fsdp={fsdp}: the mesh must cover the {num_devices} "
                       "devices (data x fsdp, data=-1 for the rest)")
    if _is_number(config.loss.w_min) and _is_number(config.loss.w_max) and config.loss.w_min > config.loss.w_max:
        out.append(f"loss.w_min={config.loss.w_min!r}, loss.w_max={config.loss.w_max!r}: w_min must be <= w_max")
    n, phases = config.loss.num_ddim_timesteps, config.loss.get("pcm_phases", 1)
    if config.method == "pcm" and isinstance(phases, int) and isinstance(n, int) and phases > n:
        out.append(f"loss.pcm_phases={phases}: at most loss.num_ddim_timesteps={n} phases")
    if config.method == "pcm" and config.eval_endpoint_timesteps:
        out.append(f"eval_endpoint_timesteps={tuple(config.eval_endpoint_timesteps)}: the one-step "
                   "endpoint error does not apply to method 'pcm' (it steps one phase at a time); set ()")
    if config.sample_every and not list(config.sample_prompts):
        out.append(f"sample_prompts=[]: sample_every={config.sample_every} needs at least one prompt")
    return out


def name_problems(config) -> list[str]:
    """config.method and config.data.source against the known ones; data.filters' syntax."""
    from lcm_jax.data import source_names
    from lcm_jax.data.filters import parse_filters
    from lcm_jax.training.state import METHODS

    out = []
    if config.method not in METHODS:
        out.append(f"method={config.method!r}: choose one of {METHODS}")
    if config.data.source not in source_names():
        out.append(f"data.source={config.data.source!r}: choose one of {source_names()} (a world's "
                   "source is registered by importing its package, e.g. lcm_jax.worlds.shapes)")
    try:
        parse_filters(config.data.filters)
    except ValueError as e:
        out.append(str(e).splitlines()[0])
    return out


def path_problems(config) -> list[str]:
    """Folders the run reads: the teacher or components pipeline folder, the image folder, the
    on-disk latent cache (local paths and gs:// alike)."""
    from lcm_jax.data.disk_cache import MANIFEST

    out, mc, data = [], config.model, config.data
    for name in ("teacher", "components"):
        folder = mc[name]
        if folder and not fs.exists(fs.join(folder, "model_index.json")):
            out.append(f"model.{name}={folder!r}: not a diffusers pipeline folder (no model_index.json)")
    init = mc.get("student_init", "")
    if init and not fs.exists(fs.join(init, "config.json")):
        out.append(f"model.student_init={init!r}: not a training workdir (no config.json); name the "
                   "--workdir of the run the student starts from")
    if not mc.teacher and not mc.unet:
        out.append("model.teacher='': with no teacher folder, model.unet must give a UNet config")
    if data.cache_dir:
        if not fs.exists(fs.join(data.cache_dir, MANIFEST)):
            out.append(f"data.cache_dir={data.cache_dir!r}: not a latent cache (no {MANIFEST}; "
                       "make one with `lcm-jax cache`)")
    elif data.source in PATH_SOURCES and not data.path:
        out.append(f"data.path='': data.source={data.source!r} reads its examples from data.path; "
                   "set --config.data.path")
    elif data.source == "folder" and not fs.exists(fs.join(data.path, "metadata.jsonl")):
        what = "does not exist" if not fs.exists(data.path) else "has no metadata.jsonl"
        out.append(f"data.path={data.path!r}: {what}; an image folder needs metadata.jsonl with one "
                   '{"file_name": ..., "text": ...} line per image')
    return out


ENDPOINT_METHODS = ("lcd", "lcm_lora", "tcd")  # training.step.make_eval_endpoint


def _num_train_timesteps(config) -> int:
    """T of the teacher's scheduler config (diffusers' default 1000 without a readable one)."""
    path = fs.join(config.model.teacher, "scheduler", "scheduler_config.json") if config.model.teacher else ""
    try:
        with fs.open(path) as f:
            return int(json.load(f).get("num_train_timesteps", 1000))
    except (OSError, ValueError):
        return 1000


def endpoint_problems(config) -> list[str]:
    """eval_endpoint_timesteps on the skipping grid t_n, where the teacher's chain starts."""
    from lcm_jax.losses.consistency import ddim_grid

    starts, n = tuple(config.get("eval_endpoint_timesteps", ()) or ()), config.loss.num_ddim_timesteps
    if not starts or config.method not in ENDPOINT_METHODS or not isinstance(n, int) or n < 1:
        return []
    T = _num_train_timesteps(config)
    grid = ddim_grid(T, min(n, T)).tolist()
    off = sorted(t for t in starts if t not in grid)
    if not off:
        return []
    return [f"eval_endpoint_timesteps={starts}: {off} not on the skipping grid t_n = {grid[:3]}..{grid[-1]} "
            f"(T={T}, loss.num_ddim_timesteps={n}); pick members of it"]


def coarse_grid_problems(config) -> list[str]:
    """loss.coarse_ddim_timesteps: LCD only, its skipping step a multiple of the grid's."""
    from lcm_jax.losses.consistency import METHODS, ConsistencyConfig, check_coarse_grid

    n, n_c = config.loss.num_ddim_timesteps, config.loss.get("coarse_ddim_timesteps", 0)
    if not n_c or not isinstance(n_c, int) or not isinstance(n, int) or n < 1:
        return []
    try:
        check_coarse_grid(_num_train_timesteps(config), ConsistencyConfig(
            num_ddim_timesteps=n, coarse_ddim_timesteps=n_c,
            method=config.method if config.method in METHODS else "lcd"))
    except ValueError as e:
        return [f"loss.{e}"]
    return []


def check_config(config, num_processes: int = 1, num_devices: int = 1) -> None:
    """Raises one ConfigError naming every problem of `config` (field, value, what is allowed)
    for a run over `num_processes` processes and `num_devices` devices; None when it can run."""
    problems = field_problems(config) + name_problems(config)
    problems += division_problems(config, num_processes, num_devices) + path_problems(config)
    problems += endpoint_problems(config) + coarse_grid_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))
