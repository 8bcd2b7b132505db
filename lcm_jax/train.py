"""Latent consistency distillation (and teacher training) in one jitted, sharded loop.

    python -m lcm_jax.train --config=configs/tiny_lcd.py --workdir=runs/tiny [--config.x=y]

The workdir is the run: it holds config.json, checkpoints/ (orbax), metrics.jsonl, TensorBoard
events and samples/. Launching the same command again resumes from the latest checkpoint, and
the same config and seed give the same numbers (batches and randomness are functions of the step).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import signal
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct, traverse_util

from lcm_jax import schedules, sharding
from lcm_jax.data import sources
from lcm_jax.losses import consistency, diffusion
from lcm_jax.models import lora as lora_lib

Params = Any
METHODS = ("lcd", "lcm_lora", "lcf", "diffusion")


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss, bad config); the last good checkpoint stays."""


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Params                   # what the optimizer updates (student UNet, or LoRA factors)
    target_params: Optional[Params]  # EMA: LCD/LCF's target theta-, or diffusion's weight EMA; else None
    opt_state: Any
    rng: jax.Array                   # base key; step keys are fold_in(rng, step)


class Models(NamedTuple):
    """Everything built from config.model: modules, frozen weights and the noise schedule."""
    unet: Any                       # the trained module (student or teacher-in-training)
    init_params: Params             # its starting parameters (host numpy or jax)
    teacher: Any                    # the frozen teacher module (None for LCF / diffusion)
    frozen: dict                    # frozen weights: teacher, vae, text_encoder(_2), uncond_embeds
    schedule: schedules.NoiseSchedule
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    text_encoder_2: Any = None      # SDXL's second text encoder and tokenizer
    tokenizer_2: Any = None


# =============================================================================================
# Model
# =============================================================================================


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


W_EMBEDDING_INITS = ("zeros", "uniform")


def _with_new_leaves(params: Params, shapes: Params, init: str = "zeros", seed: int = 0) -> Params:
    """`params` completed with every leaf of `shapes` it lacks (a new cond_proj): zeros (the
    student starts as the teacher) or, as diffusers' LCD script leaves torch.nn.Linear's default,
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in the kernel's input size."""
    if init not in W_EMBEDDING_INITS:
        raise ValueError(f"model.w_embedding_init must be one of {W_EMBEDDING_INITS}, got {init!r}")
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)
    for path, s in sorted(traverse_util.flatten_dict(shapes).items()):
        if path not in flat:
            bound = 1.0 / np.sqrt(s.shape[0]) if init == "uniform" and len(s.shape) == 2 else 0.0
            flat[path] = rng.uniform(-bound, bound, s.shape).astype(s.dtype) if bound else np.zeros(s.shape, s.dtype)
    return traverse_util.unflatten_dict(flat)


def _uses_w_embedding(config) -> bool:
    return config.method in ("lcd", "lcf") and config.model.time_cond_proj_dim > 0


