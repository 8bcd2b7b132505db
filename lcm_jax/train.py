"""Latent consistency distillation (and teacher training) in one jitted, sharded loop.

    python -m lcm_jax.train --config=configs/tiny_lcd.py --workdir=runs/tiny [--config.x=y]

The workdir is the run: it holds config.json, checkpoints/ (orbax), metrics.jsonl, TensorBoard
events and samples/. Launching the same command again resumes from the latest checkpoint, and
the same config and seed give the same numbers (batches and randomness are functions of the step).
The parts live in lcm_jax/training/ (models, state, step, checkpoints, metrics, samples); this
file puts them together in the order of a run: mesh, model, input, shard, update step,
checkpoint, loop.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import ml_collections
from jax.sharding import Mesh

from lcm_jax import fs, sharding
from lcm_jax.compilation import enable_compilation_cache
from lcm_jax.config_checks import check_config
from lcm_jax.data import Source, make_source
from lcm_jax.errors import DEBUG_ENV, LcmError, absl_flags_parser, quiet_advice, report
from lcm_jax.training import checkpoints, latent_cache
from lcm_jax.training.metrics import MetricsWriter, endpoint_text, main_process_print, progress_line
from lcm_jax.training.models import Models, build_models, tokenize_fn, uncond_embeds
from lcm_jax.training.preemption import StopRequest
from lcm_jax.training.samples import make_sample_grid
from lcm_jax.training.state import TrainState, make_init_state, make_optimizer
from lcm_jax.training.step import endpoint_row, make_eval_endpoint, make_eval_loss, make_train_step

EVAL_BATCH_STEP = 2 ** 30   # the fixed eval batch is the source's batch at this step: never trained on


class TrainingError(LcmError, RuntimeError):
    """A run that must stop (non-finite loss, bad config); the last good checkpoint stays."""


class Setup(NamedTuple):
    """Everything a run needs before its first step, placed on the mesh."""
    models: Models
    state: TrainState
    state_sh: Any             # NamedShardings of the state
    frozen: dict              # frozen weights on the mesh (teacher, VAE, text encoders, uncond)
    step_fn: Callable         # jitted train_step(state, frozen, batch) -> (state, metrics)
    eval_fn: Callable         # jitted eval_loss(state, frozen, batch)
    endpoint_fn: Optional[Callable]  # jitted endpoint error, or None
    source: Source


def make_input(config, models: Models, frozen: dict) -> Source:
    """The config's data source; with data.cache_dir, the on-disk latent cache there (made by
    `lcm-jax cache`); with data.cache_size > 0, the one the trainer makes itself
    (`latent_cache.default_dir`, kept across launches). Adds the unconditional embeddings to
    `frozen`."""
    tokenize = tokenize_fn(models)
    if tokenize is not None:
        frozen["uncond_embeds"] = uncond_embeds(models)
    ucfg = models.unet.config
    text_shape = (config.data.text_len, ucfg.cross_attention_dim[0])
    latent_shape = (config.data.latent_size, config.data.latent_size, ucfg.in_channels)
    if config.data.cache_dir:
        source = latent_cache.open_cache(config, config.data.cache_dir)
    elif config.data.cache_size and models.vae is not None:
        source = latent_cache.open_cache(config, latent_cache.build(config, models=models, every_process=True))
    else:
        source = make_source(config, tokenize, latent_shape, text_shape)
    if "uncond_embeds" not in frozen:
        frozen["uncond_embeds"] = source.uncond_embeds()
    return source


class StepParts(NamedTuple):
    """The update step and what it is compiled against: shared by the trainer and the planner
    (`lcm_jax.planning`), which passes abstract params (ShapeDtypeStructs) instead of values."""
    init_state: Callable      # params -> TrainState at step 0
    state_shapes: Any         # the TrainState as ShapeDtypeStructs
    state_sh: Any             # NamedShardings of the state
    frozen_sh: Any            # NamedShardings of the frozen weights
    step_fn: Callable         # jitted train_step(state, frozen, batch) -> (state, metrics)


def build_step(config, models: Models, frozen: dict, mesh: Mesh) -> StepParts:
    """The jitted update step with the shardings of its state, frozen weights and batch."""
    tx, lr_fn = make_optimizer(config)
    init_state = make_init_state(config, tx)
    rules = [tuple(r) for r in config.sharding.rules]
    state_shapes = jax.eval_shape(init_state, models.init_params)
    state_sh = sharding.named(mesh, sharding.param_specs(state_shapes, mesh, rules))
    frozen_sh = sharding.named(mesh, sharding.param_specs(frozen, mesh, rules))
    step_fn = jax.jit(make_train_step(config, models, tx, lr_fn), donate_argnums=(0,),
                      in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
                      out_shardings=(state_sh, sharding.replicated(mesh)))
    return StepParts(init_state, state_shapes, state_sh, frozen_sh, step_fn)


def setup(config, mesh: Mesh) -> Setup:
    """Model, input, shardings and the jitted step; nothing trained yet."""
    # ------------------------------------------------------------------ Model
    models = build_models(config)

    # ------------------------------------------------------------------ Input
    frozen = dict(models.frozen)
    source = make_input(config, models, frozen)

    # ------------------------------------------------------------------ Shard / Update step
    parts = build_step(config, models, frozen, mesh)
    sharding.barrier("lcm_jax_setup")
    frozen = sharding.put_global(frozen, parts.frozen_sh)
    state = jax.jit(parts.init_state, out_shardings=parts.state_sh)(
        sharding.put_global(checkpoints.initial_params(config, models.init_params), parts.state_sh.params))
    eval_fn = jax.jit(make_eval_loss(config, models), out_shardings=sharding.replicated(mesh))
    endpoint_fn = make_eval_endpoint(config, models)
    if endpoint_fn is not None:
        endpoint_fn = jax.jit(endpoint_fn, out_shardings=sharding.replicated(mesh))
    return Setup(models, state, parts.state_sh, frozen, parts.step_fn, eval_fn, endpoint_fn, source)


def abstract(tree, shardings) -> Any:
    """A tree of arrays or ShapeDtypeStructs as ShapeDtypeStructs carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _stream(source: Source, start: int) -> Iterator[dict]:
    """This process's batches from step `start` on: the source's own prefetching iterator
    (decode in worker processes) when it has one, else batch(step) in turn."""
    pi, pc = jax.process_index(), jax.process_count()
    if hasattr(source, "iterate"):
        return source.iterate(start, pi, pc)
    return (source.batch(step, pi, pc) for step in itertools.count(start))


