"""The models of a run, built from config.model: the frozen teacher (a diffusers folder or a random
UNet), the student derived from it (a w-embedding added for LCD/LCF, LoRA factors for LCM-LoRA),
the VAE and text encoder(s), and the losses' view of them (student_fn / teacher_fn)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from lcm_jax import fs, schedules
from lcm_jax.components import load_components
from lcm_jax.convert.clip import encode_prompt_ids
from lcm_jax.convert.common import read_config
from lcm_jax.convert.unet import unet_shapes
from lcm_jax.losses import consistency
from lcm_jax.models import lora as lora_lib
from lcm_jax.models.unet import UNet2DConditionModel

Params = Any


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


def dtype(name: str):
    """A config dtype name ('float32', 'bfloat16', 'float16') as a jnp dtype."""
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


W_CONDITIONED = ("lcd", "lcf", "tcd", "pcm", "guided")  # full students with a w-embedding (time_cond_proj_dim)
DISTILLED = ("lcd", "lcm_lora", "tcd", "pcm", "guided")  # methods that read the frozen teacher
STUDENT_PREDICTIONS = ("teacher",) + tuple(consistency.STUDENT_PREDICTIONS)


def uses_w_embedding(config) -> bool:
    return config.method in W_CONDITIONED and config.model.time_cond_proj_dim > 0


def student_prediction(config) -> str:
    """What the student UNet's output is, as a schedule prediction_type ('epsilon', 'sample',
    'v_prediction'), from config.loss.student_prediction; "" when it is the teacher's own (the
    default 'teacher', and always for teacher training)."""
    name = config.loss.get("student_prediction", "teacher") if config.method != "diffusion" else "teacher"
    if name not in STUDENT_PREDICTIONS:
        raise ValueError(f"loss.student_prediction={name!r}: choose one of {STUDENT_PREDICTIONS}")
    return "" if name == "teacher" else consistency.STUDENT_PREDICTIONS[name]


def student_schedule(config, schedule: schedules.NoiseSchedule) -> schedules.NoiseSchedule:
    """The teacher's noise schedule with the student's prediction_type: what samplers, the
    pipeline and the exported scheduler config read the student's output with."""
    pred = student_prediction(config)
    return dataclasses.replace(schedule, prediction_type=pred) if pred else schedule


def build_models(config: ml_collections.ConfigDict) -> Models:
    """Teacher from a diffusers pipeline folder (or a random UNet), student derived from it.

    model.teacher: a pipeline folder (all parts); otherwise the UNet is built from model.unet and
    model.components, if set, supplies the VAE, text encoder, tokenizer and noise schedule.
    """
    mc = config.model
    compute = dtype(mc.compute_dtype)
    frozen: dict = {}
    vae = text_encoder = tokenizer = text_encoder_2 = tokenizer_2 = None
    schedule = schedules.NoiseSchedule(prediction_type=mc.prediction_type)
    folder = mc.teacher or mc.components
    if folder:  # VAE, text encoder, tokenizer and schedule (and the teacher UNet) from a folder
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
    if have and uses_w_embedding(config) and have != mc.time_cond_proj_dim:
        raise ValueError(f"the teacher UNet in {folder or 'model.unet'} already has "
                         f"time_cond_proj_dim={have} (it is an LCM); set "
                         f"--config.model.time_cond_proj_dim={have} to continue training it")
    teacher = UNet2DConditionModel.from_config(unet_cfg, dtype=compute, remat=mc.remat)
    if uses_w_embedding(config):
        student = UNet2DConditionModel.from_config(
            {**unet_cfg, "time_cond_proj_dim": mc.time_cond_proj_dim}, dtype=compute, remat=mc.remat)
        init = _with_new_leaves(teacher_params, unet_shapes(student), mc.w_embedding_init, mc.init_seed)
    else:
        student, init = teacher, teacher_params
    if config.method == "lcm_lora":
        frozen["teacher"] = teacher_params
        init = lora_lib.init_lora(jax.random.PRNGKey(mc.init_seed + 1), teacher_params, config.lora.rank)
    elif config.method in DISTILLED:
        frozen["teacher"] = jax.tree.map(lambda x: jnp.asarray(x, dtype(mc.teacher_dtype)), teacher_params)
    return Models(student, init, teacher if config.method in DISTILLED else None,
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


def student_shapes(config) -> tuple[Any, Any]:
    """(trained UNet module, shapes of the trained params) from the config alone: the modules of
    `build_models` without loading the teacher's weights or compiling its init (minutes for SD);
    a checkpoint supplies every value."""
    mc = config.model
    unet_cfg = (read_config(os.path.join(fs.local_copy(mc.teacher), "unet")) if mc.teacher
                else dict(mc.unet.to_dict()))
    if uses_w_embedding(config):
        unet_cfg = {**unet_cfg, "time_cond_proj_dim": mc.time_cond_proj_dim}
    unet = UNet2DConditionModel.from_config(unet_cfg, dtype=dtype(mc.compute_dtype))
    shapes = unet_shapes(unet)
    if config.method == "lcm_lora":  # init_lora reads only the kernels' shapes
        lora = lora_lib.init_lora(jax.random.PRNGKey(0), shapes, config.lora.rank)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora)
    return unet, shapes
