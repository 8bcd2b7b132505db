"""Know before you rent: the real train step compiled ahead of time for a target slice.

    lcm-jax plan --config configs/sd15_lcd.py:FOLDER --topology v5e-16 [--search-batch]

The step is the trainer's own (`train.build_step`: the same function, shardings and mesh),
lowered on abstract inputs (ShapeDtypeStructs carrying NamedShardings over the target's
devices) and compiled by XLA for that target: a TPU slice through libtpu's compile-only devices
(`jax.experimental.topologies`, no TPU needed), or `cpu:N` host devices. Nothing is allocated and
no weight is read: a pipeline folder's config files are enough (see README, "Planning a run").
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from lcm_jax import schedules, sharding
from lcm_jax.components import read_json
from lcm_jax.config_checks import division_problems, field_problems, name_problems
from lcm_jax.convert.clip import _module_class
from lcm_jax.convert.common import eval_shapes, read_config
from lcm_jax.convert.unet import unet_shapes
from lcm_jax.convert.vae import vae_param_shapes
from lcm_jax.errors import ConfigError
from lcm_jax.models import accounting
from lcm_jax.models import lora as lora_lib
from lcm_jax.models.unet import UNet2DConditionModel
from lcm_jax.models.vae import AutoencoderKL
from lcm_jax.train import abstract, build_step
from lcm_jax.training.models import Models, dtype, uses_w_embedding

GiB = 2 ** 30


class Chip(NamedTuple):
    """One accelerator chip's public figures (one JAX device per chip)."""
    peak_bf16_flops: float    # FLOP/s, dense bf16
    hbm_bytes: float
    hbm_bandwidth: float      # bytes/s
    source: str


