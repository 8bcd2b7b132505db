"""Orbax checkpoints of a run; `restore(workdir, step)`: the one way eval and tools read a run back,
and `restore_weights(workdir, which, step)`: one weight tree of it, on the host (what export needs)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lcm_jax import fs
from lcm_jax.errors import ConfigError, RunError
from lcm_jax.training.models import student_shapes
from lcm_jax.training.state import TrainState, make_init_state, make_optimizer, sampling_params




def checkpoint_manager(workdir: str, config, create: bool = True):
    """The run's orbax manager; readers pass create=False, so that reading a run never makes its
    checkpoints/ folder."""
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=create,
                                           enable_async_checkpointing=config.async_checkpointing)
    path = fs.join(workdir, "checkpoints")  # orbax takes gs:// URLs (etils.epath, TensorStore)
    return ocp.CheckpointManager(path if fs.is_remote(path) else os.path.abspath(path), options=options)


def save_checkpoint(mngr, state: TrainState, force: bool = False) -> None:
    mngr.save(int(state.step), args=ocp.args.StandardSave(state), force=force)


def restore_checkpoint(mngr, abstract_state: TrainState, step: Optional[int] = None) -> Optional[TrainState]:
    """The checkpoint at `step` (default: the latest complete one; orbax only exposes finalised
    ones), or None when there is none."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    if abstract_state.eval_params is None and "eval_params" not in _saved_fields(mngr, step):
        # saved before TrainState.eval_params existed: the same state, without a slow EMA
        fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(TrainState)
                  if f.name != "eval_params"}
        return TrainState(**mngr.restore(step, args=ocp.args.StandardRestore(fields)))
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def _saved_fields(mngr, step: int) -> set[str]:
    """The top-level names of the TrainState saved at `step`, from its tree metadata (a manager that
    has not saved this run has no handler to ask, so the step folder's 'default' item is read)."""
    path = ocp.path.step.find_step_path(mngr.directory, ocp.path.step.standard_name_format(), step=step)
    return set(ocp.StandardCheckpointer().metadata(path / "default").item_metadata.keys())