def build_models(config: ml_collections.ConfigDict) -> Models:
    """Teacher from a diffusers pipeline folder (or a random UNet), student derived from it.

    model.teacher: a pipeline folder (all parts); otherwise the UNet is built from model.unet and
    model.components, if set, supplies the VAE, text encoder, tokenizer and noise schedule.
    """
    from lcm_jax.convert.unet import unet_shapes
    from lcm_jax.models.unet import UNet2DConditionModel

    mc = config.model
    compute = _dtype(mc.compute_dtype)
    frozen: dict = {}
    vae = text_encoder = tokenizer = text_encoder_2 = tokenizer_2 = None
    schedule = schedules.NoiseSchedule(prediction_type=mc.prediction_type)
    folder = mc.teacher or mc.components
    if folder:  # VAE, text encoder, tokenizer and schedule (and the teacher UNet) from a folder
        from lcm_jax.pipeline import load_components
        comps = load_components(folder, dtype=compute, with_unet=bool(mc.teacher))
        vae, text_encoder, tokenizer = comps.vae, comps.text_encoder, comps.tokenizer
        frozen.update(vae=comps.vae_params, text_encoder=comps.text_params)
        if comps.is_sdxl:
            text_encoder_2, tokenizer_2 = comps.text_encoder_2, comps.tokenizer_2
            frozen["text_encoder_2"] = comps.text_params_2
        schedule = comps.schedule
    if mc.teacher:
        unet_cfg, teacher_params = comps.unet.config.to_diffusers(), comps.unet_params
    else:  # a UNet from model.unet, randomly initialised (tiny tests, or a teacher from scratch)
        unet_cfg = dict(mc.unet.to_dict())
        teacher = UNet2DConditionModel.from_config(unet_cfg, dtype=compute)
        teacher_params = jax.jit(teacher.init)(jax.random.PRNGKey(mc.init_seed),
                                               *_dummy_inputs(teacher, config))["params"]
    have = unet_cfg.get("time_cond_proj_dim")
    if have and _uses_w_embedding(config) and have != mc.time_cond_proj_dim:
        raise ValueError(f"the teacher UNet in {folder or 'model.unet'} already has "
                         f"time_cond_proj_dim={have} (it is an LCM); set "
                         f"--config.model.time_cond_proj_dim={have} to continue training it")
    teacher = UNet2DConditionModel.from_config(unet_cfg, dtype=compute, remat=mc.remat)
    if _uses_w_embedding(config):
        student = UNet2DConditionModel.from_config(
            {**unet_cfg, "time_cond_proj_dim": mc.time_cond_proj_dim}, dtype=compute, remat=mc.remat)
        init = _with_new_leaves(teacher_params, unet_shapes(student), mc.w_embedding_init, mc.init_seed)
    else:
        student, init = teacher, teacher_params
    if config.method == "lcm_lora":
        frozen["teacher"] = teacher_params
        init = lora_lib.init_lora(jax.random.PRNGKey(mc.init_seed + 1), teacher_params, config.lora.rank)
    elif config.method == "lcd":
        frozen["teacher"] = jax.tree.map(lambda x: jnp.asarray(x, _dtype(mc.teacher_dtype)), teacher_params)
    return Models(student, init, teacher if config.method in ("lcd", "lcm_lora") else None,
                  frozen, schedule, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2)


def _dummy_inputs(unet, config) -> tuple:
    n, c = config.data.latent_size, unet.config
    added = None
    if c.addition_embed_type == "text_time":  # SDXL: pooled text embeds + 6 micro-cond ids
        pooled = c.to_diffusers()["projection_class_embeddings_input_dim"] - 6 * c.addition_time_embed_dim
        added = {"text_embeds": jnp.zeros((1, pooled)), "time_ids": jnp.zeros((1, 6))}
    return (jnp.zeros((1, n, n, c.in_channels)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, config.data.text_len, c.cross_attention_dim[0])), None, added)


def tokenize_fn(models: Models) -> Optional[Callable[[list[str]], np.ndarray]]:
    """Captions -> token ids (B, L), or (B, 2, L) for SDXL's two tokenizers; None without one."""
    if models.tokenizer is None:
        return None
    from lcm_jax.convert.clip import encode_prompt_ids
    if models.tokenizer_2 is None:
        return lambda caps: encode_prompt_ids(models.tokenizer, caps)[0]
    return lambda caps: np.stack([encode_prompt_ids(tok, caps)[0]
                                  for tok in (models.tokenizer, models.tokenizer_2)], axis=1)


def uncond_embeds(models: Models) -> jax.Array:
    """The unconditional prompt embeddings (1, L, D): the empty prompt's, or zeros for SDXL (as
    diffusers' SDXL LCM distillation)."""
    ids = tokenize_fn(models)([""])
    if models.text_encoder_2 is not None:
        return jnp.zeros((1, ids.shape[-1], models.unet.config.cross_attention_dim[0]))
    te = models.text_encoder.apply({"params": models.frozen["text_encoder"]}, jnp.asarray(ids))
    return te.last_hidden_state