CHIPS = {
    "v4": Chip(275e12, 32 * GiB, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip(197e12, 16 * GiB, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(459e12, 95e9, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(918e12, 32 * GiB, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
}
# Slice name -> (chip, libtpu topology name, get_topology_desc options). The number in a slice
# name counts TensorCores: v4 and v5p have two per chip (one megacore device), v5e and v6e one.
TOPOLOGIES = {
    "v5e-4": ("v5e", "v5e:2x2", {}), "v5e-8": ("v5e", "v5e:2x4", {}),
    "v5e-16": ("v5e", "v5e:4x4", {}), "v5p-8": ("v5p", "v5p:2x2x1", {}),
    "v4-32": ("v4", "v4:2x2x4", {"chip_config_name": "megacore"}), "v6e-8": ("v6e", "v6e:2x4", {}),
}


LIBTPU_DIR = os.environ.get("LCM_JAX_LIBTPU_DIR", os.path.expanduser("~/.cache/lcm_jax/libtpu"))


def libtpu_path() -> Optional[str]:
    """libtpu.so for compiling to TPU: $TPU_LIBRARY_PATH, the `libtpu` package (`pip install
    'jax[tpu]'`), or a copy under LIBTPU_DIR (`make libtpu`: outside site-packages, so that no
    other process on a machine without TPUs loads it and prints libtpu's start-up errors)."""
    if os.environ.get("TPU_LIBRARY_PATH"):
        return os.environ["TPU_LIBRARY_PATH"]
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.origin:
        return os.path.join(os.path.dirname(spec.origin), "libtpu.so")
    local = os.path.join(LIBTPU_DIR, "libtpu", "libtpu.so")
    return local if os.path.isfile(local) else None


def target_devices(topology: str) -> tuple[list, Optional[Chip]]:
    """The devices of a target ('v5e-16', ..., or 'cpu:N') and its chip (None for CPU)."""
    if topology.startswith("cpu:"):
        n = int(topology[4:]) if topology[4:].isdigit() else 0
        have = jax.devices("cpu")
        if n < 1 or n > len(have):
            raise ValueError(f"--topology {topology}: this process has {len(have)} CPU devices; use "
                             f"cpu:1..{len(have)} or set XLA_FLAGS=--xla_force_host_platform_device_count=N")
        return have[:n], None
    if topology not in TOPOLOGIES:
        raise ValueError(f"--topology {topology}: unknown; choose one of {sorted(TOPOLOGIES)} or cpu:N")
    chip, name, options = TOPOLOGIES[topology]
    path = libtpu_path()
    if path is None:
        raise ValueError(f"--topology {topology}: no libtpu to compile for TPU with; run `make libtpu` "
                         f"(installs it to {LIBTPU_DIR}) or pip install 'jax[tpu]'")
    os.environ["TPU_LIBRARY_PATH"] = path  # read when the TPU plugin loads
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM here: compile only
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several plans may run at once
    try:
        from jax.experimental import topologies
        devices = topologies.get_topology_desc(name, "tpu", **options).devices
    except (RuntimeError, ImportError) as e:
        raise ValueError(f"--topology {topology}: cannot compile for TPU here with {path} "
                         f"({str(e).splitlines()[0]})") from e
    return list(devices), CHIPS[chip]


# ---------------------------------------------------------------------------------------------
# Config-only pipeline folders: what `huggingface-cli download ID --include '*.json'` gives
# ---------------------------------------------------------------------------------------------

_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1}
# stabilityai/stable-diffusion-xl-base-1.0's component configs (the fields the models read).
SDXL_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
SDXL_TEXT2_CONFIG = {
    "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
    "layer_norm_eps": 1e-05, "projection_dim": 1280, "bos_token_id": 0, "eos_token_id": 2,
    "pad_token_id": 1,
}


def config_folder(model: str, folder: str) -> str:
    """Writes the config files of 'sd15' or 'sdxl' (no weights) to `folder`: enough to plan."""
    from lcm_jax.convert.single_file import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

    parts = {"sd15": {"unet": SD15_UNET_CONFIG, "vae": SD15_VAE_CONFIG, "text_encoder": SD15_TEXT_CONFIG},
             "sdxl": {"unet": SDXL_UNET_CONFIG, "text_encoder": SD15_TEXT_CONFIG, "text_encoder_2": SDXL_TEXT2_CONFIG,
                      "vae": {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025}}}
    if model not in parts:
        raise ValueError(f"config_folder: unknown model {model!r}; choose one of {sorted(parts)}")
    index = {}
    for sub, cfg in {**parts[model], "scheduler": _SCHEDULER}.items():
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        with open(os.path.join(folder, sub, name), "w") as f:
            json.dump(cfg, f, indent=1)
        if sub.startswith("text_encoder"):
            index[sub] = ["transformers", cfg["architectures"][0]]
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return folder


# ---------------------------------------------------------------------------------------------
# The models and inputs of a run, as shapes
# ---------------------------------------------------------------------------------------------


def _cast(tree, dt) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), tree)


def _folder_parts(folder: str, compute) -> dict:
    """VAE, text encoder(s) and schedule of a pipeline folder from its config files alone."""
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"model.teacher={folder!r}: no model_index.json; the planner reads only "
                                "a pipeline folder's config files (huggingface-cli download ID "
                                "--include '*.json' --local-dir DIR)")
    index = read_json(os.path.join(folder, "model_index.json"), "a pipeline folder needs one")
    vae = AutoencoderKL.from_config(read_config(os.path.join(folder, "vae")), dtype=compute)
    out = {"vae": vae, "vae_params": _cast(vae_param_shapes(vae), compute),
           "schedule": schedules.NoiseSchedule.from_scheduler_config(
               read_json(os.path.join(folder, "scheduler", "scheduler_config.json"), "a pipeline folder needs scheduler/"))}
    for name in ("text_encoder", "text_encoder_2"):
        if name == "text_encoder" or (index.get(name) or [None])[0]:
            path = os.path.join(folder, name)
            cfg = read_config(path)
            te = _module_class(cfg, path).from_config(cfg, dtype=compute)
            ids = jnp.zeros((1, te.config.max_position_embeddings), jnp.int32)
            out[name], out[name + "_params"] = te, _cast(eval_shapes(te, ids), compute)
    return out


