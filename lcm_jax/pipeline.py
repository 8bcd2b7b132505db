"""LCMPipeline: tokenizer + text encoder + jitted few-step sampler + VAE decode.

    pipe = LCMPipeline.from_pretrained("path/to/diffusers/pipeline")
    images = pipe("a red circle", num_inference_steps=4, guidance_scale=8.5)  # (B,H,W,3) in [0,1]

A UNet with `time_cond_proj_dim` (a distilled LCM) is conditioned on w = guidance_scale - 1 and
runs without classifier-free guidance, as diffusers' LatentConsistencyModelPipeline; a plain UNet
(a teacher, or SD + LCM-LoRA) uses classifier-free guidance when guidance_scale > 1, as
StableDiffusionPipeline. An SDXL folder (text_encoder_2/, tokenizer_2/) is conditioned as
StableDiffusionXLPipeline: both encoders' penultimate states, the pooled text embeds and the
(height, width, 0, 0, height, width) micro-conditioning. The whole sample (all UNet steps and the
VAE decode) is one XLA program, compiled once per (sampler, steps, batch, size), and kept in XLA's
persistent compilation cache when the caller enables it (`lcm_jax.compilation`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import edits, hub, sampling, schedules
from lcm_jax.components import (Components, decode_latents, load_any_vae, load_components,
                                sdxl_text_embeddings, sdxl_time_ids, text_embeddings, with_vae)
from lcm_jax.convert.common import WeightsError

SAMPLERS = sampling.SAMPLERS
# A pipeline folder's recommended sampling settings (every key optional), beside model_index.json:
# a file of its own, because diffusers reads every key of model_index.json as a component.
DEFAULTS_FILE = "lcm_jax_defaults.json"
BUILTIN_DEFAULTS = {"height": 512, "width": 512, "num_inference_steps": 4, "guidance_scale": 8.5,
                    "sampler": "lcm"}


def sampling_defaults(folder: str) -> dict:
    """BUILTIN_DEFAULTS updated with the folder's lcm_jax_defaults.json when it has one."""
    path = os.path.join(folder, DEFAULTS_FILE)
    if not os.path.exists(path):
        return dict(BUILTIN_DEFAULTS)
    try:
        with open(path) as f:
            found = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    unknown = sorted(set(found) - set(BUILTIN_DEFAULTS)) if isinstance(found, dict) else found
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(BUILTIN_DEFAULTS)}")
    return {**BUILTIN_DEFAULTS, **found}


@dataclasses.dataclass(frozen=True)
class _Run:
    """One call's sampling arguments (`edit`: (kind, starts from pure noise) or None)."""
    sampler: str
    ts: np.ndarray
    num_inference_steps: Optional[int]
    guidance_scale: float
    negative_prompt: Optional[Union[str, Sequence[str]]]
    gamma: float
    seed: int
    noises: Optional[np.ndarray]
    debug: bool
    compile: str
    edit: Optional[tuple] = None
    control: Optional[tuple] = None   # (ControlNet image (B, H, W, 3) in [0, 1], conditioning scale)


def default_dtype() -> jnp.dtype:
    """The sampling dtype (params and compute) where none is asked for: bfloat16 on GPU and TPU
    (half the memory, their fast matmul type), float32 on CPU (no bf16 speed-up there)."""
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def check_call(num_inference_steps: int, guidance_scale: float, height: int, width: int,
               sampler: str, factor: int = 8) -> None:
    """The call's arguments, before anything is loaded or compiled; `factor` is the VAE's."""
    if int(num_inference_steps) < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if not (0 <= guidance_scale < float("inf")):  # also NaN
        raise ValueError(f"guidance_scale must be >= 0 and finite, got {guidance_scale}")
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {factor} (the VAE's "
                         f"downsampling factor), got {height}x{width}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} unknown; choose one of {SAMPLERS}")


