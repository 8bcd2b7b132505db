"""A training run seen from inference: the LCMPipeline over a run's student.

This module and the CLI are the only places that know both the trainer (`lcm_jax.training`) and
the pipeline (`lcm_jax.pipeline`); neither of those imports the other.
"""
from __future__ import annotations

from lcm_jax.components import Components
from lcm_jax.models import lora as lora_lib
from lcm_jax.pipeline import LCMPipeline
from lcm_jax.training.models import Models, student_schedule
from lcm_jax.training.state import TrainState, sampling_params


def pipeline_from_training(config, models: Models, state: TrainState) -> LCMPipeline:
    """An LCMPipeline over a training run's student: its `sampling_params` (the slow eval EMA, else
    the EMA target, else the weights), LoRA factors merged into the teacher for LCM-LoRA; its
    scheduler reads the output as the student's prediction type."""
    if config.method == "lcm_lora":
        params = lora_lib.merge(models.frozen["teacher"], sampling_params(state),
                                config.lora.alpha / config.lora.rank)
    else:
        params = sampling_params(state)
    # The LCM sampler picks its steps from the grid the student was distilled on (N DDIM steps).
    grid = {} if config.method == "diffusion" else {
        "original_inference_steps": int(config.loss.num_ddim_timesteps)}
    comps = Components(models.unet, params, models.vae, models.frozen["vae"], models.text_encoder,
                       models.frozen["text_encoder"], models.tokenizer,
                       student_schedule(config, models.schedule), grid,
                       models.text_encoder_2, models.frozen.get("text_encoder_2"), models.tokenizer_2,
                       force_zeros_for_empty_prompt=models.text_encoder_2 is not None)
    return LCMPipeline(comps)
