"""The trainer's parts, one job per module: models (teacher, student, frozen parts), state
(TrainState, optimizer, EMA), step (encode, loss, update, eval), checkpoints (orbax, `restore`),
metrics (metrics.jsonl, TensorBoard, progress), samples (grids during training). The entry
point `lcm_jax.train` puts them together; nothing here imports the pipeline."""