def make_model_fns(config, models: Models) -> tuple[Callable, Optional[Callable]]:
    """student_fn / teacher_fn with the losses' signature (params, frozen, z, t, text, w, added)."""
    unet, teacher = models.unet, models.teacher
    scale = config.lora.alpha / config.lora.rank

    def student_fn(params, frozen, z, t, text, w_emb, added):
        if config.method == "lcm_lora":
            params = lora_lib.merge(frozen["teacher"], params, scale)
            w_emb = None
        return unet.apply({"params": params}, z, t, text, timestep_cond=w_emb, added_cond_kwargs=added)

    def teacher_fn(_, frozen, z, t, text, w_emb, added):
        return teacher.apply({"params": frozen["teacher"]}, z, t, text, added_cond_kwargs=added)

    return student_fn, (teacher_fn if teacher is not None else None)


# =============================================================================================
# Update step
# =============================================================================================


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    oc = config.optim
    if oc.schedule == "constant":
        lr = optax.join_schedules([optax.linear_schedule(0.0, oc.learning_rate, max(oc.warmup_steps, 1)),
                                   optax.constant_schedule(oc.learning_rate)], [oc.warmup_steps])
    elif oc.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, oc.learning_rate, max(oc.warmup_steps, 1),
                                                max(config.total_steps, oc.warmup_steps + 1))
    else:
        raise ValueError(f"optim.schedule={oc.schedule!r}; choose 'constant' or 'cosine'")
    tx = optax.adamw(lr, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay)
    if oc.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(oc.grad_clip), tx)
    return tx, lr


def make_loss(config, models: Models):
    student_fn, teacher_fn = make_model_fns(config, models)
    if config.method == "diffusion":
        return diffusion.make_diffusion_loss(student_fn, models.schedule)
    lc = config.loss
    cfg = consistency.ConsistencyConfig(
        num_ddim_timesteps=lc.num_ddim_timesteps, w_min=lc.w_min, w_max=lc.w_max,
        w_embed_dim=config.model.time_cond_proj_dim if _uses_w_embedding(config) else None,
        loss_type=lc.loss_type, huber_c=lc.huber_c, sigma_data=lc.sigma_data,
        timestep_scaling=lc.timestep_scaling, solver="data" if config.method == "lcf" else lc.solver,
        timestep_weighting=lc.timestep_weighting)
    if config.method == "lcf":
        cfg = dataclasses.replace(cfg, w_min=lc.lcf_w, w_max=lc.lcf_w)
    return consistency.make_consistency_loss(student_fn, teacher_fn, models.schedule, cfg)


def make_encode(config, models: Models, with_uncond: bool = True) -> Callable:
    """Raw batch -> latents and text embeddings (inside the jitted step, frozen VAE/text encoder);
    with_uncond=False stops there (the latent cache), else adds the unconditional embeddings."""
    def encode(frozen, batch, rng):
        out = dict(batch)
        if "pixel_values" in out:
            post = models.vae.apply({"params": frozen["vae"]}, out.pop("pixel_values"), method="encode")
            z = post.sample(rng)
            shift = models.vae.shift_factor or 0.0
            out["latents"] = ((z - shift) * models.vae.scaling_factor).astype(jnp.float32)
        b = out["latents"].shape[0]
        if "input_ids" in out and models.text_encoder_2 is not None:  # SDXL, ids (B, 2, L)
            out.update(_encode_sdxl(config, models, frozen, out.pop("input_ids")))
        elif "input_ids" in out:
            te = models.text_encoder.apply({"params": frozen["text_encoder"]}, out.pop("input_ids"))
            out["prompt_embeds"] = te.last_hidden_state.astype(jnp.float32)
        if not with_uncond:
            return out
        uncond = jnp.broadcast_to(frozen["uncond_embeds"], (b,) + frozen["uncond_embeds"].shape[1:])
        out["uncond_embeds"] = uncond
        if config.method == "diffusion" and config.data.caption_dropout > 0:
            drop = jax.random.bernoulli(jax.random.fold_in(rng, 1), config.data.caption_dropout, (b,))
            out["prompt_embeds"] = jnp.where(drop[:, None, None], uncond, out["prompt_embeds"])
        return out
    return encode


