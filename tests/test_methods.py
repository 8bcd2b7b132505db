"""The distillation methods and recipes wired through the trainer: TCD and PCM runs, the slow
evaluation EMA (kept, checkpointed, picked for sampling and export), LCM-LoRA with an EMA target,
x0/v students exported for diffusers, old checkpoints without the slow EMA, and the config checks.
In-process on configs/tiny_lcd.py (one compile per run)."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from gcs_emulator import gcs_bucket, gcs_server  # noqa: F401  (fixtures)

from configs.tiny_lcd import get_config
from lcm_jax import sharding, train
from lcm_jax.config_checks import check_config
from lcm_jax.errors import ConfigError
from lcm_jax.training import checkpoints
from lcm_jax.training.state import TrainState, sampling_params


def _ema(history, decay):
    """The EMA of a list of weight trees, started at the first: e <- decay e + (1 - decay) x."""
    out = history[0]
    for p in history[1:]:
        out = jax.tree.map(lambda e, x: decay * e + (1 - decay) * x, out, p)
    return out


def _close(a, b, rtol=1e-6, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _steps(config, steps):
    """setup + `steps` training steps: (Setup, final state, params after every step, losses)."""
    s = train.setup(config, sharding.make_mesh(1, 1))
    state, history, losses = s.state, [jax.device_get(s.state.params)], []
    for i in range(steps):
        state, m = s.step_fn(state, s.frozen, s.source.batch(i))
        history.append(jax.device_get(state.params))
        losses.append(float(m["loss"]))
    return s, state, history, losses


def test_tcd_run_keeps_both_emas_exact_and_checkpoints_the_slow_one(tmp_path):
    """TCD with an x0 student and sampler-weighted timesteps trains (finite losses, the weights
    move); target_params is the EMA at loss.ema_decay and eval_params the EMA at eval_ema_decay
    of the same weights; sampling_params picks the slow one; a checkpoint restores it exactly,
    `restore_weights(..., 'eval_ema')` and 'sampling' read it, and a resume that would drop it
    is refused."""
    config = get_config("tcd")
    config.loss.ema_decay, config.eval_ema_decay = 0.75, 0.5
    config.loss.student_prediction, config.loss.timestep_sampling = "x0", "sampler"
    check_config(config)
    _, state, history, losses = _steps(config, 3)
    assert np.all(np.isfinite(losses))
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(history[0]), jax.tree.leaves(history[-1])))
    _close(state.target_params, _ema(history, 0.75))
    _close(state.eval_params, _ema(history, 0.5))
    assert sampling_params(state) is state.eval_params

    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    checkpoints.write_run_config(workdir, config, (None, []))
    mngr = checkpoints.checkpoint_manager(workdir, config)
    checkpoints.save_checkpoint(mngr, state)
    mngr.wait_until_finished()
    mngr.close()
    restored = checkpoints.restore(workdir).state
    for a, b in zip(jax.tree.leaves(restored.eval_params), jax.tree.leaves(state.eval_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for which in ("eval_ema", "sampling"):
        _close(checkpoints.restore_weights(workdir, which).params, state.eval_params, rtol=0, atol=0)
    off = get_config("tcd")
    off.loss.ema_decay = 0.75
    off.loss.student_prediction, off.loss.timestep_sampling = "x0", "sampler"
    with pytest.raises(ConfigError, match=r"eval_ema_decay 0.5 -> 0.0"):
        checkpoints.check_resume(workdir, off)


def test_pcm_run_trains_and_samples_on_the_phase_edges():
    """PCM (2 phases of a 50-step grid): finite losses, moving weights, and the sample grid's one
    row is the TCD sampler at gamma 0 on the upper phase edges 999, 499."""
    from lcm_jax.training.samples import grid_samplers

    config = get_config("pcm")
    config.loss.pcm_phases = 2
    check_config(config)
    _, state, history, losses = _steps(config, 2)
    assert np.all(np.isfinite(losses)) and state.eval_params is None
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(history[0]), jax.tree.leaves(history[-1])))
    ((steps, (name, ts, gamma)),) = grid_samplers(config, 1000).items()
    assert (steps, name, gamma) == (2, "tcd", 0.0)
    np.testing.assert_array_equal(ts, [999, 499])


def test_lcm_lora_with_target_ema():
    """loss.lora_target_ema: target_params is the EMA (loss.ema_decay) of the LoRA factors, and the
    loss reads it: the fixed-batch loss with the EMA as target differs from the one with the
    current factors as target (diffusers' recipe, which keeps no target)."""
    config = get_config("lora")
    config.loss.lora_target_ema, config.loss.ema_decay = True, 0.5
    s, state, history, losses = _steps(config, 2)
    assert np.all(np.isfinite(losses))
    _close(state.target_params, _ema(history, 0.5))
    batch = s.source.batch(train.EVAL_BATCH_STEP)
    with_target = float(s.eval_fn(state, s.frozen, batch))
    without = float(s.eval_fn(state.replace(target_params=state.params), s.frozen, batch))
    assert np.isfinite(with_target) and abs(with_target - without) > 1e-6 * abs(without)
    plain = get_config("lora")
    assert checkpoints.abstract_state(plain)[1].target_params is None


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_old_checkpoint_without_eval_params_resumes_and_refuses_a_slow_ema(where, tmp_path, request):
    """A workdir saved before TrainState.eval_params (config.json without eval_ema_decay, a
    checkpoint without the field), local or in a bucket, restores with eval_params None; turning
    the slow EMA on for it is refused by check_resume, naming the field."""
    import orbax.checkpoint as ocp

    from lcm_jax import fs

    config = get_config()
    _, abstract = checkpoints.abstract_state(config)
    state = jax.tree.map(lambda x: np.full(x.shape, 0.25, x.dtype), abstract)
    old = {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState) if f.name != "eval_params"}
    workdir = str(tmp_path / "old") if where == "local" else request.getfixturevalue("gcs_bucket") + "/old"
    mngr = checkpoints.checkpoint_manager(workdir, config)
    mngr.save(5, args=ocp.args.StandardSave(old))
    mngr.wait_until_finished()
    mngr.close()
    saved = json.loads(config.to_json_best_effort())
    del saved["eval_ema_decay"]
    fs.write_text_atomic(fs.join(workdir, "config.json"), json.dumps(saved))
    step, changed = checkpoints.check_resume(workdir, config)
    assert step == 5 and "eval_ema_decay" in changed
    restored = checkpoints.restore(workdir).state
    assert restored.eval_params is None
    _close(restored.params, state.params, rtol=0, atol=0)
    config.eval_ema_decay = 0.999
    with pytest.raises(ConfigError, match=r"eval_ema_decay '<absent>' -> 0.999"):
        checkpoints.check_resume(workdir, config)