def _check_finite(metrics: dict, step: int) -> None:
    """Stops the run at the first non-finite step. Every process reads the same replicated flag,
    so all stop at the same step."""
    if not bool(metrics["finite"]):
        raise TrainingError(f"non-finite loss or gradient at step {step} (loss="
                            f"{float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])});"
                            " stopping; the last good checkpoint is kept. Lower "
                            "optim.learning_rate or enable optim.grad_clip.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """The whole run. Resumes from workdir's latest checkpoint; returns the final state."""
    check_config(config, jax.process_count(), jax.device_count())  # before anything is written
    resume = checkpoints.check_resume(workdir, config)
    fs.makedirs(workdir)
    enable_compilation_cache(config.compilation_cache_dir or None)  # restarts skip the compile
    is_main = jax.process_index() == 0
    if is_main:
        checkpoints.write_run_config(workdir, config, resume)

    # ------------------------------------------------------------------ Mesh / Model / Input / Shard
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    s = setup(config, mesh)
    source, step_fn = s.source, s.step_fn
    batch_at = lambda step: sharding.shard_batch(
        source.batch(step, jax.process_index(), jax.process_count()), mesh)
    counters = getattr(source, "counters", dict)  # samples a source skipped (corrupt, filtered)

    # ------------------------------------------------------------------ Checkpoint
    mngr = checkpoints.checkpoint_manager(workdir, config)
    restored = checkpoints.restore_checkpoint(mngr, abstract(s.state, s.state_sh))
    state = restored if restored is not None else s.state
    start = int(state.step)
    if restored is not None:
        main_process_print(f"resumed from {workdir}/checkpoints step {start}")

    # ------------------------------------------------------------------ Compile before data
    batch0 = batch_at(start)
    t0 = time.time()
    with jax.set_mesh(mesh):  # attention kernels split the batch over it (layers.dot_product_attention)
        step_fn = step_fn.lower(state, s.frozen, batch0).compile()
    main_process_print(f"compiled train step in {time.time() - t0:.1f}s; mesh {dict(mesh.shape)}; "
                       f"{jax.device_count()} devices, {jax.process_count()} processes")

    # ------------------------------------------------------------------ Loop
    writer = MetricsWriter(workdir, start, enabled=is_main)
    eval_batch = batch_at(EVAL_BATCH_STEP) if config.eval_every else None

    def eval_row(state) -> dict:  # the fixed-batch loss, and the endpoint error when it is on
        row = {"eval_loss": float(s.eval_fn(state, s.frozen, eval_batch))}
        if s.endpoint_fn is not None:
            row.update(endpoint_row(config, s.endpoint_fn(state, s.frozen, eval_batch)))
        return row

    if start == 0 and eval_batch is not None and s.endpoint_fn is not None:  # the baseline
        row = eval_row(state)
        writer.write(0, row)
        main_process_print(f"before distillation: eval_loss {row['eval_loss']:.5f}{endpoint_text(row)}")
    stop = StopRequest()  # SIGTERM to any process: all save the same step and exit
    sample_grid = make_sample_grid(config, s.models, s.frozen, workdir, mesh)
    t_last, step_last = time.time(), start
    try:
        unchecked = None  # (metrics, step) whose finiteness is read one step late
        stream = _stream(source, start + 1)  # the next batches, prepared while the device runs
        for step in range(start, config.total_steps):
            batch = batch0 if step == start else sharding.shard_batch(next(stream), mesh)
            new_state, metrics = step_fn(state, s.frozen, batch)
            if unchecked is not None:  # the device already holds this step: no idle wait
                _check_finite(*unchecked)
            state, done, unchecked = new_state, step + 1, (metrics, step + 1)
            term = stop.reached(done)  # read once: the step saved is the step reported
            save = done % config.checkpoint_every == 0 or done == config.total_steps or term
            if save or done % config.log_every == 0 or (config.sample_every and done % config.sample_every == 0):
                _check_finite(*unchecked)  # nothing non-finite is logged, sampled or saved
                unchecked = None
            if done % config.log_every == 0 or done == config.total_steps:
                now = time.time()
                sps = (done - step_last) / max(now - t_last, 1e-9)
                row = {k: float(v) for k, v in metrics.items() if k != "finite"}
                row.update(steps_per_s=sps, examples_per_s=sps * config.batch_size, **counters())
                if eval_batch is not None and (done % config.eval_every == 0 or done == config.total_steps):
                    row.update(eval_row(state))
                writer.write(done, row)
                main_process_print(progress_line(done, config.total_steps, row))
                t_last, step_last = time.time(), done  # steps/s counts training steps only
            if sample_grid is not None and config.sample_every and done % config.sample_every == 0:
                sample_grid(state, done)  # before the save: a resume from `done` finds its grid
            if save:
                checkpoints.save_checkpoint(mngr, state, force=term)
            if term:
                print(f"SIGTERM: saved step {done}, exiting (process {jax.process_index()})", flush=True)
                break
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
        stop.close()
    return state


def main(argv) -> None:
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    quiet_advice()
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
    flags.DEFINE_bool("debug", False, f"show the traceback of an error (also ${DEBUG_ENV}=1)")
    flags.mark_flags_as_required(["config", "workdir"])
    prog = "lcm_jax.train"  # expected errors, in flags and in the run: one line, status 2
    app.run(lambda argv: report(prog, lambda: main(argv), flags.FLAGS.debug),
            flags_parser=absl_flags_parser(prog))