def _encode_sdxl(config, models: Models, frozen, ids: jax.Array) -> dict:
    """SDXL conditioning: concatenated penultimate states, pooled embeds and micro-conditioning
    time_ids (resolution, resolution, 0, 0, resolution, resolution); zero pooled embeds for uncond."""
    from lcm_jax.pipeline import sdxl_text_embeddings, sdxl_time_ids

    embeds, pooled = sdxl_text_embeddings(models.text_encoder, frozen["text_encoder"],
                                          models.text_encoder_2, frozen["text_encoder_2"],
                                          ids[:, 0], ids[:, 1])
    r = config.data.resolution
    time_ids = jnp.asarray(sdxl_time_ids(ids.shape[0], r, r))
    pooled = pooled.astype(jnp.float32)
    return {"prompt_embeds": embeds.astype(jnp.float32),
            "added_cond": {"text_embeds": pooled, "time_ids": time_ids},
            "uncond_added_cond": {"text_embeds": jnp.zeros_like(pooled), "time_ids": time_ids}}


def ema_decay(config) -> float:
    """Decay of the EMA kept in TrainState.target_params (0: none is kept).

    LCD/LCF: the target network theta- of the consistency loss (config.loss.ema_decay); with 0
    the target is the current student under stop-gradient.
    Diffusion training: an EMA of the weights, the model a teacher ships with
    (config.diffusion_ema_decay, as diffusers' --use_ema); the loss never reads it.
    """
    if config.method in ("lcd", "lcf"):
        return float(config.loss.ema_decay)
    if config.method == "diffusion":
        return float(config.get("diffusion_ema_decay", 0.0))
    return 0.0


def make_train_step(config, models: Models, tx: optax.GradientTransformation, lr_fn) -> Callable:
    """train_step(state, frozen, batch) -> (state, metrics); pure, one XLA program.

    The step's randomness is fold_in(state.rng, state.step), so a resumed run draws exactly what
    the uninterrupted one would. `frozen` is an argument (not a closure) to stay a sharded input.
    """
    loss_fn = make_loss(config, models)
    encode = make_encode(config, models)
    accum = config.optim.grad_accum_steps
    has_target = config.method in ("lcd", "lcf")  # the loss reads the target network
    decay = ema_decay(config)

    def grads_of(params, target, frozen, batch, rng):
        if not has_target or target is None:  # no EMA kept (ema_decay 0): the current student
            target = params                   # is the target; the loss stops its gradient
        def f(p):
            loss, _ = loss_fn(p, target, frozen, batch, rng)
            return loss
        return jax.value_and_grad(f)(params)

    def train_step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        rng_enc, rng_loss = jax.random.split(rng)
        batch = encode(frozen, batch, rng_enc)
        if accum == 1:
            loss, grads = grads_of(state.params, state.target_params, frozen, batch, rng_loss)
        else:  # gradient accumulation over `accum` micro-batches, summed in a scan
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, xs):
                i, mb = xs
                l, g = grads_of(state.params, state.target_params, frozen, mb, jax.random.fold_in(rng_loss, i))
                return jax.tree.map(jnp.add, carry, (l, g)), None

            zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(body, zero, (jnp.arange(accum), micro))
            loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        target = state.target_params
        if decay > 0:
            target = consistency.ema_update(target, params, decay)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state.step),
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
        new = state.replace(step=state.step + 1, params=params, target_params=target, opt_state=opt_state)
        return new, metrics

    return train_step


def make_eval_loss(config, models: Models) -> Callable:
    """eval_loss(state, frozen, batch) -> the loss with a fixed key on a fixed batch.

    The training loss is drawn at a new (n, eps, w) every step, so its curve is dominated by
    that draw; the same draw every time gives a low-variance curve that shows learning.
    """
    loss_fn = make_loss(config, models)
    encode = make_encode(config, models)
    has_target = config.method in ("lcd", "lcf")
    key = jax.random.PRNGKey(config.seed + 1)

    def eval_loss(state: TrainState, frozen, batch):
        target = state.target_params if has_target and state.target_params is not None else state.params
        return loss_fn(state.params, target, frozen, encode(frozen, batch, key), key)[0]

    return eval_loss