def abstract_models(config) -> Models:
    """`training.models.build_models` as shapes: the same modules (remat, dtypes, the student's
    w-embedding or LoRA factors) with ShapeDtypeStruct params; no weight is read or made."""
    mc = config.model
    compute = dtype(mc.compute_dtype)
    folder = mc.teacher or mc.components
    parts = _folder_parts(folder, compute) if folder else {"schedule": schedules.NoiseSchedule(
        prediction_type=mc.prediction_type)}
    unet_cfg = read_config(os.path.join(mc.teacher, "unet")) if mc.teacher else dict(mc.unet.to_dict())
    teacher = UNet2DConditionModel.from_config(unet_cfg, dtype=compute, remat=mc.remat)
    teacher_params = _cast(unet_shapes(teacher), compute if mc.teacher else jnp.float32)
    student, init = teacher, teacher_params
    if uses_w_embedding(config):
        student = teacher.clone(config=dataclasses.replace(teacher.config, time_cond_proj_dim=mc.time_cond_proj_dim))
        init = _cast(unet_shapes(student), jax.tree.leaves(teacher_params)[0].dtype)
    frozen = {k: parts[k + "_params"] for k in ("vae", "text_encoder", "text_encoder_2") if k in parts}
    if config.method == "lcm_lora":
        frozen["teacher"] = teacher_params
        lora = lora_lib.init_lora(jax.random.PRNGKey(0), teacher_params, config.lora.rank)
        init = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora)
    elif config.method == "lcd":
        frozen["teacher"] = _cast(teacher_params, dtype(mc.teacher_dtype))
    keep_teacher = config.method in ("lcd", "lcm_lora")
    return Models(student, init, teacher if keep_teacher else None, frozen, parts["schedule"],
                  parts.get("vae"), parts.get("text_encoder"), None, parts.get("text_encoder_2"), None)


def _reads_images(config, models: Models) -> bool:
    return (models.text_encoder is not None and config.data.source != "synthetic"
            and not config.data.cache_dir and not config.data.cache_size)


def abstract_inputs(config, models: Models) -> tuple[dict, dict]:
    """(frozen with the unconditional embeddings, one global batch) as ShapeDtypeStructs: raw
    pixels and token ids for sources that read images, else latents and text embeddings."""
    b, n, ucfg = config.batch_size, config.data.text_len, models.unet.config
    frozen = dict(models.frozen)
    frozen["uncond_embeds"] = jax.ShapeDtypeStruct((1, n, ucfg.cross_attention_dim[0]), jnp.float32)
    if not _reads_images(config, models):
        s = config.data.latent_size
        return frozen, {"latents": jax.ShapeDtypeStruct((b, s, s, ucfg.in_channels), jnp.float32),
                        "prompt_embeds": jax.ShapeDtypeStruct((b, n, ucfg.cross_attention_dim[0]), jnp.float32)}
    if models.text_encoder_2 is None:
        frozen["uncond_embeds"] = jax.ShapeDtypeStruct((1, n, models.text_encoder.config.hidden_size),
                                                       dtype(config.model.compute_dtype))
    r = config.data.resolution
    ids = (b, 2, n) if models.text_encoder_2 is not None else (b, n)
    return frozen, {"pixel_values": jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32),
                    "input_ids": jax.ShapeDtypeStruct(ids, jnp.int32)}


# ---------------------------------------------------------------------------------------------
# Compiling and reading the figures
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """Per-device figures of one compiled train step."""
    topology: str
    devices: int
    batch_size: int                      # global
    state_bytes: dict[str, int]          # params, opt_state, target_params
    frozen_bytes: dict[str, int]         # teacher, vae, text_encoder(_2), uncond_embeds
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    chip: Optional[Chip] = None
    refused: str = ""                    # the compiler's reason when it refused (out of memory)
    opt_level: str = ""                  # jax_optimization_level at compile time ("O0": fast, less optimised)
    compiled: Any = dataclasses.field(default=None, repr=False)  # runs on the target's devices

    @property
    def total_bytes(self) -> int:
        """Peak device memory of the step: inputs + outputs (less donated) + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> Optional[bool]:
        if self.refused:
            return False
        return None if self.chip is None else self.total_bytes <= self.chip.hbm_bytes

    @property
    def step_time(self) -> Optional[float]:
        """Roofline: the slower of compute at peak and HBM traffic at full bandwidth."""
        if self.chip is None or self.refused:
            return None
        return max(self.flops / self.chip.peak_bf16_flops, self.bytes_accessed / self.chip.hbm_bandwidth)


OPT_LEVELS = ("O0", "O1", "O2", "O3")  # jax_optimization_level values `--opt-level` takes
# What `--opt-level O0` changes, measured on the same row compiled both ways (README, "Planning a run").
OPT_LEVEL_CAVEAT = ("a faster compile of a less optimised program; its temporaries and bytes accessed "
                    "are that program's, not the default compile's")


def _is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def plan_step(config, topology: str, batch_size: Optional[int] = None) -> Plan:
    """Compiles the config's train step for `topology` and reads its per-device figures."""
    devices, chip = target_devices(topology)
    config = config.copy_and_resolve_references()
    if batch_size is not None:
        config.batch_size = batch_size
    problems = field_problems(config) + division_problems(config, 1, len(devices)) + name_problems(config)
    if problems:
        raise ConfigError(f"config for {topology}: {problems[0]}")
    models = abstract_models(config)
    frozen, batch = abstract_inputs(config, models)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    parts = build_step(config, models, frozen, mesh)
    state = abstract(parts.state_shapes, parts.state_sh)
    plan = Plan(topology, len(devices), config.batch_size,
                {k: sharding.per_device_bytes(getattr(state, k), getattr(parts.state_sh, k))
                 for k in ("params", "opt_state", "target_params")},
                {k: sharding.per_device_bytes(v, parts.frozen_sh[k]) for k, v in frozen.items()}, chip=chip)
    batch = abstract(batch, jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch))
    return _compile(plan, mesh, parts.step_fn, state, abstract(frozen, parts.frozen_sh), batch)


