"""`lcm-jax` command line (sample, convert, export, eval).

The tiny pipeline is sampled at batch 2, 4 LCM steps, 64x64 everywhere so that the second sample
call reuses the first one's compiled program from the persistent cache.
"""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from tiny_pipeline import build_pipeline

import lcm_jax
from lcm_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = ["--height", "64", "--width", "64", "--steps", "4"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli_pipeline"))
    build_pipeline(path)
    return path


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


def test_sample_writes_pngs_and_grid(folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["sample", "--model", folder, "--prompt", "a red circle", "--prompt", "a blue star",
                   "--out", str(out), *SIZE])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["00_00.png", "01_00.png", "grid.png"]
    a, b = _png(out / "00_00.png"), _png(out / "01_00.png")
    assert a.shape == b.shape == (64, 64, 3)
    assert a.std() > 1.0 and np.abs(a.astype(int) - b).max() > 0  # not constant, prompts matter
    assert _png(out / "grid.png").shape == (2 + 2 * 66, 2 + 66, 3)  # a row per prompt, pad 2
    printed = capsys.readouterr().out
    for text in ("[1/3] loading", "compiling and sampling 2 image(s)", "XLA compile", str(out / "grid.png")):
        assert text in printed


@pytest.mark.parametrize("masked", [False, True], ids=["img2img", "inpaint"])
def test_sample_from_an_init_image_equals_the_pipeline(folder, tmp_path, masked):
    """--init-image (and --mask) give the images of LCMPipeline.img2img / inpaint on the same
    inputs, written as PNGs."""
    rs = np.random.default_rng(0)
    image = (rs.random((64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(image).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    flags = ["--init-image", str(tmp_path / "init.png"), "--strength", "0.6"]
    flags += ["--mask", str(tmp_path / "mask.png")] if masked else []
    out = tmp_path / "out"
    assert cli.main(["sample", "--model", folder, "--prompt", "a red circle", "--out", str(out),
                     "--steps", "4", "--guidance", "8.5", "--sampler", "lcm", *flags]) == 0
    pipe = lcm_jax.LCMPipeline.from_pretrained(folder)
    kwargs = dict(strength=0.6, num_inference_steps=4, guidance_scale=8.5, seed=0, sampler="lcm")
    ref = (pipe.inpaint(["a red circle"], image[None], mask[None], **kwargs) if masked
           else pipe.img2img(["a red circle"], image[None], **kwargs))
    ref = (np.clip(ref[0], 0, 1) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(_png(out / "00_00.png"), ref)
    assert np.abs(ref.astype(int) - image).mean() > 1.0  # the image was changed


def test_sample_edit_flags_are_checked_before_loading(folder, tmp_path, capsys):
    base = ["sample", "--model", folder, "--prompt", "x", "--out", str(tmp_path / "o")]
    for extra, message in ((["--mask", "m.png"], "--mask needs --init-image"),
                           (["--strength", "0.5"], "--strength needs --init-image"),
                           (["--init-image", str(tmp_path / "none.png")], "none.png: cannot read it")):
        assert cli.main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_sample_num_images_per_prompt(folder, tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["sample", "--model", folder, "--prompt", "a red circle", "--num-images", "2",
                   "--seed", "3", "--out", str(out), *SIZE])
    assert rc == 0
    a, b = _png(out / "00_00.png"), _png(out / "00_01.png")
    assert np.abs(a.astype(int) - b).max() > 0  # one prompt, two noise draws


@pytest.mark.parametrize("make, match", [
    (lambda tmp: str(tmp / "missing"), r"--model .*missing: no such folder"),
    (lambda tmp: str(tmp), r"is not a diffusers pipeline folder: it has no model_index.json"),
])
def test_sample_bad_model_folder(tmp_path, capsys, make, match):
    rc = cli.main(["sample", "--model", make(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lcm-jax sample: error: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert re.search(match, err), err


def test_sample_bad_size_is_one_line(folder, tmp_path, capsys):
    rc = cli.main(["sample", "--model", folder, "--prompt", "x", "--height", "60", "--out", str(tmp_path)])
    assert rc == 2
    assert "multiples of 8" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# convert / eval
# ---------------------------------------------------------------------------------------------


def test_convert_folder_round_trips_the_unet(folder, tmp_path):
    out = str(tmp_path / "converted")
    assert cli.main(["convert", "--model", folder, "--out", out]) == 0
    _, original = lcm_jax.load_unet(os.path.join(folder, "unet"))
    _, written = lcm_jax.load_unet(os.path.join(out, "unet"))
    for x, y in zip(jax.tree.leaves(original), jax.tree.leaves(written), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert sorted(os.listdir(out)) == sorted(os.listdir(folder))


def test_eval_bad_folders(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert cli.main(["eval", "--teacher", missing, "--lcm", missing]) == 2
    assert f"--teacher {missing}: no such folder" in capsys.readouterr().err
    assert cli.main(["eval", "--teacher", str(tmp_path), "--lcm", str(tmp_path)]) == 2
    assert "no model_index.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A two-step tiny LCD run (random teacher without VAE), checkpointed at step 2."""
    workdir = str(tmp_path_factory.mktemp("cli_run"))
    cmd = [sys.executable, "-m", "lcm_jax.train", "--config=configs/tiny_lcd.py",
           f"--workdir={workdir}", "--config.total_steps=2", "--config.checkpoint_every=2",
           "--config.eval_every=0"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def _checkpoint(workdir: str) -> dict:
    """The raw saved TrainState (orbax, restored from its own metadata), independent of the CLI."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    try:
        return mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore())
    finally:
        mngr.close()


def test_export_lcd_writes_the_target_unet(run_dir, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    out = str(tmp_path / "exported")
    assert cli.main(["export", "--workdir", run_dir, "--out", out]) == 0
    assert os.listdir(out) == ["unet"]  # random teacher: no VAE or text encoder to copy
    ckpt = _checkpoint(run_dir)
    target, online = jax.tree.leaves(ckpt["target_params"]), jax.tree.leaves(ckpt["params"])
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(target, online)) > 1e-5

    # 1. the folder loads in lcm-jax with exactly the EMA target params
    unet, params = lcm_jax.load_unet(os.path.join(out, "unet"))
    assert unet.config.time_cond_proj_dim == 32
    assert jax.tree.structure(params) == jax.tree.structure(ckpt["target_params"])
    for x, y in zip(jax.tree.leaves(params), target):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # 2. one forward pass: the run's module with checkpoint params vs diffusers on the folder
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    t = np.array([499], np.int32)
    ctx = rng.standard_normal((1, 8, 32)).astype(np.float32)
    w = rng.standard_normal((1, 32)).astype(np.float32)
    from lcm_jax.training.checkpoints import load_run_config
    from lcm_jax.training.models import student_shapes

    module, _ = student_shapes(load_run_config(run_dir))
    ours = np.asarray(module.apply({"params": ckpt["target_params"]}, jnp.asarray(x), jnp.asarray(t),
                                   jnp.asarray(ctx), timestep_cond=jnp.asarray(w)))
    tunet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    with torch.no_grad():
        ref = tunet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    torch.from_numpy(ctx), timestep_cond=torch.from_numpy(w)).sample.numpy()
    ref = ref.transpose(0, 2, 3, 1)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, err


def _lora_for(unet_params, rank: int = 4):
    """Random LoRA factors (non-zero `up`, as after training) for every targeted kernel."""
    from lcm_jax.models import lora as lora_lib

    lora = lora_lib.init_lora(jax.random.PRNGKey(0), unet_params, rank)
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: 0.05 * rng.standard_normal(x.shape).astype(np.float32), lora)


def test_export_lora_round_trips(folder, tmp_path):
    from lcm_jax.convert.export import LORA_FILE, export_lora
    from lcm_jax.convert.lora import load_lora
    _, params = lcm_jax.load_unet(os.path.join(folder, "unet"))
    lora = _lora_for(params)
    path = export_lora(lora, 8.0 / 4, str(tmp_path / "lora"))
    assert path == str(tmp_path / "lora" / LORA_FILE)
    loaded, scale = load_lora(path, params)  # PEFT files carry no alpha: alpha/rank is in `up`
    assert scale == 1.0
    want, got = traverse_util.flatten_dict(lora), traverse_util.flatten_dict(loaded)
    assert sorted(want) == sorted(got)
    for key, value in want.items():
        factor = 8.0 / 4 if key[-1] == "up" else 1.0
        np.testing.assert_allclose(got[key], factor * np.asarray(value), rtol=1e-6, atol=1e-7)


def test_sample_with_lora_changes_the_images(folder, tmp_path):
    from lcm_jax.convert.lora import save_lora_peft

    _, params = lcm_jax.load_unet(os.path.join(folder, "unet"))
    save_lora_peft(_lora_for(params), 1.0, str(tmp_path / "lora.safetensors"))
    runs = {}
    for name, extra in (("base", []), ("lora", ["--lora", str(tmp_path / "lora.safetensors")])):
        out = tmp_path / name
        assert cli.main(["sample", "--model", folder, "--prompt", "a red circle", "--prompt", "a blue star",
                         "--out", str(out), *SIZE, *extra]) == 0
        runs[name] = _png(out / "00_00.png").astype(int)
    assert np.abs(runs["base"] - runs["lora"]).max() > 0


def test_export_with_teacher_folder_is_a_complete_pipeline(folder, tmp_path):
    """A run distilled from a pipeline folder exports a folder that `lcm-jax sample` takes."""
    from lcm_jax.convert.export import export_pipeline

    unet, params = lcm_jax.load_unet(os.path.join(folder, "unet"))
    out = tmp_path / "exported"
    export_pipeline(params, unet.config, str(out), folder, lcm_grid=(50, 10.0))
    assert sorted(os.listdir(out)) == sorted(os.listdir(folder))
    with open(out / "model_index.json") as f:
        index = json.load(f)
    assert index["_class_name"] == "LatentConsistencyModelPipeline"
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    images = {}
    for name, model in (("teacher", folder), ("exported", str(out))):
        assert cli.main(["sample", "--model", model, "--prompt", "a red circle", "--prompt", "a blue star",
                         "--out", str(tmp_path / name), *SIZE]) == 0
        images[name] = _png(tmp_path / name / "grid.png")
    np.testing.assert_array_equal(images["teacher"], images["exported"])


def test_export_bad_workdir(tmp_path, capsys):
    assert cli.main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "is not a training workdir: it has no config.json" in capsys.readouterr().err


def test_lcm_scheduler_config_from_teacher():
    from lcm_jax.convert.export import lcm_scheduler_config

    pndm = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "skip_prk_steps": True, "steps_offset": 1}
    out = lcm_scheduler_config(pndm, 50, 10.0)
    assert out == {"_class_name": "LCMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "steps_offset": 1,
                   "original_inference_steps": 50, "timestep_scaling": 10.0}