def make_eval_endpoint(config, models: Models) -> Optional[Callable]:
    """eval_endpoint(state, frozen, batch) -> (S,) one-step MSE to the teacher's ODE endpoint from
    each of config.eval_endpoint_timesteps (consistency.make_endpoint_error), for the network
    that samples (the EMA target of LCD, else the trained parameters), at the middle of the
    training guidance range and a fixed key. None when off or when there is no teacher."""
    starts = tuple(int(t) for t in config.get("eval_endpoint_timesteps", ()) or ())
    if not starts or config.method not in ("lcd", "lcm_lora"):
        return None
    student_fn, teacher_fn = make_model_fns(config, models)
    lc = config.loss
    cfg = consistency.ConsistencyConfig(
        num_ddim_timesteps=lc.num_ddim_timesteps,
        w_embed_dim=config.model.time_cond_proj_dim if _uses_w_embedding(config) else None,
        sigma_data=lc.sigma_data, timestep_scaling=lc.timestep_scaling)
    error = consistency.make_endpoint_error(student_fn, teacher_fn, models.schedule, cfg, starts)
    encode = make_encode(config, models)
    key = jax.random.PRNGKey(config.seed + 3)
    w = 0.5 * (lc.w_min + lc.w_max)
    n = int(config.get("eval_endpoint_batch", 16))

    def eval_endpoint(state: TrainState, frozen, batch):
        params = state.target_params if state.target_params is not None else state.params
        batch = jax.tree.map(lambda x: x[:n], batch)  # the chain costs a sampler run per example
        return error(params, frozen, encode(frozen, batch, key), w, key)

    return eval_endpoint


def endpoint_row(config, errors) -> dict:
    """{'endpoint_mse/t999': ..., ...}: the metrics names of make_eval_endpoint's output."""
    return {f"endpoint_mse/t{int(t)}": float(e)
            for t, e in zip(config.eval_endpoint_timesteps, jax.device_get(errors))}


# =============================================================================================
# Checkpoints
# =============================================================================================


def checkpoint_manager(workdir: str, config):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=config.async_checkpointing)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save_checkpoint(mngr, state: TrainState, force: bool = False) -> None:
    import orbax.checkpoint as ocp

    mngr.save(int(state.step), args=ocp.args.StandardSave(state), force=force)


def restore_checkpoint(mngr, abstract_state: TrainState, step: Optional[int] = None) -> Optional[TrainState]:
    """The checkpoint at `step` (default: the latest complete one; orbax only exposes finalised
    ones), or None when there is none."""
    import orbax.checkpoint as ocp

    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))


# =============================================================================================
# Logging
# =============================================================================================