def count_flops(mesh, fn, *args) -> float:
    """FLOPs per device of jitted `fn`: XLA's cost analysis of the global program traced in
    accounting mode (XLA attention, loops unrolled: `lcm_jax.models.accounting`), over the devices.
    Only lowered, not compiled; the compiled program's own count misses loop trips and kernels."""
    with jax.set_mesh(mesh), accounting.counting():
        lowered = jax.jit(lambda *a: fn.__wrapped__(*a)).lower(*args)  # a new function: a new trace
    cost = lowered.cost_analysis()
    if cost is None:  # libtpu's compile-only client has none: XLA's HLO cost analysis on the host's
        from jax._src.lib import _jax  # no public door to it for a lowered program
        cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client,
                                             lowered.compiler_ir("hlo").as_hlo_module())
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) / mesh.size


def _compile(plan: Plan, mesh, fn, *args) -> Plan:
    """Compiles jitted `fn` on abstract `args` under `mesh` ('auto' attention resolves for the
    target's platform) and fills in XLA's memory and byte figures, FLOPs from `count_flops`.
    XLA's out-of-memory refusal is a figure (`plan.refused`); any other error is raised."""
    plan.flops = count_flops(mesh, fn, *args)
    plan.opt_level = "" if jax.config.jax_optimization_level == "UNKNOWN" else jax.config.jax_optimization_level
    try:
        with jax.set_mesh(mesh):
            compiled = fn.lower(*args).compile()
    except Exception as e:
        if not _is_oom(e):
            raise
        plan.refused = str(e).strip().splitlines()[0]
        return plan
    plan.compiled, mem = compiled, compiled.memory_analysis()
    plan.argument_bytes, plan.output_bytes = mem.argument_size_in_bytes, mem.output_size_in_bytes
    plan.alias_bytes, plan.temp_bytes = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    plan.bytes_accessed = float(cost.get("bytes accessed", 0.0))
    return plan


