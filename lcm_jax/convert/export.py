"""Writing trained weights back in diffusers' formats: a complete pipeline folder around a UNet
(the teacher's other parts copied, an LCMScheduler config for a distilled LCM), and LoRA files.

Takes weights and folder paths, never a training config: the CLI reads the run and passes what
is needed.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

from lcm_jax.convert.lora import save_lora_peft
from lcm_jax.convert.unet import unet_to_diffusers

LORA_FILE = "pytorch_lora_weights.safetensors"
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer")
# The LCMScheduler fields a teacher's scheduler config may carry over (diffusers' signature).
LCM_SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                      "trained_betas", "clip_sample", "clip_sample_range", "set_alpha_to_one",
                      "steps_offset", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
                      "sample_max_value", "timestep_spacing", "rescale_betas_zero_snr")


def export_pipeline(params: Any, unet_config: Any, out: str, teacher: Optional[str],
                    lcm_grid: Optional[tuple[int, float]] = None) -> str:
    """out/unet; with a teacher folder also its vae/text_encoder/tokenizer, its scheduler config
    (an LCMScheduler one when `lcm_grid` = (original_inference_steps, timestep_scaling) is given)
    and model_index.json, so that the result is a complete pipeline folder. Returns what it wrote."""
    unet_to_diffusers(params, unet_config, os.path.join(out, "unet"))
    if not teacher:
        return "unet/ only (the run's teacher is a random UNet: no VAE or text encoder to copy)"
    for part in PIPELINE_PARTS:
        shutil.copytree(os.path.join(teacher, part), os.path.join(out, part), dirs_exist_ok=True)
    with open(os.path.join(teacher, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    with open(os.path.join(teacher, "model_index.json")) as f:
        index = json.load(f)
    if lcm_grid is not None:
        sched, index = lcm_scheduler_config(sched, *lcm_grid), lcm_model_index(index)
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    _write_json(sched, os.path.join(out, "scheduler", "scheduler_config.json"))
    _write_json(index, os.path.join(out, "model_index.json"))
    return f"a pipeline folder (unet/ from the run, {', '.join(PIPELINE_PARTS)} from {teacher})"


def lcm_scheduler_config(teacher: dict, original_inference_steps: int, timestep_scaling: float) -> dict:
    """LCMScheduler config with the teacher's noise schedule and the run's skipping grid."""
    out = {k: teacher[k] for k in LCM_SCHEDULER_KEYS if k in teacher}
    out.update(_class_name="LCMScheduler", original_inference_steps=original_inference_steps,
               timestep_scaling=timestep_scaling)
    return out


def lcm_model_index(teacher: dict) -> dict:
    index = {k: v for k, v in teacher.items() if not k.startswith("_")}
    for part in ("safety_checker", "feature_extractor", "image_encoder"):
        if part in index:
            index[part] = [None, None]
    index.update(_class_name="LatentConsistencyModelPipeline", scheduler=["diffusers", "LCMScheduler"],
                 requires_safety_checker=False)
    return index


def export_lora(factors: Any, scale: float, out: str) -> str:
    """PEFT/diffusers LoRA safetensors at `out` (a .safetensors path, or a folder for LORA_FILE)."""
    path = out if out.endswith(".safetensors") else os.path.join(out, LORA_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_lora_peft(factors, scale, path)
    return path


def _write_json(obj: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