def test_weights_field_picks_the_slow_ema():
    from lcm_jax.errors import RunError

    config = get_config()
    config.eval_ema_decay = 0.999
    slow = checkpoints.abstract_state(config)[1]
    assert [checkpoints.weights_field(slow, w) for w in ("sampling", "eval_ema", "ema", "online")] == \
        ["eval_params", "eval_params", "target_params", "params"]
    with pytest.raises(RunError, match="keeps no slow evaluation EMA"):
        checkpoints.weights_field(checkpoints.abstract_state(get_config())[1], "eval_ema")


@pytest.mark.parametrize("field,value,message", [
    ("loss.student_prediction", "x1", "loss.student_prediction='x1': choose one of"),
    ("loss.timestep_sampling", "snr", "loss.timestep_sampling='snr': choose one of"),
    ("eval_ema_decay", 1.0, "eval_ema_decay=1.0: must be a number in [0, 1)"),
    ("loss.pcm_phases", 51, "loss.pcm_phases=51: at most loss.num_ddim_timesteps=50 phases"),
    ("eval_endpoint_timesteps", (999,), "the one-step endpoint error does not apply to method 'pcm'"),
])
def test_config_checks_name_the_new_fields(field, value, message):
    config = get_config("pcm")
    node, key = (config.loss, field[5:]) if field.startswith("loss.") else (config, field)
    node[key] = value
    with pytest.raises(ConfigError) as e:
        check_config(config)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_x0_student_export_samples_the_same_in_diffusers(tmp_path):
    """An x0 student exported with prediction_type 'sample' in its LCMScheduler config: diffusers'
    LCM pipeline and lcm-jax's pipeline over the exported folder make the same images."""
    from diffusers import DiffusionPipeline
    from test_export import TOL, _diffusers_images, _latents, _student
    from tiny_pipeline import build_pipeline

    from lcm_jax.convert.export import export_pipeline
    from lcm_jax.pipeline import LCMPipeline

    teacher = str(tmp_path / "teacher")
    build_pipeline(teacher, time_cond_proj_dim=None, seed=3)
    unet, params = _student(build_pipeline, str(tmp_path / "student"), seed=5)
    out = str(tmp_path / "exported")
    export_pipeline(params, unet.config, out, teacher, lcm_grid=(50, 10.0), prediction_type="sample")
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["prediction_type"] == "sample"
    tpipe = DiffusionPipeline.from_pretrained(out)
    assert tpipe.scheduler.config.prediction_type == "sample"
    latents = _latents(1)
    ref, noises = _diffusers_images(tpipe, latents, seed=1, guidance_scale=6.0, original_inference_steps=50)
    pipe = LCMPipeline.from_pretrained(out)
    assert pipe.components.schedule.prediction_type == "sample"
    ours = pipe(["a red circle", "a big blue star"], num_inference_steps=2, guidance_scale=6.0, height=64,
                width=64, latents=latents, noises=noises, original_inference_steps=50)
    assert float(np.abs(ours - ref).max()) <= TOL