class MetricsWriter:
    """metrics.jsonl + TensorBoard (process 0 only). Resuming drops lines past the restored step."""

    def __init__(self, workdir: str, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _endpoint_text(row: dict) -> str:
    """' endpoint_mse t999 0.3095 t759 0.0503' from a metrics row ('' when it has none)."""
    ends = [f"{k.split('/')[1]} {v:.4f}" for k, v in row.items() if k.startswith("endpoint_mse/")]
    return f" endpoint_mse {' '.join(ends)}" if ends else ""


def _progress_line(step: int, total: int, row: dict) -> str:
    """'step 10/50 loss ... grad_norm ... lr ... 4.1 steps/s 33 ex/s ETA 0:00:09'."""
    m, sec = divmod(int((total - step) / max(row["steps_per_s"], 1e-9)), 60)
    h, m = divmod(m, 60)
    ev = f" eval_loss {row['eval_loss']:.5f}" if "eval_loss" in row else ""
    ev += _endpoint_text(row)
    return (f"step {step}/{total} loss {row['loss']:.5f}{ev} grad_norm {row['grad_norm']:.3f} "
            f"lr {row['lr']:.2e} {row['steps_per_s']:.2f} steps/s "
            f"{row['examples_per_s']:.1f} ex/s ETA {h}:{m:02d}:{sec:02d}")


# =============================================================================================
# Main
# =============================================================================================


def _main_process_print(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def make_init_state(config, tx: optax.GradientTransformation) -> Callable[[Params], TrainState]:
    """init_state(params) -> TrainState at step 0 (the EMA target starts equal to the student)."""
    def init_state(params):
        params = jax.tree.map(lambda x: jnp.asarray(x, _dtype(config.model.param_dtype)), params)
        target = params if ema_decay(config) > 0 else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, target_params=target,
                          opt_state=tx.init(params), rng=jax.random.PRNGKey(config.seed))
    return init_state


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def setup(config, mesh) -> dict:
    """Models, state shardings, the compiled step and the data source; nothing trained yet."""
    models = build_models(config)
    tx, lr_fn = make_optimizer(config)
    rules = [tuple(r) for r in config.sharding.rules]
    init_state = make_init_state(config, tx)
    state_shapes = jax.eval_shape(init_state, models.init_params)
    state_sh = sharding.named(mesh, sharding.param_specs(state_shapes, mesh, rules))
    frozen = dict(models.frozen)
    tokenize = tokenize_fn(models)
    if tokenize is not None:
        frozen["uncond_embeds"] = uncond_embeds(models)
    ucfg = models.unet.config
    text_shape = (config.data.text_len, ucfg.cross_attention_dim[0])
    latent_shape = (config.data.latent_size, config.data.latent_size, ucfg.in_channels)
    source = sources.make_source(config, tokenize, latent_shape, text_shape)
    if config.data.cache_size and models.vae is not None:
        encode_fn = jax.jit(make_encode(config, models, with_uncond=False))
        key = jax.random.PRNGKey(config.seed + 2)
        reuse = json.dumps([config.model.to_dict(), config.data.to_dict(), config.seed,
                            jax.process_index(), jax.process_count()],
                           sort_keys=True, default=str)
        chunks = itertools.count()  # each chunk draws its own VAE posterior sample
        source = sources.LatentCache(
            source, lambda raw: jax.device_get(encode_fn(frozen, raw, jax.random.fold_in(key, next(chunks)))),
            config.data.cache_size,
            seed=config.seed, log=_main_process_print, reuse_key=reuse)
    if "uncond_embeds" not in frozen:
        frozen["uncond_embeds"] = source.uncond_embeds()
    frozen_sh = sharding.named(mesh, sharding.param_specs(frozen, mesh, rules))
    sharding.barrier("lcm_jax_setup")
    frozen = sharding.put_global(frozen, frozen_sh)
    init_params = sharding.put_global(models.init_params, state_sh.params)
    state = jax.jit(init_state, out_shardings=state_sh)(init_params)
    step_fn = jax.jit(make_train_step(config, models, tx, lr_fn), donate_argnums=(0,),
                      in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
                      out_shardings=(state_sh, sharding.replicated(mesh)))
    eval_fn = jax.jit(make_eval_loss(config, models), out_shardings=sharding.replicated(mesh))
    endpoint_fn = make_eval_endpoint(config, models)
    if endpoint_fn is not None:
        endpoint_fn = jax.jit(endpoint_fn, out_shardings=sharding.replicated(mesh))
    return dict(models=models, state=state, state_sh=state_sh, frozen=frozen, step_fn=step_fn,
                eval_fn=eval_fn, endpoint_fn=endpoint_fn, source=source)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """The whole run. Resumes from workdir's latest checkpoint; returns the final state."""
    if config.method not in METHODS:
        raise ValueError(f"config.method={config.method!r}; choose one of {METHODS}")
    os.makedirs(workdir, exist_ok=True)
    from lcm_jax.pipeline import enable_compilation_cache
    enable_compilation_cache(config.compilation_cache_dir or None)  # restarts skip the compile
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    # ------------------------------------------------------------------ Mesh / Model / Shard
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    s = setup(config, mesh)
    source, step_fn = s["source"], s["step_fn"]

    # ------------------------------------------------------------------ Checkpoint
    mngr = checkpoint_manager(workdir, config)
    restored = restore_checkpoint(mngr, _abstract(s["state"], s["state_sh"]))
    state = restored if restored is not None else s["state"]
    start = int(state.step)
    if restored is not None and is_main:
        print(f"resumed from {workdir}/checkpoints step {start}", flush=True)

    # ------------------------------------------------------------------ Compile before data
    batch0 = sharding.shard_batch(source.batch(start, jax.process_index(), jax.process_count()), mesh)
    t0 = time.time()
    step_fn = step_fn.lower(state, s["frozen"], batch0).compile()
    if is_main:
        print(f"compiled train step in {time.time() - t0:.1f}s; mesh {dict(mesh.shape)}; "
              f"{jax.device_count()} devices, {jax.process_count()} processes", flush=True)

    # ------------------------------------------------------------------ Loop
    writer = MetricsWriter(workdir, start, enabled=is_main)
    eval_batch = None
    if config.eval_every:  # a fixed batch the run never trains on (step index -1)
        eval_batch = sharding.shard_batch(
            source.batch(2 ** 30, jax.process_index(), jax.process_count()), mesh)
    stop = {"sigterm": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))
    def eval_row(state) -> dict:  # the fixed-batch loss, and the endpoint error when it is on
        row = {"eval_loss": float(s["eval_fn"](state, s["frozen"], eval_batch))}
        if s["endpoint_fn"] is not None:
            row.update(endpoint_row(config, s["endpoint_fn"](state, s["frozen"], eval_batch)))
        return row

    if start == 0 and eval_batch is not None and s["endpoint_fn"] is not None:  # the baseline
        row = eval_row(state)
        writer.write(0, row)
        _main_process_print(f"before distillation: eval_loss {row['eval_loss']:.5f}{_endpoint_text(row)}")
    t_last, step_last = time.time(), start
    sampler = make_sample_hook(config, s["models"], workdir) if is_main else None
    try:
        for step in range(start, config.total_steps):
            batch = batch0 if step == start else sharding.shard_batch(
                source.batch(step, jax.process_index(), jax.process_count()), mesh)
            new_state, metrics = step_fn(state, s["frozen"], batch)
            if not bool(metrics["finite"]):
                raise TrainingError(f"non-finite loss or gradient at step {step + 1} (loss="
                                    f"{float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])});"
                                    " stopping; the last good checkpoint is kept. Lower "
                                    "optim.learning_rate or enable optim.grad_clip.")
            state, done = new_state, step + 1
            if done % config.log_every == 0 or done == config.total_steps:
                now = time.time()
                sps = (done - step_last) / max(now - t_last, 1e-9)
                row = {k: float(v) for k, v in metrics.items() if k != "finite"}
                row.update(steps_per_s=sps, examples_per_s=sps * config.batch_size)
                if eval_batch is not None and (done % config.eval_every == 0 or done == config.total_steps):
                    row.update(eval_row(state))
                writer.write(done, row)
                if is_main:
                    print(_progress_line(done, config.total_steps, row), flush=True)
                t_last, step_last = time.time(), done  # steps/s counts training steps only
            if done % config.checkpoint_every == 0 or done == config.total_steps or stop["sigterm"]:
                save_checkpoint(mngr, state, force=stop["sigterm"])
            if sampler is not None and config.sample_every and done % config.sample_every == 0:
                sampler(state, done)
            if stop["sigterm"]:
                print(f"SIGTERM: saved step {done}, exiting", flush=True)
                break
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
        signal.signal(signal.SIGTERM, previous)
    return state