def plan_sampler(config, topology: str, batch_size: Optional[int] = None, steps: int = 4) -> Plan:
    """The run's own `steps`-step sampler and VAE decode (`training.samples.make_sampler`, what its
    sample grids run) compiled for `topology`, from text embeddings on: data-parallel, weights
    replicated. `batch_size` is global, default one image per device."""
    from lcm_jax.training.samples import grid_samplers, make_sampler

    devices, chip = target_devices(topology)
    config = config.copy_and_resolve_references()
    models = abstract_models(config)
    if models.vae is None:
        raise ValueError(f"plan --sampler-steps: model.teacher={config.model.teacher!r} has no VAE to decode with")
    if steps not in grid_samplers(config, models.schedule.num_train_timesteps):
        raise ValueError(f"plan --sampler-steps {steps}: not one of the run's samplers "
                         f"{sorted(grid_samplers(config, models.schedule.num_train_timesteps))}")
    b, mesh = batch_size or len(devices), sharding.make_mesh(len(devices), 1, devices)
    keep = ("vae", "teacher") if config.method == "lcm_lora" else ("vae",)  # LoRA rides on the teacher
    weights = {"params": models.init_params, "frozen": {k: models.frozen[k] for k in keep}}
    c, s, n = models.unet.config, config.data.latent_size, config.data.text_len
    inputs = {"latents": jax.ShapeDtypeStruct((b, s, s, c.in_channels), jnp.float32),
              "text": jax.ShapeDtypeStruct((b, n, c.cross_attention_dim[0]), jnp.float32), "added": None}
    if c.addition_embed_type == "text_time":
        pooled = c.to_diffusers()["projection_class_embeddings_input_dim"] - 6 * c.addition_time_embed_dim
        inputs["added"] = {"text_embeds": jax.ShapeDtypeStruct((b, pooled), jnp.float32),
                           "time_ids": jax.ShapeDtypeStruct((b, 6), jnp.float32)}
    sample = make_sampler(config, models)
    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    plan = Plan(topology, len(devices), b, {"params": sharding.per_device_bytes(
        weights["params"], jax.tree.map(lambda _: rep, weights["params"]))},
        {k: sharding.per_device_bytes(v, jax.tree.map(lambda _: rep, v)) for k, v in weights["frozen"].items()},
        chip=chip)
    args = (abstract(weights, jax.tree.map(lambda _: rep, weights)),
            abstract(inputs, jax.tree.map(lambda _: batch_sh, inputs)),
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))
    fn = lambda w, x, rng: sample(w["params"], w["frozen"], x["latents"], x["text"], x["added"], rng, steps)
    return _compile(plan, mesh, jax.jit(fn), *args)


def search_batch(config, topology: str, limit: int = 4096) -> tuple[int, list[Plan]]:
    """The largest per-device batch whose step fits the chip's HBM, found by compiling: doubling
    from 1, then bisecting; (batch, the plans compiled on the way). 0 when batch 1 does not fit."""
    devices, chip = target_devices(topology)
    if chip is None:
        raise ValueError(f"--search-batch: {topology} has no HBM figure to fit into; give a TPU topology")
    n = len(devices)
    accum = config.optim.grad_accum_steps
    plans: list[Plan] = []

    def fits(b: int) -> bool:
        plans.append(plan_step(config, topology, b * n * accum))
        return bool(plans[-1].fits)

    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * accum, plans


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:.2f} MiB"


def format_plan(plan: Plan) -> str:
    """The plan as the lines `lcm-jax plan` prints."""
    per = plan.batch_size // plan.devices
    lines = [f"target {plan.topology}: {plan.devices} devices, global batch {plan.batch_size} "
             f"({per} per device)", "per device:"]
    if plan.opt_level:
        lines.insert(1, f"compiled at XLA optimisation level {plan.opt_level}: {OPT_LEVEL_CAVEAT}")
    for k, v in {**plan.state_bytes, **{f"frozen {k}": v for k, v in plan.frozen_bytes.items()}}.items():
        lines.append(f"  {k:<28}{_gib(v)}")
    if plan.refused:
        hbm = _gib(plan.chip.hbm_bytes) if plan.chip else "memory"
        return "\n".join(lines + [f"does not fit: the compiler refused the step ({hbm} per chip): {plan.refused}"])
    lines += [f"  {'XLA arguments':<28}{_gib(plan.argument_bytes)}",
              f"  {'XLA outputs':<28}{_gib(plan.output_bytes)} ({_gib(plan.alias_bytes)} donated)",
              f"  {'XLA temporaries':<28}{_gib(plan.temp_bytes)}",
              f"  {'step total':<28}{_gib(plan.total_bytes)}",
              f"  {'FLOPs per step':<28}{plan.flops / 1e12:.3f} TFLOP",
              f"  {'bytes accessed per step':<28}{_gib(plan.bytes_accessed)}"]
    if plan.chip is None:
        return "\n".join(lines + ["fits: n/a (no HBM figure for CPU devices); roofline: n/a"])
    fit = "yes" if plan.fits else "NO: does not fit"
    t = plan.step_time
    lines += [f"fits in HBM ({_gib(plan.chip.hbm_bytes)}): {fit}",
              f"roofline step time: {t * 1e3:.1f} ms (peak {plan.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s, "
              f"{plan.chip.hbm_bandwidth / 1e9:.0f} GB/s; {plan.chip.source})",
              f"MFU at that time: {plan.flops / (t * plan.chip.peak_bf16_flops):.1%} "
              "(XLA's FLOPs, remat recompute included)"]
    return "\n".join(lines)