def with_controlnet(unet_fn, apply_controlnet, control: Optional[tuple], image: Optional[jax.Array]):
    """A UNet call `unet_fn(x, t, text, t_cond, added, residuals)` with a ControlNet's residuals
    added (`control` = (its params, conditioning scale); `image` repeated for a CFG batch of 2B);
    as diffusers, the ControlNet sees the 4-channel latents and the prompt, not the guidance
    embedding."""
    if image is None:
        return unet_fn
    params, scale = control

    def fn(x, t, text, t_cond, added):
        images = jnp.concatenate([image] * (x.shape[0] // image.shape[0]))
        return unet_fn(x, t, text, t_cond, added, apply_controlnet(params, x, t, text, images, scale, added))

    return fn


def check_steps(sampler: str, num_inference_steps: int, scheduler_config: dict,
                original_inference_steps: Optional[int] = None) -> None:
    """LCM picks its steps from a skipping grid of original_inference_steps (the scheduler
    config's, else 50): more steps than that is refused, in the sampler's terms."""
    grid = original_inference_steps or int(scheduler_config.get("original_inference_steps", 50))
    if sampler == "lcm" and num_inference_steps > grid:
        raise ValueError(f"num_inference_steps={num_inference_steps} is more than the LCM "
                         f"sampler's {grid} original_inference_steps; use at most {grid}")


class LCMPipeline:
    """Text-to-image with a latent consistency model (or its teacher, for baselines)."""

    def __init__(self, components: Components):
        # Weights become device arrays once, here (which reads the memory-mapped files): a call
        # then passes device buffers instead of converting host arrays every time.
        weights = ("unet_params", "vae_params", "text_params", "text_params_2", "controlnet_params")
        self.components = components = dataclasses.replace(components, **{
            k: jax.device_put(getattr(components, k)) for k in weights
            if getattr(components, k) is not None})
        self.unet_params = components.unet_params
        self.vae_factor = components.vae.downsample_factor
        self._adapters: dict = {}    # unfused LoRAs by adapter name
        self._active: dict = {}      # adapter name -> weight, for those the sampler merges
        self._compiled: dict = {}

    @classmethod
    def from_pretrained(cls, folder: str, dtype=None, variant: Optional[str] = None,
                        controlnet: Optional[str] = None, vae: Optional[str] = None) -> "LCMPipeline":
        """The pipeline of a diffusers folder (local, gs:// or a Hub id); `controlnet`: a
        diffusers ControlNetModel folder or Hub id to condition on (`load_controlnet`); `vae`: an
        AutoencoderTiny (TAESD, e.g. "madebyollin/taesd") or AutoencoderKL folder / Hub id that
        replaces the folder's VAE (as diffusers' `vae=` argument). `dtype` (params and compute):
        default `default_dtype()`."""
        dtype = default_dtype() if dtype is None else dtype
        components = load_components(folder, dtype=dtype, variant=variant)
        if vae is not None:
            components = with_vae(components, *load_any_vae(vae, dtype=dtype), source=vae)
        pipe = cls(components)
        if controlnet is not None:
            pipe.load_controlnet(controlnet, variant=variant)
        return pipe

    def load_controlnet(self, path: str, variant: Optional[str] = None) -> None:
        """Loads a diffusers ControlNetModel folder (or Hub id) made for this UNet, in the UNet's
        dtype; calls then take its conditioning image (`image=` / `control_image=`)."""
        from lcm_jax.convert.controlnet import load_controlnet

        folder = hub.local_folder(path, variant)
        model, params = load_controlnet(folder, dtype=self.components.unet.dtype, variant=variant)
        unet_cfg = self.components.unet.config
        for key in ("block_out_channels", "layers_per_block", "down_block_types"):
            if getattr(model.config, key) != getattr(unet_cfg, key):
                raise WeightsError(f"{folder}: the ControlNet's {key} {getattr(model.config, key)} differs "
                                   f"from the UNet's {getattr(unet_cfg, key)}; it was made for another "
                                   "base model")
        self.components = dataclasses.replace(self.components, controlnet=model,
                                              controlnet_params=jax.device_put(params))
        self._compiled.clear()
        self.__dict__.pop("_jitted_parts", None)

    # ----------------------------------------------------------------------------- LoRA
    def load_lora_weights(self, path: str, fuse: bool = True, scale: float = 1.0,
                          adapter_name: Optional[str] = None) -> None:
        """Adds LoRA weights (PEFT/diffusers or kohya safetensors) to the UNet.

        fuse=True merges them into the UNet's kernels once at weight `scale`; fuse=False keeps
        the factors as adapter `adapter_name` (default 'default_<n>', as diffusers), active at
        weight `scale` until `set_adapters` changes that, and merges the active adapters inside
        the jitted sampler (the same numbers; the base weights stay untouched).
        """
        from lcm_jax.convert.lora import load_lora

        factors, alpha_scale = load_lora(path, self.components.unet_params)
        if fuse:
            self._fuse([(factors, scale * alpha_scale)])
            return
        name = adapter_name or f"default_{len(self._adapters)}"
        if name in self._adapters:
            raise ValueError(f"adapter_name {name!r} is already loaded ({sorted(self._adapters)}); pick another")
        self._adapters[name] = jax.tree.map(lambda a: a * alpha_scale, factors)
        self._active[name] = float(scale)
        self._compiled.clear()

    def set_adapters(self, adapter_names: Union[str, Sequence[str]],
                     adapter_weights: Union[None, float, Sequence[float]] = None) -> None:
        """Which unfused LoRAs the sampler merges, and at which weights (default 1.0 each), as
        diffusers' set_adapters; the others stay loaded, inactive."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self._adapters]
        if unknown:
            raise ValueError(f"adapters {unknown} are not loaded; loaded (unfused): {sorted(self._adapters)}")
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else (
            [1.0 if adapter_weights is None else adapter_weights] * len(names))
        if len(weights) != len(names):
            raise ValueError(f"{len(weights)} adapter_weights for {len(names)} adapter_names; give one each")
        self._active = {n: float(w) for n, w in zip(names, weights)}

    def fuse_lora(self) -> None:
        """Merges the active adapters at their weights into the UNet's kernels (one merge, no
        per-call cost); they are then no longer separate adapters."""
        self._fuse([(self._adapters.pop(n), w) for n, w in self._active.items()])
        self._active = {}

    def _fuse(self, adapters) -> None:
        from lcm_jax.models import lora as lora_lib

        self.unet_params = jax.jit(lora_lib.merge_adapters)(self.unet_params, adapters)
        self._compiled.clear()

    def _unfused(self) -> Optional[tuple]:
        """((factors, weight), ...) of the active unfused adapters, or None."""
        return tuple((self._adapters[n], jnp.float32(w)) for n, w in self._active.items()) or None

    def unet_call_params(self):
        """(UNet params, the active unfused adapters ((factors, weight), ...) or None): what the
        sampler's UNet call receives."""
        return self.unet_params, self._unfused()

    # ----------------------------------------------------------------------------- text
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[jax.Array, Optional[jax.Array]]:
        """(embeddings (B, 77, D) the UNet attends to, pooled (B, P) or None); warns about
        truncated prompts. SD 1.x/2.x: CLIP's last hidden state and no pooled embeds; SDXL: see
        `sdxl_text_embeddings`."""
        ids = [self._token_ids(tok, prompts) for tok in (self.components.tokenizer, self.components.tokenizer_2)
               if tok is not None]
        params = (self.components.text_params, self.components.text_params_2)
        return self._text_fn(params, *ids)

    @staticmethod
    def _token_ids(tokenizer, prompts: Sequence[str]) -> jax.Array:
        from lcm_jax.convert.clip import encode_prompt_ids

        ids, truncated = encode_prompt_ids(tokenizer, list(prompts))
        for p in truncated:
            warnings.warn(f"prompt truncated to {ids.shape[1]} tokens (CLIP's limit): {p!r}")
        return jnp.asarray(ids)

    @functools.cached_property
    def _text_fn(self):
        te, te2 = self.components.text_encoder, self.components.text_encoder_2
        if te2 is None:
            return jax.jit(lambda p, ids: text_embeddings(te, p[0], ids))
        return jax.jit(lambda p, ids1, ids2: sdxl_text_embeddings(te, p[0], te2, p[1], ids1, ids2))

    def encode_negative_prompt(self, negative_prompt, text: jax.Array, pooled: Optional[jax.Array]):
        """The unconditional side of CFG: the encoded negative prompt ("" when none), or zeros
        when there is none and the pipeline sets force_zeros_for_empty_prompt (SDXL)."""
        b = text.shape[0]
        if negative_prompt is None and self.components.force_zeros_for_empty_prompt:
            return jnp.zeros_like(text), (None if pooled is None else jnp.zeros_like(pooled))
        neg = negative_prompt if negative_prompt is not None else ""
        return self.encode_prompt([neg] * b if isinstance(neg, str) else list(neg))

    # ----------------------------------------------------------------------------- sampling
    def timesteps(self, sampler: str, num_inference_steps: int,
                  original_inference_steps: Optional[int] = None,
                  timesteps: Optional[Sequence[int]] = None, strength: float = 1.0,
                  lcm_img2img: bool = False) -> np.ndarray:
        """The sampler's timesteps from this pipeline's scheduler config
        (`schedules.sampler_timesteps`). img2img/inpainting (strength < 1): with `lcm_img2img` (a
        w-conditioned LCM, as LatentConsistencyModelImg2ImgPipeline) LCM/TCD pick
        `num_inference_steps` from the strength-limited grid; otherwise (as
        StableDiffusionImg2Img/InpaintPipeline) the last int(num_inference_steps x strength)."""
        schedules.check_strength(strength)
        if timesteps is None:
            check_steps(sampler, num_inference_steps, self.components.scheduler_config,
                        original_inference_steps)
        ts = schedules.sampler_timesteps(sampler, num_inference_steps, self.components.scheduler_config,
                                         self.components.schedule.num_train_timesteps,
                                         original_inference_steps, timesteps,
                                         strength if lcm_img2img else 1.0)
        return ts if lcm_img2img else schedules.img2img_timesteps(ts, strength)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """NHWC shape of the starting noise for images of height x width."""
        f = self.vae_factor
        return (batch, height // f, width // f, self.components.vae.latent_channels)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents -> images in [0, 1] (the compiled VAE decode)."""
        return self._jitted_parts[1](self.components.vae_params, latents)

    @functools.cached_property
    def _jitted_parts(self):
        """The UNet call, the VAE decode and the ControlNet call compiled on their own
        (compile='model')."""
        return (jax.jit(self.apply_unet), jax.jit(functools.partial(decode_latents, self.components.vae)),
                jax.jit(self.apply_controlnet))

    def apply_unet(self, params, x, t, text, t_cond, added=None, residuals=None):
        """The UNet's output for latents x at timesteps t (no guidance); `residuals`: a
        ControlNet's (down residuals, mid residual)."""
        down, mid = (None, None) if residuals is None else residuals
        return self.components.unet.apply({"params": params}, x, t, text, timestep_cond=t_cond,
                                          added_cond_kwargs=added, down_block_additional_residuals=down,
                                          mid_block_additional_residual=mid)

    def apply_controlnet(self, params, x, t, text, image, scale, added=None):
        """The ControlNet's (down residuals, mid residual) for latents x and its image."""
        return self.components.controlnet.apply({"params": params}, x, t, text, image, scale,
                                                added_cond_kwargs=added)

    def _generate_fn(self, sampler: str, ts: tuple, use_cfg: bool, gamma: float, compile: str,
                     num_inference_steps: Optional[int] = None, edit: Optional[tuple] = None):
        schedule = self.components.schedule
        w_dim = self.components.unet.config.time_cond_proj_dim
        dpm = sampling.dpm_options(self.components.scheduler_config)
        ts = np.asarray(ts)
        if compile == "model":
            apply_unet, decode, apply_controlnet = self._jitted_parts
        else:
            apply_unet, decode, apply_controlnet = (self.apply_unet, functools.partial(
                decode_latents, self.components.vae), self.apply_controlnet)

        def noised(z0, noise):
            return sampling.noised_latents(sampler, z0, noise, schedule, ts,
                                           num_inference_steps=num_inference_steps, **dpm)

        def generate(unet_params, vae_params, lora, cond, latents, w, rng, noises, control=None):
            from lcm_jax.models import layers
            from lcm_jax.models import lora as lora_lib

            if lora is not None:
                unet_params = lora_lib.merge_adapters(unet_params, lora)
            text, uncond, added, uncond_added, edit_inputs, control_image = cond
            blend = extra = None
            if edit is not None:
                latents, blend, extra = edits.start_latents(edit[0], self.components.vae, vae_params,
                                                            edit_inputs, latents, noised, edit[1])
            unet = edits.with_extra_channels(lambda x, *a: apply_unet(unet_params, x, *a), extra)
            unet = with_controlnet(unet, apply_controlnet, control, control_image)
            if use_cfg:  # one batch of 2B: unconditional rows first, as diffusers
                text2, added2 = jax.tree.map(lambda u, c: jnp.concatenate([u, c]),
                                             (uncond, uncond_added), (text, added))
                model_fn = sampling.cfg_model_fn(lambda x, t: unet(x, t, text2, None, added2), w)
            else:
                t_cond = None if w_dim is None else layers.guidance_scale_embedding(
                    jnp.full((latents.shape[0],), w - 1.0), w_dim)
                model_fn = lambda x, t: unet(x, t, text, t_cond, added)
            z = sampling.sample(sampler, model_fn, latents, schedule, ts, rng, gamma=gamma, noises=noises,
                                debug=compile != "whole", num_inference_steps=num_inference_steps,
                                dpm=dpm, blend=blend)
            return decode(vae_params, z)

        return jax.jit(generate) if compile == "whole" else generate

    def __call__(self, prompt: Union[str, Sequence[str]], num_inference_steps: int = 4,
                 guidance_scale: float = 8.5, height: int = 512, width: int = 512,
                 latents: Optional[np.ndarray] = None, seed: int = 0,
                 original_inference_steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
                 negative_prompt: Optional[Union[str, Sequence[str]]] = None,
                 sampler: str = "lcm", gamma: float = 0.3, noises: Optional[np.ndarray] = None,
                 debug: bool = False, compile: str = "whole", image=None,
                 controlnet_conditioning_scale: float = 1.0) -> np.ndarray:
        """Images (B, H, W, 3) float32 in [0, 1]. `latents` (NHWC) replace the seeded noise;
        `noises` (steps, B, h, w, c) replace the re-noising draws of LCM/TCD (for comparisons).
        `image`: the loaded ControlNet's conditioning image ((B,) height, width, 3 in [0, 1],
        uint8 or PIL), its residuals scaled by `controlnet_conditioning_scale` (guess mode off),
        as StableDiffusion(XL)ControlNetPipeline.

        compile: 'whole' (the sample is one XLA program, compiled per sampler and step count),
        'model' (only the UNet call and the VAE decode are compiled, once for every sampler and
        step count: for sweeps), or 'none' (eager; also `debug=True`).
        """
        check_call(num_inference_steps, guidance_scale, height, width, sampler, self.vae_factor)
        ts = self.timesteps(sampler, num_inference_steps, original_inference_steps, timesteps)
        run = _Run(sampler, ts, None, guidance_scale, negative_prompt, gamma, seed, noises, debug, compile,
                   control=self._control(image, controlnet_conditioning_scale, height, width))
        return self._generate(prompt, height, width, latents, run)

    def img2img(self, prompt: Union[str, Sequence[str]], image, strength: float = 0.8,
                num_inference_steps: int = 4, guidance_scale: float = 8.5, seed: int = 0,
                original_inference_steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
                negative_prompt: Optional[Union[str, Sequence[str]]] = None, sampler: str = "lcm",
                gamma: float = 0.3, noise: Optional[np.ndarray] = None,
                posterior_noise: Optional[np.ndarray] = None, noises: Optional[np.ndarray] = None,
                debug: bool = False, compile: str = "whole", control_image=None,
                controlnet_conditioning_scale: float = 1.0) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1] from `image` ((B,) H, W, 3 in [0, 1], uint8 or PIL; its
        size is the output's) noised to `strength` and denoised towards `prompt`: a w-conditioned
        LCM as LatentConsistencyModelImg2ImgPipeline, any other UNet (teacher, LCM-LoRA) as
        StableDiffusionImg2ImgPipeline (`timesteps`). `noise` (added to the image's latents),
        `posterior_noise` (the VAE encode's draw) and `noises` replace the seeded draws.
        `control_image`: the loaded ControlNet's image (as StableDiffusionControlNetImg2ImgPipeline)."""
        images = edits.as_images(image, self.vae_factor)
        check_call(num_inference_steps, guidance_scale, *images.shape[1:3], sampler, self.vae_factor)
        w_cond = self.components.unet.config.time_cond_proj_dim is not None
        ts = self.timesteps(sampler, num_inference_steps, original_inference_steps, timesteps, strength,
                            lcm_img2img=w_cond)
        run = _Run(sampler, ts, num_inference_steps, guidance_scale,
                   negative_prompt, gamma, seed, noises, debug, compile, ("img2img", False),
                   self._control(control_image, controlnet_conditioning_scale, *images.shape[1:3]))
        return self._generate(prompt, images.shape[1], images.shape[2], noise, run,
                              {"image": images, "posterior_noise": posterior_noise})

    def inpaint(self, prompt: Union[str, Sequence[str]], image, mask_image, strength: float = 1.0,
                num_inference_steps: int = 4, guidance_scale: float = 8.5, seed: int = 0,
                original_inference_steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
                negative_prompt: Optional[Union[str, Sequence[str]]] = None, sampler: str = "lcm",
                gamma: float = 0.3, noise: Optional[np.ndarray] = None,
                posterior_noise: Optional[np.ndarray] = None,
                masked_posterior_noise: Optional[np.ndarray] = None, noises: Optional[np.ndarray] = None,
                debug: bool = False, compile: str = "whole", control_image=None,
                controlnet_conditioning_scale: float = 1.0) -> np.ndarray:
        """`image` with the region where `mask_image` >= 0.5 repainted towards `prompt`, as
        StableDiffusionInpaintPipeline: a 9-channel (SD inpainting) UNet sees the mask and the
        masked image's latents at every step; a 4-channel one (LCM, LCM-LoRA, a teacher) keeps
        the unmasked region by blending in the image's latents noised to each next timestep.
        strength 1 starts from pure noise. `noise`, `posterior_noise` (the image's encode),
        `masked_posterior_noise` (the masked image's, 9 channels) and `noises` replace the
        seeded draws. `control_image`: the loaded ControlNet's image."""
        images = edits.as_images(image, self.vae_factor)
        check_call(num_inference_steps, guidance_scale, *images.shape[1:3], sampler, self.vae_factor)
        mask = edits.as_mask(mask_image, images)
        in_ch, latent_ch = self.components.unet.config.in_channels, self.components.vae.latent_channels
        if in_ch not in (latent_ch, 2 * latent_ch + 1):
            raise ValueError(f"inpainting needs a UNet of {latent_ch} or {2 * latent_ch + 1} input channels "
                             f"(latents, or latents + mask + masked-image latents); this one has {in_ch}")
        kind = "inpaint" if in_ch == latent_ch else "inpaint9"
        ts = self.timesteps(sampler, num_inference_steps, original_inference_steps, timesteps, strength)
        run = _Run(sampler, ts, num_inference_steps, guidance_scale,
                   negative_prompt, gamma, seed, noises, debug, compile, (kind, strength == 1.0),
                   self._control(control_image, controlnet_conditioning_scale, *images.shape[1:3]))
        return self._generate(prompt, images.shape[1], images.shape[2], noise, run,
                              {"image": images, "mask": mask, "posterior_noise": posterior_noise,
                               "masked_posterior_noise": masked_posterior_noise})

    def _check_negative_prompt(self, negative_prompt, guidance_scale: float) -> bool:
        """Whether the run uses CFG; a negative prompt it would ignore is an error (diffusers
        drops it silently)."""
        w_dim = self.components.unet.config.time_cond_proj_dim
        if negative_prompt is not None and w_dim is not None:
            raise ValueError("negative_prompt has no effect with this w-conditioned LCM (its UNet has "
                             "time_cond_proj_dim: guidance is an input, not CFG); drop negative_prompt, "
                             "or sample a teacher / LCM-LoRA UNet with guidance_scale > 1")
        if negative_prompt is not None and guidance_scale <= 1.0:
            raise ValueError(f"negative_prompt has no effect at guidance_scale={guidance_scale} (no "
                             f"classifier-free guidance at <= 1); raise guidance_scale or drop negative_prompt")
        return w_dim is None and guidance_scale > 1.0

    def _control(self, image, scale: float, height: int, width: int) -> Optional[tuple]:
        """(the ControlNet's image (B, H, W, 3) in [0, 1], scale), checked; None without one."""
        loaded = self.components.controlnet is not None
        if image is None and not loaded:
            return None
        if image is None or not loaded:
            raise ValueError("a ControlNet was loaded: pass its conditioning image (image= / control_image=)"
                             if loaded else "image= / control_image= is a ControlNet's conditioning image, "
                             "but none is loaded; use from_pretrained(path, controlnet=DIR)")
        if not (0 <= scale < float("inf")):
            raise ValueError(f"controlnet_conditioning_scale must be >= 0 and finite, got {scale}")
        images = edits.as_images(image, self.vae_factor)
        if images.shape[1:3] != (height, width):
            raise ValueError(f"the ControlNet image is {images.shape[1]}x{images.shape[2]} but the output "
                             f"is {height}x{width}; resize it or pass height/width to match")
        return images, float(scale)

    def _generate(self, prompt, height: int, width: int, latents: Optional[np.ndarray], run: "_Run",
                  edit_inputs: Optional[dict] = None) -> np.ndarray:
        """Encode the prompts, draw what is not given, compile (once per key) and run."""
        compile = "none" if run.debug else run.compile
        if compile not in ("whole", "model", "none"):
            raise ValueError(f"compile must be 'whole', 'model' or 'none', got {compile!r}")
        use_cfg = self._check_negative_prompt(run.negative_prompt, run.guidance_scale)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is an empty list; give a string or a list of at least one")
        text, pooled = self.encode_prompt(prompts)
        b = len(prompts)
        uncond = uncond_pooled = added = uncond_added = None
        if use_cfg:
            uncond, uncond_pooled = self.encode_negative_prompt(run.negative_prompt, text, pooled)
        if pooled is not None:
            time_ids = jnp.asarray(sdxl_time_ids(b, height, width))
            added = {"text_embeds": pooled, "time_ids": time_ids}
            if use_cfg:
                uncond_added = {"text_embeds": uncond_pooled, "time_ids": time_ids}
        shape = self.latent_shape(b, height, width)
        rng = jax.random.PRNGKey(run.seed)
        rng_lat, rng_steps = jax.random.split(rng)
        latents = self._given_or_drawn(latents, rng_lat, shape, "latents" if run.edit is None else "noise")
        if edit_inputs is not None:
            edit_inputs = self._edit_inputs(edit_inputs, b, shape, rng)
        key = (run.sampler, tuple(int(t) for t in run.ts), use_cfg, run.gamma, compile, run.noises is None,
               run.num_inference_steps, run.edit, run.control is not None)
        if key not in self._compiled:
            self._compiled[key] = self._generate_fn(*key[:5], run.num_inference_steps, run.edit)
        control_image = None if run.control is None else jnp.asarray(edits.batched(run.control[0], b, "image"))
        params, lora_arg = self.unet_call_params()
        control = None if run.control is None else (self.components.controlnet_params, jnp.float32(run.control[1]))
        (params, vae_params, lora_arg, control), cond, latents = self._place(
            (params, self.components.vae_params, lora_arg, control),
            (text, uncond, added, uncond_added, edit_inputs, control_image), latents)
        args = (params, vae_params, lora_arg, cond, latents, jnp.float32(run.guidance_scale), rng_steps,
                None if run.noises is None else jnp.asarray(run.noises, jnp.float32), control)
        images = self._compiled[key](*args)
        return np.asarray(jax.device_get(images), np.float32)

    def _given_or_drawn(self, given, rng, shape, what: str) -> jax.Array:
        """`given` (checked to be NHWC `shape`) or standard normal draws from `rng`."""
        if given is None:
            return jax.random.normal(rng, shape, jnp.float32)
        if tuple(np.shape(given)) != shape:
            raise ValueError(f"{what} have shape {tuple(np.shape(given))}, expected {shape} "
                             f"(NHWC, height/{self.vae_factor} x width/{self.vae_factor})")
        return jnp.asarray(given, jnp.float32)

    def _edit_inputs(self, inputs: dict, batch: int, shape, rng) -> dict:
        """Image and mask repeated to the batch; the VAE encodes' draws given or seeded."""
        out = {}
        for i, (name, value) in enumerate(sorted(inputs.items())):
            if name.endswith("posterior_noise"):
                out[name] = self._given_or_drawn(value, jax.random.fold_in(rng, i + 1), shape, name)
            else:
                out[name] = jnp.asarray(edits.batched(value, batch, name))
        return out

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
