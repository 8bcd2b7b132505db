"""Export: what lcm-jax writes loads in diffusers PyTorch and samples the same images.

A tiny LCD run sharded over 2 (fake CPU) devices is restored one weight tree at a time, on the
host; tracemalloc shows the restore holds that tree only. Full-UNet exports (SD1-, SD2- and
SDXL-style) and LoRA files (PEFT and kohya) are written from perturbed weights by the export
functions, loaded by diffusers, and sampled at 2 LCM steps from the same latents and re-noising
draws as lcm-jax's own pipeline over the in-memory weights.
"""
import dataclasses
import json
import os
import runpy
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors import safe_open

from tiny_pipeline import SD2_SCHEDULER, SD2_UNET, build_pipeline
from tiny_sdxl import build_sdxl_pipeline

import lcm_jax
from lcm_jax import cli
from lcm_jax.components import load_components
from lcm_jax.convert.export import export_lora, export_pipeline
from lcm_jax.convert.lora import load_lora
from lcm_jax.models import lora as lora_lib
from lcm_jax.pipeline import LCMPipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle", "a big blue star"]
STEPS = 2
TOL = 1e-3


# ---------------------------------------------------------------------------------------------
# The subtree restore of a sharded run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """Two LCD steps of configs/tiny_lcd.py with the params split over fsdp=2, checkpointed."""
    workdir = str(tmp_path_factory.mktemp("export_run"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "lcm_jax.train", "--config=configs/tiny_lcd.py", f"--workdir={workdir}",
           "--config.total_steps=2", "--config.checkpoint_every=2", "--config.eval_every=0",
           "--config.mesh.fsdp=2"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


# Run in a fresh one-device process. What a restore holds is what it returns plus what it read:
# the bytes orbax's tensorstore read from the checkpoint (its own counter) and the bytes of the
# returned arrays. (tracemalloc cannot see them: tensorstore allocates the arrays.) The full
# TrainState restored the same way, as host arrays, is the reference that must read 4 trees.
MEASURE = r"""
import json, sys
import jax, numpy as np, orbax.checkpoint as ocp, tensorstore as ts
from lcm_jax.training.checkpoints import abstract_state, load_run_config, restore_weights

workdir, out = sys.argv[1:3]

def full_state():
    state = abstract_state(load_run_config(workdir))[1]
    host = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), state)
    mngr = ocp.CheckpointManager(workdir + "/checkpoints")
    state = mngr.restore(mngr.latest_step(), args=ocp.args.PyTreeRestore(item=state, restore_args=host))
    mngr.close()
    return state

def bytes_read():
    m = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return m[0]["values"][0]["value"] if m else 0

def measured(fn, tree_of):
    before = bytes_read()
    result = fn()
    return result, {"read": bytes_read() - before,
                    "bytes": sum(x.nbytes for x in jax.tree.leaves(tree_of(result)))}

def save(name, tree):
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree))
    np.save(f"{out}/{name}.npy", np.concatenate([x.ravel() for x in jax.tree.leaves(tree)]))

res = {}
for which in ("sampling", "ema", "online"):
    run, res[which] = measured(lambda: restore_weights(workdir, which), lambda r: r.params)
    save(which, run.params)
    res[which]["step"] = run.step
state, res["full"] = measured(full_state, lambda s: s)
save("params", state.params)
save("target_params", state.target_params)
print(json.dumps(res))
"""


def test_restore_weights_holds_only_the_exported_tree(sharded_run, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    done = subprocess.run([sys.executable, "-c", MEASURE, sharded_run, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(res))
    arrays = {k: np.load(tmp_path / f"{k}.npy") for k in ("sampling", "ema", "online", "params", "target_params")}
    # each choice is exactly the saved subtree it names; an LCD run keeps an EMA, so it samples
    np.testing.assert_array_equal(arrays["ema"], arrays["target_params"])
    np.testing.assert_array_equal(arrays["online"], arrays["params"])
    np.testing.assert_array_equal(arrays["sampling"], arrays["target_params"])
    assert np.abs(arrays["params"] - arrays["target_params"]).max() > 1e-6  # two different trees
    tree = arrays["params"].nbytes
    # params + EMA target + two Adam moments: the full state is 4 trees, and reads them
    assert res["full"]["bytes"] >= 4 * tree and res["full"]["read"] >= 3.5 * tree
    for which in ("sampling", "ema", "online"):
        assert res[which]["bytes"] == tree and res[which]["step"] == 2
        assert res[which]["read"] <= 1.1 * tree, (which, res[which]["read"], tree)


def test_writing_the_unet_holds_one_tensor_beyond_the_tree(sharded_run, tmp_path):
    """What export adds to the restored tree while it writes: transposed kernels are views, and
    each is made contiguous only while it is written (tracemalloc sees every numpy copy)."""
    import tracemalloc

    from lcm_jax.convert.unet import load_unet, unet_to_diffusers
    from lcm_jax.training.checkpoints import restore_weights

    run = restore_weights(sharded_run, "sampling")
    leaves = jax.tree.leaves(run.params)
    tree, largest = sum(x.nbytes for x in leaves), max(x.nbytes for x in leaves)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        unet_to_diffusers(run.params, run.unet.config, str(tmp_path / "unet"))
        extra = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    print(f"tree {tree} B, largest tensor {largest} B, writing added {extra} B")
    assert extra <= largest + 256 * 1024 < tree, (extra, largest, tree)
    _, back = load_unet(str(tmp_path / "unet"))  # and what it wrote is the tree
    for a, b in zip(leaves, jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_cli_export_flags_pick_the_weights(sharded_run, tmp_path):
    """--weights online and ema write different UNets, each equal to its checkpoint subtree."""
    from lcm_jax.training.checkpoints import restore_weights

    for which in ("online", "ema"):
        out = str(tmp_path / which)
        assert cli.main(["export", "--workdir", sharded_run, "--out", out, "--weights", which]) == 0
        _, params = lcm_jax.load_unet(os.path.join(out, "unet"))
        want = restore_weights(sharded_run, which).params
        assert jax.tree.structure(params) == jax.tree.structure(want)
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(x), y)


def test_export_bad_step_and_no_ema(sharded_run, tmp_path, capsys):
    assert cli.main(["export", "--workdir", sharded_run, "--out", str(tmp_path / "o"), "--step", "7"]) == 2
    assert "checkpoints has no step 7; it holds [2]" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_weights_choice_follows_sampling_params():
    get_config = runpy.run_path(os.path.join(REPO, "configs", "tiny_lcd.py"))["get_config"]
    from lcm_jax.training.checkpoints import RunError, abstract_state, weights_field

    lcd, lora = abstract_state(get_config("lcd"))[1], abstract_state(get_config("lora"))[1]
    assert [weights_field(lcd, w) for w in ("sampling", "ema", "online")] == \
        ["target_params", "target_params", "params"]
    assert weights_field(lora, "sampling") == "params"
    with pytest.raises(RunError, match="keeps no EMA"):
        weights_field(lora, "ema")
    with pytest.raises(ValueError, match="weights 'last' unknown"):
        weights_field(lcd, "last")


# ---------------------------------------------------------------------------------------------
# Full-UNet exports against diffusers
# ---------------------------------------------------------------------------------------------


def _perturbed(params, seed: int, scale: float = 0.02):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32),
                        params)


def _diffusers_images(tpipe, latents: np.ndarray, seed: int, **kwargs):
    """diffusers' images from NHWC latents, and the re-noising draws its LCMScheduler made."""
    shape = latents.transpose(0, 3, 1, 2).shape
    images = tpipe(PROMPTS, num_inference_steps=STEPS, height=64, width=64,
                   latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                   generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
    g = torch.Generator().manual_seed(seed)
    noises = np.stack([torch.randn(shape, generator=g).numpy().transpose(0, 2, 3, 1) for _ in range(STEPS)])
    return images, noises


def _lcm_jax_images(components, unet, params, latents, noises, guidance_scale: float) -> np.ndarray:
    pipe = LCMPipeline(dataclasses.replace(components, unet=unet, unet_params=params))
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, height=64, width=64,
                latents=latents, noises=noises, original_inference_steps=50)


def _latents(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 8, 8, 4)).astype(np.float32)


def _student(build, folder: str, seed: int):
    """A w-conditioned UNet (time_cond_proj_dim 32) of the teacher's layout, perturbed."""
    build(folder, time_cond_proj_dim=32, seed=seed)
    unet, params = lcm_jax.load_unet(os.path.join(folder, "unet"))
    return unet, _perturbed(params, seed)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_lcd_export_matches_diffusers(style, tmp_path):
    from diffusers import DiffusionPipeline, LatentConsistencyModelPipeline

    kw = dict(unet=SD2_UNET, scheduler=SD2_SCHEDULER) if style == "sd2" else {}
    build = lambda folder, **a: build_pipeline(folder, **a, **kw)
    teacher = str(tmp_path / "teacher")
    build(teacher, time_cond_proj_dim=None, seed=3)
    unet, params = _student(build, str(tmp_path / "student"), seed=5)
    out = str(tmp_path / "exported")
    export_pipeline(params, unet.config, out, teacher, lcm_grid=(50, 10.0))

    tpipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(tpipe, LatentConsistencyModelPipeline)
    assert tpipe.scheduler.config.prediction_type == ("v_prediction" if style == "sd2" else "epsilon")
    latents = _latents(1)
    ref, noises = _diffusers_images(tpipe, latents, seed=1, guidance_scale=6.0, original_inference_steps=50)
    ours = _lcm_jax_images(load_components(teacher, with_unet=False), unet, params, latents, noises, 6.0)
    err = float(np.abs(ours - ref).max())
    print(f"{style} LCD export vs lcm-jax: max abs image difference {err:.2e}")
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    assert err <= TOL, err


def test_sdxl_export_is_a_complete_pipeline_matching_diffusers(tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionXLPipeline

    teacher = str(tmp_path / "teacher")
    build_sdxl_pipeline(teacher, time_cond_proj_dim=None, scheduler="ddim", seed=1)
    unet, params = _student(lambda f, **a: build_sdxl_pipeline(f, scheduler="lcm", **a),
                            str(tmp_path / "student"), seed=4)
    out = str(tmp_path / "exported")
    export_pipeline(params, unet.config, out, teacher, lcm_grid=(50, 10.0))
    assert sorted(os.listdir(out)) == sorted(os.listdir(teacher))  # text_encoder_2/, tokenizer_2/ too

    tpipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(tpipe, StableDiffusionXLPipeline) and isinstance(tpipe.scheduler, LCMScheduler)
    latents = _latents(2)
    ref, noises = _diffusers_images(tpipe, latents, seed=2, guidance_scale=6.0)
    teacher_parts = load_components(teacher, with_unet=False)
    assert teacher_parts.is_sdxl
    ours = _lcm_jax_images(teacher_parts, unet, params, latents, noises, 6.0)
    assert LCMPipeline.from_pretrained(out).components.is_sdxl  # and lcm-jax reads the folder back
    err = float(np.abs(ours - ref).max())
    print(f"SDXL LCD export vs lcm-jax: max abs image difference {err:.2e}")
    assert err <= TOL, err


def test_export_refuses_a_teacher_missing_a_listed_part(tmp_path):
    teacher = str(tmp_path / "teacher")
    build_sdxl_pipeline(teacher, time_cond_proj_dim=None, scheduler="ddim", seed=1)
    unet, params = lcm_jax.load_unet(os.path.join(teacher, "unet"))
    os.rename(os.path.join(teacher, "text_encoder_2"), os.path.join(tmp_path, "moved"))
    out = tmp_path / "exported"
    with pytest.raises(FileNotFoundError, match=r"lists \['text_encoder_2'\] but the folder has no"):
        export_pipeline(params, unet.config, str(out), teacher, lcm_grid=(50, 10.0))
    assert not out.exists()  # nothing written


# ---------------------------------------------------------------------------------------------
# LoRA exports against diffusers' load_lora_weights
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_teacher(tmp_path_factory):
    """An SD1-style teacher (no w-embedding) and trained-looking LoRA factors (non-zero `up`)."""
    folder = str(tmp_path_factory.mktemp("lora_teacher"))
    build_pipeline(folder, time_cond_proj_dim=None, seed=3)
    _, params = lcm_jax.load_unet(os.path.join(folder, "unet"))
    factors = lora_lib.init_lora(jax.random.PRNGKey(0), params, rank=4)
    return folder, params, _perturbed(factors, seed=6, scale=0.05)


SCALE = 8.0 / 4  # lora.alpha / lora.rank


@pytest.mark.parametrize("lora_format", ["peft", "kohya"])
def test_lora_export_matches_diffusers(lora_teacher, lora_format, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder, params, factors = lora_teacher
    path = export_lora(factors, SCALE, str(tmp_path / "lora"), lora_format)
    with safe_open(path, "np") as f:  # the key layout of the format
        keys = list(f.keys())
    kohya = all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert kohya == (lora_format == "kohya") and all(k.startswith("unet.") for k in keys) != kohya

    # diffusers samples LCM-LoRA with the teacher's own pipeline class, an LCMScheduler, no CFG
    tpipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    latents = _latents(3)
    base, _ = _diffusers_images(tpipe, latents, seed=3, guidance_scale=1.0)
    tpipe.load_lora_weights(path)
    ref, noises = _diffusers_images(tpipe, latents, seed=3, guidance_scale=1.0)
    comps = load_components(folder)
    merged = lora_lib.merge(comps.unet_params, factors, SCALE)
    ours = _lcm_jax_images(comps, comps.unet, merged, latents, noises, 1.0)
    err = float(np.abs(ours - ref).max())
    print(f"LoRA ({lora_format}) export vs lcm-jax: max abs image difference {err:.2e} "
          f"(the LoRA moves diffusers' images by {np.abs(ref - base).max():.2e})")
    assert np.abs(ref - base).max() > 10 * TOL  # diffusers applied it
    assert err <= TOL, err


def test_kohya_lora_round_trips_through_load_lora(lora_teacher, tmp_path):
    _, params, factors = lora_teacher
    path = export_lora(factors, SCALE, str(tmp_path / "lora.safetensors"), "kohya")
    loaded, scale = load_lora(path, params)  # alpha / rank folded into `up`
    assert scale == 1.0
    want, got = traverse_util.flatten_dict(factors), traverse_util.flatten_dict(loaded)
    assert sorted(want) == sorted(got)
    for key, value in want.items():
        factor = SCALE if key[-1] == "up" else 1.0
        np.testing.assert_allclose(got[key], factor * np.asarray(value), rtol=1e-6, atol=1e-7)


def test_export_lora_bad_format(lora_teacher, tmp_path):
    _, _, factors = lora_teacher
    with pytest.raises(ValueError, match="LoRA format 'a1111' unknown; choose one of"):
        export_lora(factors, SCALE, str(tmp_path / "x.safetensors"), "a1111")