# Fields a resumed run may change: none of them changes the saved state's structure, shapes or
# meaning (how long, how often to log/evaluate/save/sample, the learning-rate schedule, input
# throughput). Any other change is accepted only when the state's shapes stay the same and the
# method does not change.
RESUMABLE = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "async_checkpointing",
             "eval_every", "sample_every", "eval_endpoint_timesteps", "eval_endpoint_batch",
             "compilation_cache_dir", "sample_prompts", "optim.learning_rate", "optim.schedule",
             "optim.warmup_steps", "data.num_workers", "data.prefetch_batches")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and k != "unet":  # model.unet is compared as one value
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_fields(old: dict, new: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (saved value, new value)} for the fields whose values differ between a saved
    config.json (as loaded from JSON) and `new` (compared in JSON form: tuples as lists)."""
    a, b = _flat(old), _flat(json.loads(new.to_json_best_effort()))
    missing = "<absent>"
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(a.keys() | b.keys())
            if a.get(k, missing) != b.get(k, missing)}


def _state_signature(config) -> tuple:
    shapes = abstract_state(config)[1]
    return jax.tree.structure(shapes), [(x.shape, x.dtype) for x in jax.tree.leaves(shapes)]


def check_resume(workdir: str, config: ml_collections.ConfigDict) -> tuple[Optional[int], list[str]]:
    """(the step a run in `workdir` resumes from or None, the config fields it changes). Refuses
    (ConfigError naming the fields) a workdir that is a file, and a change of method or of the
    saved state's structure, shapes or dtypes; reads only config.json and the checkpoint names."""
    if not fs.is_remote(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir}: is a file; give a folder (new or a run's)")
    path, ckpts = fs.join(workdir, "config.json"), fs.join(workdir, "checkpoints")
    steps = ocp.path.step.checkpoint_steps(ckpts) if fs.exists(ckpts) else []
    if not steps or not fs.exists(path):
        return None, []
    old = load_run_config(workdir)
    changed = changed_fields(old.to_dict(), config)
    unsafe = [f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items() if k not in RESUMABLE]
    if unsafe and (old.method != config.method or _state_signature(old) != _state_signature(config)):
        raise ConfigError(f"{workdir} holds a run (checkpoint step {max(steps)}) whose saved state "
                          f"this config cannot restore: it changes {', '.join(unsafe)}; resume "
                          f"with the values in {path} or start a new --workdir")
    return max(steps), sorted(changed)


def write_run_config(workdir: str, config: ml_collections.ConfigDict,
                     resume: tuple[Optional[int], list[str]]) -> None:
    """Writes workdir/config.json; a resume that changes fields (`resume`, from `check_resume`)
    first keeps the previous config beside it as config.<step>.json (the step it ran up to)."""
    step, changed = resume
    path = fs.join(workdir, "config.json")
    if changed:
        kept = fs.join(workdir, f"config.{step}.json")
        with fs.open(path) as f:
            fs.write_text_atomic(kept, f.read())
        print(f"resuming at step {step} with changed {', '.join(changed)}; the previous config is "
              f"kept as {kept}", flush=True)
    fs.write_text_atomic(path, config.to_json_best_effort(indent=2))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a training run saved in workdir/config.json."""
    path = fs.join(workdir, "config.json")
    if not fs.exists(path):
        raise RunError(f"{workdir} is not a training workdir: it has no config.json")
    try:
        with fs.open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is not valid JSON ({e}); it is written by lcm_jax.train") from e


class Restored(NamedTuple):
    config: ml_collections.ConfigDict
    unet: Any            # the trained UNet module
    state: TrainState


def restore(workdir: str, step: Optional[int] = None) -> Restored:
    """The run in `workdir` at checkpoint `step` (default: the latest finished one), on one local
    device: its config, the trained UNet module and the TrainState."""
    config = load_run_config(workdir)
    unet, shapes = abstract_state(config)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    mngr = checkpoint_manager(workdir, config, create=False)
    try:
        state = restore_checkpoint(mngr, abstract, saved_step(workdir, mngr, step))
    finally:
        mngr.close()
    return Restored(config, unet, state)


WEIGHTS = ("sampling", "ema", "eval_ema", "online")


class RestoredWeights(NamedTuple):
    config: ml_collections.ConfigDict
    unet: Any            # the trained UNet module
    params: Any          # one weight tree of numpy arrays (UNet params, or LoRA factors)
    step: int


def abstract_state(config) -> tuple[Any, TrainState]:
    """(the trained UNet module, the shapes and dtypes of the run's TrainState), from its config."""
    unet, shapes = student_shapes(config)
    return unet, jax.eval_shape(make_init_state(config, make_optimizer(config)[0]), shapes)


def weights_field(abstract: TrainState, which: str) -> str:
    """The TrainState field `which` names: 'online' the trained params, 'ema' the EMA target,
    'eval_ema' the slow evaluation EMA, 'sampling' what `state.sampling_params` picks."""
    if which not in WEIGHTS:
        raise ValueError(f"weights {which!r} unknown; choose one of {WEIGHTS}")
    if which == "ema" and abstract.target_params is None:
        raise RunError("the run keeps no EMA of its weights (no target_params); "
                       "export 'online' (or 'sampling') weights instead")
    if which == "eval_ema" and abstract.eval_params is None:
        raise RunError("the run keeps no slow evaluation EMA (eval_ema_decay 0); "
                       "export 'sampling', 'ema' or 'online' weights instead")
    if which == "sampling":
        picked = sampling_params(abstract)
        return next(f for f in ("eval_params", "target_params", "params") if getattr(abstract, f) is picked)
    return {"online": "params", "ema": "target_params", "eval_ema": "eval_params"}[which]


def saved_step(workdir: str, mngr, step: Optional[int] = None) -> int:
    """`step` when the run saved it, else (None) its latest finished step; a RunError otherwise."""
    if step is not None and step not in mngr.all_steps():
        raise RunError(f"{workdir}/checkpoints has no step {step}; it holds {sorted(mngr.all_steps())}")
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise RunError(f"{workdir}/checkpoints holds no finished checkpoint")
    return step


def restore_weights(workdir: str, which: str = "sampling", step: Optional[int] = None) -> RestoredWeights:
    """One weight tree of the run in `workdir` at `step` (default: the latest finished one) as
    host numpy arrays: orbax reads only that subtree of the saved TrainState, so the restore
    holds the exported weights and nothing else (no optimizer moments, no second copy, no
    device buffers), whatever mesh the run was sharded over."""
    config = load_run_config(workdir)
    unet, abstract = abstract_state(config)
    field = weights_field(abstract, which)
    item = {field: getattr(abstract, field)}
    host = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    mngr = checkpoint_manager(workdir, config, create=False)
    try:
        step = saved_step(workdir, mngr, step)
        tree = mngr.restore(step, args=ocp.args.PyTreeRestore(item=item, restore_args=host,
                                                              partial_restore=True))
    finally:
        mngr.close()
    return RestoredWeights(config, unet, tree[field], step)


def initial_params(config, params):
    """The student's starting weights: `params` (the teacher's, with the new leaves), or with
    model.student_init the trained (online) weights of that run's latest checkpoint, which must
    have the same tree and shapes and read the UNet's output as this run does (its
    loss.student_prediction): a guided run (method 'guided') that put the teacher into an x0 or
    v parameterisation, or any earlier run of the same student."""
    workdir = config.model.get("student_init", "")
    if not workdir:
        return params
    restored = restore_weights(workdir, "online")
    mine = config.loss.get("student_prediction", "teacher")
    theirs = restored.config.get("loss", {}).get("student_prediction", "teacher")
    if theirs != mine:
        raise ConfigError(f"model.student_init={workdir!r}: that run's student outputs "
                          f"loss.student_prediction={theirs!r}, this run's {mine!r}; set the same")
    shapes = lambda tree: {jax.tree_util.keystr(path): np.shape(x)
                           for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want, have = shapes(params), shapes(restored.params)
    bad = sorted(key for key in want.keys() | have.keys() if want.get(key) != have.get(key))
    if bad:
        raise ConfigError(f"model.student_init={workdir!r}: its weights have {bad[0]} of shape "
                          f"{have.get(bad[0])}, this run's student {want.get(bad[0])}; start from a "
                          "run of the same student")
    print(f"student starts from {workdir} (step {restored.step}, online weights)", flush=True)
    return restored.params
