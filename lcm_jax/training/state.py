"""The training state, its optimizer and its EMA: what a checkpoint holds."""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lcm_jax.training.models import dtype

Params = Any
METHODS = ("lcd", "lcm_lora", "lcf", "tcd", "pcm", "guided", "diffusion")
TARGET_EMA = ("lcd", "lcf", "tcd", "pcm")  # methods whose loss reads an EMA target theta- (and
                                           # LCM-LoRA with loss.lora_target_ema)


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Params                   # what the optimizer updates (student UNet, or LoRA factors)
    target_params: Optional[Params]  # EMA: LCD/LCF's target theta-, or diffusion's weight EMA; else None
    opt_state: Any
    rng: jax.Array                   # base key; step keys are fold_in(rng, step)
    eval_params: Optional[Params] = None  # the slow EMA of params (eval_ema_decay > 0), else None


def sampling_params(state: TrainState) -> Params:
    """The weights that sample, evaluate and export: the slow evaluation EMA when the run keeps
    one (eval_ema_decay), else the target EMA (LCD/LCF/TCD/PCM's theta-, LCM-LoRA's with
    lora_target_ema, or the diffusion weight EMA) when it keeps one, else the trained parameters."""
    if state.eval_params is not None:
        return state.eval_params
    return state.params if state.target_params is None else state.target_params


def loss_target(config, params: Params, target_params: Optional[Params]) -> Params:
    """theta- of the consistency loss: the EMA target network, or the current student itself
    (under the loss's stop-gradient) when none is kept (ema_decay 0, LCM-LoRA without
    lora_target_ema). Diffusion's weight EMA is never a loss target."""
    return target_params if config.method != "diffusion" and target_params is not None else params


def optimizer(learning_rate: float, total_steps: int, *, warmup_steps: int, schedule: str = "constant",
              end_fraction: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              weight_decay: float = 0.0, grad_clip: float = 0.0
              ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after a linear warmup, at a constant rate or cosine-decayed to `end_fraction` of it,
    clipped by global norm when grad_clip > 0; (transformation, learning-rate schedule). Every
    trainer of the project (LCD and teachers, the shapes VAE and text encoder) uses this."""
    warmup = max(warmup_steps, 1)
    if schedule == "constant":
        lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup),
                                   optax.constant_schedule(learning_rate)], [warmup_steps])
    elif schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(total_steps, warmup_steps + 1),
                                                end_value=learning_rate * end_fraction)
    else:
        raise ValueError(f"optim.schedule={schedule!r}; choose 'constant' or 'cosine'")
    tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    return tx, lr


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    oc = config.optim
    return optimizer(oc.learning_rate, config.total_steps, warmup_steps=oc.warmup_steps,
                     schedule=oc.schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps,
                     weight_decay=oc.weight_decay, grad_clip=oc.grad_clip)


def ema_decay(config) -> float:
    """Decay of the EMA kept in TrainState.target_params (0: none is kept).

    LCD/LCF/TCD/PCM: the target network theta- of the consistency loss (config.loss.ema_decay);
    with 0 the target is the current student under stop-gradient. LCM-LoRA: the same, of the LoRA
    factors, only with loss.lora_target_ema (diffusers' recipe has no target).
    Diffusion training: an EMA of the weights, the model a teacher ships with
    (config.diffusion_ema_decay, as diffusers' --use_ema); the loss never reads it.
    """
    if config.method in TARGET_EMA or (config.method == "lcm_lora" and config.loss.get("lora_target_ema", False)):
        return float(config.loss.ema_decay)
    if config.method == "diffusion":
        return float(config.get("diffusion_ema_decay", 0.0))
    return 0.0


def eval_ema_decay(config) -> float:
    """Decay of the slow EMA kept in TrainState.eval_params (config.eval_ema_decay; 0: none): the
    consistency-models recipe of a fast target network and a slow EMA that samples."""
    return float(config.get("eval_ema_decay", 0.0))


def make_init_state(config, tx: optax.GradientTransformation) -> Callable[[Params], TrainState]:
    """init_state(params) -> TrainState at step 0 (the EMAs start equal to the student)."""
    def init_state(params):
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype(config.model.param_dtype)), params)
        target = params if ema_decay(config) > 0 else None
        slow = params if eval_ema_decay(config) > 0 else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, target_params=target,
                          opt_state=tx.init(params), rng=jax.random.PRNGKey(config.seed), eval_params=slow)
    return init_state


def w_midpoint(config) -> float:
    """The middle of the distilled guidance range, w = (w_min + w_max) / 2: where the run's own
    samples and endpoint error are taken."""
    return 0.5 * (config.loss.w_min + config.loss.w_max)


def sampling_guidance(config) -> float:
    """The guidance_scale (diffusers' w + 1) a run's student samples at: the range's midpoint for a
    w-conditioned LCM, 1 (no CFG) for LCM-LoRA."""
    return 1.0 if config.method == "lcm_lora" else 1.0 + w_midpoint(config)