def test_guided_run_starts_a_v_student_and_bad_starts_are_refused(tmp_path):
    """method 'guided' with a v student trains (finite losses, the weights move); an LCD run with
    model.student_init on its workdir starts from its online weights exactly. A start that is
    not a workdir, reads the output as another type or has other shapes is refused in one line
    that names model.student_init."""
    guided = get_config()
    guided.method, guided.loss.student_prediction = "guided", "v"
    guided.total_steps, guided.checkpoint_every, guided.eval_every = 3, 3, 0
    check_config(guided)
    start = str(tmp_path / "guided")
    state = train.train_and_evaluate(guided, start)
    assert int(state.step) == 3 and state.target_params is None
    lcd = get_config()
    lcd.loss.student_prediction, lcd.model.student_init = "v", start
    check_config(lcd)
    s = train.setup(lcd, sharding.make_mesh(1, 1))
    _close(s.state.params, state.params, rtol=0, atol=0)
    _close(s.state.target_params, state.params, rtol=0, atol=0)
    teacher = jax.device_get(train.setup(get_config(), sharding.make_mesh(1, 1)).state.params)
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
               for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(state.params)))

    bad = [("student_init", str(tmp_path / "nowhere"), "not a training workdir (no config.json)"),
           ("student_prediction", "x0", "that run's student outputs loss.student_prediction='v'"),
           ("time_cond_proj_dim", 16, "of shape (32, ")]
    for field, value, message in bad:
        config = get_config()
        config.loss.student_prediction, config.model.student_init = "v", start
        node = config.loss if field == "student_prediction" else config.model
        node[field] = value
        with pytest.raises(ConfigError) as e:
            check_config(config)
            train.setup(config, sharding.make_mesh(1, 1))
        assert "model.student_init=" in str(e.value) and message in str(e.value) and "\n" not in str(e.value)