def make_sample_hook(config, models: Models, workdir: str) -> Optional[Callable]:
    """Few-step sample grids at fixed prompts under workdir/samples (needs a VAE and tokenizer)."""
    if not config.sample_every or models.vae is None or config.method == "diffusion":
        return None
    from lcm_jax.pipeline import training_sample_grid
    return functools.partial(training_sample_grid, config, models, workdir)


def main(argv) -> None:
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    flags_ = flags.FLAGS
    if flags_.num_processes > 1 or flags_.coordinator:
        # Explicit multi-process launch (e.g. several local CPU processes); on TPU pods and SLURM
        # clusters `--jax_distributed` lets JAX discover the topology itself.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(flags_.coordinator, flags_.num_processes, flags_.process_id)
    elif flags_.jax_distributed:
        jax.distributed.initialize()
    train_and_evaluate(flags_.config, flags_.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (resumes from its checkpoints)")
    flags.DEFINE_bool("jax_distributed", False, "call jax.distributed.initialize() (multi-host)")
    flags.DEFINE_string("coordinator", "", "host:port of process 0 for an explicit multi-process launch")
    flags.DEFINE_integer("num_processes", 1, "number of processes in an explicit launch")
    flags.DEFINE_integer("process_id", 0, "this process's index in an explicit launch")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
