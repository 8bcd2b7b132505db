"""Writing trained weights back in diffusers' formats: a complete pipeline folder around a UNet
(the teacher's other parts copied, an LCMScheduler config for a distilled LCM), and LoRA files.

Takes weights and folder paths, never a training config: the CLI reads the run and passes what
is needed. Writes local folders only; a remote destination gets the finished folder copied there.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

from lcm_jax.convert.common import read_config
from lcm_jax.convert.lora import save_lora_kohya, save_lora_peft
from lcm_jax.convert.unet import unet_to_diffusers

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_WRITERS = {"peft": save_lora_peft, "kohya": save_lora_kohya}
NOT_COPIED = ("unet", "scheduler")  # written from the run, not copied from the teacher
# The LCMScheduler fields a teacher's scheduler config may carry over (diffusers' signature).
LCM_SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                      "trained_betas", "clip_sample", "clip_sample_range", "set_alpha_to_one",
                      "steps_offset", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
                      "sample_max_value", "timestep_spacing", "rescale_betas_zero_snr")


def export_pipeline(params: Any, unet_config: Any, out: str, teacher: Optional[str],
                    lcm_grid: Optional[tuple[int, float]] = None,
                    prediction_type: Optional[str] = None) -> str:
    """out/unet; with a teacher folder also every other part its model_index.json lists (vae,
    text encoder(s), tokenizer(s), ...), its scheduler config (an LCMScheduler one when
    `lcm_grid` = (original_inference_steps, timestep_scaling) is given; `prediction_type`, when
    given, replaces the teacher's: what the UNet outputs) and model_index.json, so that the result
    is a complete pipeline folder. Returns what it wrote."""
    if not teacher:
        unet_to_diffusers(params, unet_config, os.path.join(out, "unet"))
        return "unet/ only (the run's teacher is a random UNet: no VAE or text encoder to copy)"
    sched = read_config(os.path.join(teacher, "scheduler"), "scheduler_config.json")
    index = read_config(teacher, "model_index.json")
    if lcm_grid is not None:
        sched, index = lcm_scheduler_config(sched, *lcm_grid), lcm_model_index(index)
    if prediction_type:
        sched = {**sched, "prediction_type": prediction_type}
    parts = pipeline_parts(index, teacher)  # checked before anything is written
    unet_to_diffusers(params, unet_config, os.path.join(out, "unet"))
    for part in parts:
        shutil.copytree(os.path.join(teacher, part), os.path.join(out, part), dirs_exist_ok=True)
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    _write_json(sched, os.path.join(out, "scheduler", "scheduler_config.json"))
    _write_json(index, os.path.join(out, "model_index.json"))
    return f"a pipeline folder (unet/ from the run, {', '.join(parts)} from {teacher})"


def pipeline_parts(index: dict, teacher: str) -> list[str]:
    """The sub-folders of `teacher` that a pipeline with model_index `index` needs copied: every
    listed component but the UNet and the scheduler, skipping absent ([null, null]) ones."""
    parts = [k for k, v in index.items() if not k.startswith("_") and k not in NOT_COPIED
             and isinstance(v, list) and len(v) == 2 and v[1] is not None]
    missing = [p for p in parts if not os.path.isdir(os.path.join(teacher, p))]
    if missing:
        raise FileNotFoundError(f"{teacher}/model_index.json lists {missing} but the folder has no "
                                f"{'/, '.join(missing)}/; give the complete teacher pipeline folder")
    return sorted(parts)


def lcm_scheduler_config(teacher: dict, original_inference_steps: int, timestep_scaling: float) -> dict:
    """LCMScheduler config with the teacher's noise schedule and the run's skipping grid."""
    out = {k: teacher[k] for k in LCM_SCHEDULER_KEYS if k in teacher}
    out.update(_class_name="LCMScheduler", original_inference_steps=original_inference_steps,
               timestep_scaling=timestep_scaling)
    return out


def lcm_model_index(teacher: dict) -> dict:
    """The teacher's model_index.json for its distilled LCM: an LCMScheduler, no safety checker;
    SD 1/2 become a LatentConsistencyModelPipeline, SDXL (text_encoder_2) stays the teacher's
    StableDiffusionXLPipeline (diffusers samples LCM-SDXL with it and an LCMScheduler)."""
    index = {k: v for k, v in teacher.items() if not k.startswith("_")}
    for part in ("safety_checker", "feature_extractor", "image_encoder"):
        if part in index:
            index[part] = [None, None]
    sdxl = (index.get("text_encoder_2") or [None, None])[1] is not None
    if not sdxl:
        index.update(_class_name="LatentConsistencyModelPipeline", requires_safety_checker=False)
    else:
        index["_class_name"] = teacher.get("_class_name", "StableDiffusionXLPipeline")
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    return index


def export_lora(factors: Any, scale: float, out: str, lora_format: str = "peft") -> str:
    """LoRA safetensors at `out` (a .safetensors path, or a folder for LORA_FILE), as PEFT/
    diffusers keys (lora_A/lora_B, scale folded into B) or kohya/A1111 ones (lora_down/lora_up
    and alpha). Both load with diffusers' `load_lora_weights` and lcm-jax's `load_lora`."""
    if lora_format not in LORA_WRITERS:
        raise ValueError(f"LoRA format {lora_format!r} unknown; choose one of {sorted(LORA_WRITERS)}")
    path = out if out.endswith(".safetensors") else os.path.join(out, LORA_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    LORA_WRITERS[lora_format](factors, scale, path)
    return path


def _write_json(obj: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
