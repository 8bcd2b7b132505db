"""Bad inputs as a user meets them: the trainer (Python entry and `python -m lcm_jax.train`), the
`lcm-jax` command line and the pipeline API. Each case asserts the one-line message that names
the field, value or file, that nothing was compiled before the error, and that every folder the
case touches (a run's workdir with its checkpoints and config.json, a pipeline folder, an output
folder) is byte-for-byte what it was."""
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from tiny_pipeline import build_pipeline

from lcm_jax import cli, train
from lcm_jax.errors import ConfigError, RunError, WeightsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_lcd.py")
RUN_STEPS = 2


class _Compiles:
    """XLA compiles in this process (jax.monitoring): the command line's errors come before any."""

    count = 0

    @classmethod
    def on(cls, event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            cls.count += 1


jax.monitoring.register_event_duration_secs_listener(_Compiles.on)


def digest(path: str) -> dict:
    """{relative path: sha256} of every file under `path` (a file: {'': sha256}; missing: {})."""
    def sha(p):
        with open(p, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    if os.path.isfile(path):
        return {"": sha(path)}
    return {os.path.relpath(os.path.join(d, n), path): sha(os.path.join(d, n))
            for d, _, names in os.walk(path) for n in names}


def tiny_config(**overrides):
    """configs/tiny_lcd.py, locked, with dotted overrides given as a__b=value."""
    spec = importlib.util.spec_from_file_location("tiny_lcd_config", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.lock()
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """A finished 2-step LCD run, the tiny pipeline folder and its damaged copies, a plain file,
    an empty folder, an image folder without metadata.jsonl and one with a truncated JPEG."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run = str(root / "run")
    train.train_and_evaluate(tiny_config(total_steps=RUN_STEPS, checkpoint_every=RUN_STEPS,
                                         eval_every=0, log_every=1), run)
    pipe = str(root / "pipe")
    build_pipeline(pipe)
    damaged = {
        "bad_index": ("model_index.json", "{not json"),
        "bad_defaults": ("lcm_jax_defaults.json", "{not json"),
        "odd_defaults": ("lcm_jax_defaults.json", json.dumps({"steps": 4})),
    }
    for name, (file, text) in damaged.items():
        shutil.copytree(pipe, root / name)
        (root / name / file).write_text(text)
    (root / "afile").write_text("not a folder\n")
    (root / "empty").mkdir()
    bad_run = root / "bad_run"
    bad_run.mkdir()
    (bad_run / "config.json").write_text("{\"method\": ")
    images = root / "images"
    images.mkdir()
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(images / "a.png")
    jpeg = root / "jpeg"
    jpeg.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(jpeg / "a.jpg")
    data = (jpeg / "a.jpg").read_bytes()
    (jpeg / "a.jpg").write_bytes(data[: len(data) // 2])
    (jpeg / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "a cat"}) + "\n")
    paths = {k: str(root / k) for k in (*damaged, "afile", "empty", "images", "jpeg", "bad_run")}
    return {"root": str(root), "run": run, "pipe": pipe, "new": str(root / "new_run"), **paths}


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The trainer's Python entry: train.train_and_evaluate(config, workdir)
# ---------------------------------------------------------------------------------------------

NAN = float("nan")
TRAINING = [  # (id, workdir, overrides (places' names in {}), the message)
    ("lr_negative", "new", dict(optim__learning_rate=-1.0), r"^optim\.learning_rate=-1\.0: must be a finite number > 0$"),
    ("lr_nan", "new", dict(optim__learning_rate=NAN), r"^optim\.learning_rate=nan: must be a finite number > 0$"),
    ("total_steps_0", "new", dict(total_steps=0), r"^total_steps=0: must be an integer >= 1$"),
    ("total_steps_neg", "new", dict(total_steps=-5), r"^total_steps=-5: must be an integer >= 1$"),
    ("batch_0", "new", dict(batch_size=0), r"^batch_size=0: must be an integer >= 1$"),
    ("accum_not_dividing", "new", dict(batch_size=6, optim__grad_accum_steps=4),
     r"^batch_size=6: must be divisible by optim\.grad_accum_steps=4 \(equal micro-batches\)$"),
    ("accum_0", "new", dict(optim__grad_accum_steps=0), r"^optim\.grad_accum_steps=0: must be an integer >= 1$"),
    ("method_foo", "new", dict(method="foo"),
     r"^method='foo': choose one of \('lcd', 'lcm_lora', 'lcf', 'tcd', 'pcm', 'guided', 'diffusion'\)$"),
    ("source_unknown", "new", dict(data__source="nope"), r"^data\.source='nope': choose one of \(.*'synthetic'.*\)"),
    ("folder_without_path", "new", dict(data__source="folder"),
     r"^data\.path='': data\.source='folder' reads its examples from data\.path; set --config\.data\.path$"),
    ("folder_without_metadata", "new", dict(data__source="folder", data__path="{images}"),
     r"^data\.path='.*images': has no metadata\.jsonl; an image folder needs metadata\.jsonl"),
    ("folder_missing", "new", dict(data__source="folder", data__path="{root}/nowhere"),
     r"^data\.path='.*nowhere': does not exist;"),
    ("webdataset_without_path", "new", dict(data__source="webdataset"),
     r"^data\.path='': data\.source='webdataset' reads"),
    ("teacher_missing", "new", dict(model__teacher="{root}/no_teacher"),
     r"^model\.teacher='.*no_teacher': not a diffusers pipeline folder \(no model_index\.json\)$"),
    ("components_not_pipeline", "new", dict(model__components="{empty}"),
     r"^model\.components='.*empty': not a diffusers pipeline folder"),
    ("cache_dir_not_cache", "new", dict(data__cache_dir="{empty}"),
     r"^data\.cache_dir='.*empty': not a latent cache \(no manifest\.json; make one with `lcm-jax cache`\)$"),
    ("ema_decay_1", "new", dict(loss__ema_decay=1.0), r"^loss\.ema_decay=1\.0: must be a number in \[0, 1\)$"),
    ("diffusion_ema_negative", "new", dict(diffusion_ema_decay=-0.1),
     r"^diffusion_ema_decay=-0\.1: must be a number in \[0, 1\)$"),
    ("b2_above_1", "new", dict(optim__b2=1.5), r"^optim\.b2=1\.5: must be a number in \[0, 1\)$"),
    ("eps_0", "new", dict(optim__eps=0.0), r"^optim\.eps=0\.0: must be a finite number > 0$"),
    ("w_range_reversed", "new", dict(loss__w_min=10.0, loss__w_max=5.0),
     r"^loss\.w_min=10\.0, loss\.w_max=5\.0: w_min must be <= w_max$"),
    ("loss_type", "new", dict(loss__loss_type="l1"), r"^loss\.loss_type='l1': choose one of \('l2', 'huber'\)$"),
    ("schedule", "new", dict(optim__schedule="linear"),
     r"^optim\.schedule='linear': choose one of \('constant', 'cosine'\)$"),
    ("dtype", "new", dict(model__compute_dtype="float64"),
     r"^model\.compute_dtype='float64': choose one of \('float32', 'bfloat16', 'float16'\)$"),
    ("lora_rank_0", "new", dict(method="lcm_lora", lora__rank=0), r"^lora\.rank=0: must be an integer >= 1$"),
    ("mesh_too_big", "new", dict(mesh__fsdp=2),
     r"^mesh\.data=-1, mesh\.fsdp=2: the mesh must cover the 1 devices"),
    ("flip_prob", "new", dict(data__flip_prob=1.5), r"^data\.flip_prob=1\.5: must be a number in \[0, 1\]$"),
    ("caption_dropout", "new", dict(data__caption_dropout=-0.5),
     r"^data\.caption_dropout=-0\.5: must be a number in \[0, 1\]$"),
    ("filters", "new", dict(data__filters="aesthetic>>5"), r"^data\.filters clause 'aesthetic>>5'"),
    ("log_every_0", "new", dict(log_every=0), r"^log_every=0: must be an integer >= 1$"),
    ("checkpoint_every_0", "new", dict(checkpoint_every=0), r"^checkpoint_every=0: must be an integer >= 1$"),
    ("warmup_negative", "new", dict(optim__warmup_steps=-1), r"^optim\.warmup_steps=-1: must be an integer >= 0$"),
    ("resolution", "new", dict(data__resolution=4), r"^data\.resolution=4: must be an integer >= 8$"),
    ("no_sample_prompts", "new", dict(sample_every=5, sample_prompts=[]),
     r"^sample_prompts=\[\]: sample_every=5 needs at least one prompt$"),
    ("two_problems", "new", dict(total_steps=0, optim__learning_rate=-1.0),
     r"^total_steps=0: must be an integer >= 1; optim\.learning_rate=-1\.0: must be a finite number > 0$"),
    ("resume_w_embedding", "run", dict(model__time_cond_proj_dim=16),
     r"^.*run holds a run \(checkpoint step 2\) whose saved state this config cannot restore: it "
     r"changes model\.time_cond_proj_dim 32 -> 16; resume with the values in .*config\.json or "
     r"start a new --workdir$"),
    ("resume_other_method", "run", dict(method="lcm_lora"), r"it changes method 'lcd' -> 'lcm_lora';"),
    ("resume_other_unet", "run", dict(model__unet__block_out_channels=[32, 32]),
     r"it changes model\.unet \{.*\} -> \{.*\};"),
    ("workdir_is_file", "afile", {}, r"^--workdir .*afile: is a file; give a folder \(new or a run's\)$"),
    ("endpoint_off_grid", "new", dict(eval_every=5, eval_endpoint_timesteps=(998, 999)),
     r"^eval_endpoint_timesteps=\(998, 999\): \[998\] not on the skipping grid t_n = \[19, 39, 59\]\.\.999 "
     r"\(T=1000, loss\.num_ddim_timesteps=50\); pick members of it$"),
    ("coarse_grid_off", "new", dict(loss__coarse_ddim_timesteps=15),
     r"^loss\.coarse_ddim_timesteps=15: its skipping step T / N_c = 66 must be a multiple of k = 20 "
     r"\(num_ddim_timesteps=50\); e\.g\. 10$"),
    ("coarse_grid_tcd", "new", dict(method="tcd", loss__coarse_ddim_timesteps=10),
     r"^loss\.coarse_ddim_timesteps=10: mixed skipping steps are for method 'lcd', not 'tcd'; set it to 0$"),
    ("coarse_fraction", "new", dict(loss__coarse_fraction=2.0),
     r"^loss\.coarse_fraction=2\.0: must be a number in \[0, 1\]$"),
]


@pytest.mark.parametrize("where, overrides, message", [c[1:] for c in TRAINING], ids=[c[0] for c in TRAINING])
def test_trainer_refuses_before_compiling_or_writing(places, monkeypatch, where, overrides, message):
    workdir = places[where]
    overrides = {k: v.format(**places) if isinstance(v, str) else v for k, v in overrides.items()}
    config = tiny_config(**overrides)
    before = digest(workdir)

    def setup(*_):  # where the trainer builds and compiles its programs
        raise AssertionError("the bad config reached setup()")

    monkeypatch.setattr(train, "setup", setup)
    with pytest.raises(ConfigError) as e:
        train.train_and_evaluate(config, workdir)
    assert re.search(message, _one_line(str(e.value))), str(e.value)
    assert digest(workdir) == before
    assert not os.path.exists(places["new"])


def test_resume_with_allowed_changes_keeps_the_old_config(places, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(places["run"], workdir)
    with open(os.path.join(workdir, "config.json"), "rb") as f:
        old = f.read()
    state = train.train_and_evaluate(tiny_config(total_steps=RUN_STEPS + 1, checkpoint_every=RUN_STEPS,
                                                 eval_every=0, log_every=1, optim__learning_rate=5e-4),
                                     workdir)
    assert int(state.step) == RUN_STEPS + 1
    with open(os.path.join(workdir, f"config.{RUN_STEPS}.json"), "rb") as f:
        assert f.read() == old
    with open(os.path.join(workdir, "config.json")) as f:
        new = json.load(f)
    assert (new["total_steps"], new["optim"]["learning_rate"]) == (RUN_STEPS + 1, 5e-4)


# ---------------------------------------------------------------------------------------------
# python -m lcm_jax.train: one line on stderr, status 2
# ---------------------------------------------------------------------------------------------

TRAIN_CLI = [  # (id, workdir, flags, the line)
    ("misspelt_override", "run", ["--config.optim.learnin_rate=1"],
     r'^lcm_jax\.train: error: --config\.optim\.learnin_rate: .*Did you mean "learning_rate" instead of "learnin_rate"\?$'),
    ("override_not_int", "run", ["--config.batch_size=abc"],
     r"^lcm_jax\.train: error: --config\.batch_size: .*invalid literal for int\(\)"),
    ("negative_lr", "run", ["--config.optim.learning_rate=-1"],
     r"^lcm_jax\.train: error: optim\.learning_rate=-1\.0: must be a finite number > 0$"),
    ("workdir_file", "afile", [], r"^lcm_jax\.train: error: --workdir .*afile: is a file"),
]


@pytest.mark.parametrize("where, flags, line", [c[1:] for c in TRAIN_CLI], ids=[c[0] for c in TRAIN_CLI])
def test_train_command_prints_one_line(places, where, flags, line):
    workdir = places[where]
    before = digest(workdir)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "lcm_jax.train", f"--config={TINY}",
                          f"--workdir={workdir}", *flags], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert re.search(line, _one_line(out.stderr)), out.stderr
    assert digest(workdir) == before


def test_debug_shows_the_traceback(places, capsys):
    env_flag = ["--debug", "export", "--workdir", places["empty"], "--out", places["new"]]
    assert cli.main(env_flag) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("lcm-jax export: error: ")


# ---------------------------------------------------------------------------------------------
# lcm-jax: one line on stderr, status 2, before any work
# ---------------------------------------------------------------------------------------------

SAMPLE = ["sample", "--prompt", "a red circle", "--height", "64", "--width", "64"]
COMMANDS = [  # (id, argv (places' names in {}), the message after `lcm-jax CMD: error: `)
    ("sample_model_missing", [*SAMPLE, "--model", "{root}/nowhere", "--out", "{new}"], r"--model .*nowhere: no such folder$"),
    ("sample_model_file", [*SAMPLE, "--model", "{afile}", "--out", "{new}"], r"--model .*afile: no such folder$"),
    ("sample_not_pipeline", [*SAMPLE, "--model", "{empty}", "--out", "{new}"],
     r"empty is not a diffusers pipeline folder: it has no model_index\.json"),
    ("sample_bad_model_index", [*SAMPLE, "--model", "{bad_index}", "--out", "{new}"],
     r"bad_index/model_index\.json is not valid JSON \(.*\); a pipeline folder needs one$"),
    ("sample_bad_defaults", [*SAMPLE, "--model", "{bad_defaults}", "--out", "{new}"],
     r"bad_defaults/lcm_jax_defaults\.json is not valid JSON"),
    ("sample_odd_defaults", [*SAMPLE, "--model", "{odd_defaults}", "--out", "{new}"],
     r"odd_defaults/lcm_jax_defaults\.json: unknown keys \['steps'\]; allowed: \["),
    ("sample_out_is_file", [*SAMPLE, "--model", "{pipe}", "--out", "{afile}"], r"--out .*afile: is a file; give a folder"),
    ("sample_steps_0", [*SAMPLE, "--model", "{pipe}", "--out", "{new}", "--steps", "0"],
     r"num_inference_steps must be >= 1, got 0$"),
    ("sample_steps_100", [*SAMPLE, "--model", "{pipe}", "--out", "{new}", "--steps", "100"],
     r"num_inference_steps=100 is more than the LCM sampler's 50 original_inference_steps; use at most 50$"),
    ("sample_guidance_nan", [*SAMPLE, "--model", "{pipe}", "--out", "{new}", "--guidance", "nan"],
     r"guidance_scale must be >= 0 and finite, got nan$"),
    ("sample_guidance_negative", [*SAMPLE, "--model", "{pipe}", "--out", "{new}", "--guidance", "-1"],
     r"guidance_scale must be >= 0 and finite, got -1\.0$"),
    ("sample_height_60", [*SAMPLE, "--model", "{pipe}", "--out", "{new}", "--height", "60"],
     r"height and width must be positive multiples of 8 .* got 60x64$"),
    ("sample_num_images_0", [*SAMPLE, "--model", "{pipe}", "--out", "{new}", "--num-images", "0"],
     r"--num-images must be >= 1, got 0$"),
    ("sample_lora_missing", [*SAMPLE, "--model", "{pipe}", "--out", "{new}", "--lora", "{root}/x.safetensors"],
     r"--lora .*x\.safetensors: no such file$"),
    ("eval_num_prompts_0", ["eval", "--teacher", "{pipe}", "--lcm", "{pipe}", "--out", "{new}", "--num-prompts", "0"],
     r"--num-prompts must be >= 1, got 0$"),
    ("eval_steps_0", ["eval", "--teacher", "{pipe}", "--lcm", "{pipe}", "--out", "{new}", "--steps", "4", "0"],
     r"--steps must be >= 1, got 0$"),
    ("eval_out_is_file", ["eval", "--teacher", "{pipe}", "--lcm", "{pipe}", "--out", "{afile}"], r"--out .*afile: is a file"),
    ("eval_teacher_missing", ["eval", "--teacher", "{root}/nowhere", "--lcm", "{pipe}", "--out", "{new}"],
     r"--teacher .*nowhere: no such folder$"),
    ("eval_bad_evaluator", ["eval", "--teacher", "{pipe}", "--lcm", "{pipe}", "--out", "{new}", "--evaluator", "nomodule:F"],
     r"--evaluator nomodule:F: cannot load it \(.*\); give MODULE:FACTORY$"),
    ("export_workdir_missing", ["export", "--workdir", "{root}/nowhere", "--out", "{new}"], r"--workdir .*nowhere: no such folder$"),
    ("export_not_a_run", ["export", "--workdir", "{empty}", "--out", "{new}"],
     r"empty is not a training workdir: it has no config\.json$"),
    ("export_bad_config_json", ["export", "--workdir", "{bad_run}", "--out", "{new}"],
     r"bad_run/config\.json is not valid JSON \(.*\); it is written by lcm_jax\.train$"),
    ("export_missing_step", ["export", "--workdir", "{run}", "--out", "{new}", "--step", "7"],
     r"run/checkpoints has no step 7; it holds \[2\]$"),
    ("cache_config_missing", ["cache", "--config", "{root}/none.py", "--out", "{new}"], r"--config .*none\.py: no such file$"),
    ("cache_set_no_equals", ["cache", "--config", TINY, "--out", "{new}", "--set", "data.cache_size"],
     r"--set data\.cache_size: expected key=value, e\.g\. data\.cache_size=10000$"),
    ("cache_set_misspelt", ["cache", "--config", TINY, "--out", "{new}", "--set", "data.cache_sise=4"],
     r"--set data\.cache_sise=4: .*cache_sise"),
    ("convert_model_missing", ["convert", "--model", "{root}/nowhere", "--out", "{new}"], r"--model .*nowhere: no such folder$"),
    ("convert_onto_itself", ["convert", "--model", "{pipe}", "--out", "{pipe}"], r"--out must differ from --model$"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_command_prints_one_line_before_any_work(places, capsys, argv, message):
    argv = [a.format(**places) for a in argv]
    watched = ("run", "pipe", "afile", "bad_run", "bad_index", "bad_defaults", "odd_defaults")
    before, compiles = {k: digest(places[k]) for k in watched}, _Compiles.count
    capsys.readouterr()
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    line = _one_line(err)
    assert line.startswith(f"lcm-jax {argv[0]}: error: ")
    assert re.search(message, line), line
    assert "strength" not in line and "compiling" not in out
    assert _Compiles.count == compiles
    assert {k: digest(places[k]) for k in watched} == before
    assert not os.path.exists(places["new"])


def test_export_still_reads_a_run_after_refused_resumes(places, tmp_path, capsys):
    """The resume cases above leave the run readable: its config.json and checkpoints."""
    out = str(tmp_path / "exported")
    assert cli.main(["export", "--workdir", places["run"], "--out", out]) == 0
    assert os.path.exists(os.path.join(out, "unet", "config.json"))


# ---------------------------------------------------------------------------------------------
# The Python API: typed exceptions carrying the same one-line messages
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(places):
    from lcm_jax.pipeline import LCMPipeline

    return LCMPipeline.from_pretrained(places["pipe"])


API = [  # (id, call arguments, the message)
    ("empty_prompt_list", dict(prompt=[]), r"^prompt is an empty list; give a string or a list of at least one$"),
    ("guidance_nan", dict(prompt="x", guidance_scale=math.nan), r"^guidance_scale must be >= 0 and finite, got nan$"),
    ("guidance_inf", dict(prompt="x", guidance_scale=math.inf), r"^guidance_scale must be >= 0 and finite, got inf$"),
    ("steps_100", dict(prompt="x", num_inference_steps=100, height=64, width=64),
     r"^num_inference_steps=100 is more than the LCM sampler's 50 original_inference_steps; use at most 50$"),
    ("steps_0", dict(prompt="x", num_inference_steps=0), r"^num_inference_steps must be >= 1, got 0$"),
    ("size", dict(prompt="x", height=30, width=64), r"multiples of 8 .* got 30x64$"),
    ("sampler", dict(prompt="x", sampler="euler"), r"^sampler 'euler' unknown; choose one of \('lcm', 'tcd', 'ddim', 'dpm'\)$"),
    ("compile", dict(prompt="x", height=64, width=64, compile="all"), r"^compile must be 'whole', 'model' or 'none', got 'all'$"),
    ("latents_shape", dict(prompt="x", height=64, width=64, latents=np.zeros((1, 4, 4, 4), np.float32)),
     r"^latents have shape \(1, 4, 4, 4\), expected \(1, 8, 8, 4\)"),
]


@pytest.mark.parametrize("kwargs, message", [c[1:] for c in API], ids=[c[0] for c in API])
def test_pipeline_call_raises_one_line(pipe, kwargs, message):
    with pytest.raises(ValueError) as e:
        pipe(**kwargs)
    assert re.search(message, _one_line(str(e.value))), str(e.value)


def test_from_pretrained_on_a_damaged_folder(places):
    from lcm_jax.pipeline import LCMPipeline

    with pytest.raises(WeightsError, match=r"model_index\.json is not valid JSON"):
        LCMPipeline.from_pretrained(places["bad_index"])


def test_truncated_jpeg_is_named(places):
    """An image folder's undecodable image stops the run naming the file (a folder source has no
    skip counter: the image is listed by the user's own metadata.jsonl)."""
    from lcm_jax.data.sources import folder_examples

    read, n = folder_examples(places["jpeg"], 32)
    assert n == 1
    with pytest.raises(ValueError, match=r"jpeg/a\.jpg: cannot decode this image \(.*\); replace it "
                                         r"or drop its line from .*jpeg/metadata\.jsonl$"):
        read(0)


def test_restore_of_a_folder_that_is_not_a_run(places):
    from lcm_jax.training.checkpoints import restore

    with pytest.raises(RunError, match=r"is not a training workdir: it has no config\.json$"):
        restore(places["empty"])


def test_reading_a_run_that_saved_nothing_leaves_it_as_it_was(places, tmp_path):
    """A run folder with its config.json but no checkpoint yet: restore and restore_weights refuse
    it with one line, and neither makes its checkpoints/ folder."""
    from lcm_jax.training.checkpoints import restore, restore_weights

    unsaved = tmp_path / "unsaved"
    unsaved.mkdir()
    shutil.copy(os.path.join(places["run"], "config.json"), unsaved)
    for read in (restore, restore_weights):
        with pytest.raises(RunError, match=r"unsaved/checkpoints holds no finished checkpoint$"):
            read(str(unsaved))
    assert os.listdir(unsaved) == ["config.json"]
