"""`lcm-jax plan`: the compiled train step's figures against the live arrays of a real run, the
TPU path (libtpu's compile-only devices), and the "does not fit" answer."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from lcm_jax.planning import libtpu_path

HAS_LIBTPU = libtpu_path() is not None
NO_LIBTPU = "no libtpu (`make libtpu` or pip install 'jax[tpu]'): no TPU compiler to plan with"

# Per device (device 0): the planner's bytes, then the live arrays' after init and after one step
# of the planner's own executable (which accepts only arrays of the shardings it was planned for).
LIVE_BYTES = r"""
import json, jax
from lcm_jax import planning, sharding, train
from lcm_jax.cli import load_config

config = load_config("configs/tiny_lcd.py", ["mesh.data=2", "mesh.fsdp=4"])
plan = planning.plan_step(config, "cpu:8")
mesh = sharding.make_mesh(2, 4)
s = train.setup(config, mesh)
d0 = jax.devices()[0]
on_d0 = lambda tree: sum(sh.data.nbytes for x in jax.tree.leaves(tree) for sh in x.addressable_shards
                         if sh.device == d0)
live = lambda st: {k: on_d0(getattr(st, k)) for k in ("params", "opt_state", "target_params")}
init = live(s.state)
state, _ = plan.compiled(s.state, s.frozen, sharding.shard_batch(s.source.batch(0), mesh))
print(json.dumps({"plan": plan.state_bytes, "plan_frozen": plan.frozen_bytes, "init": init,
                  "step": live(state), "frozen": {k: on_d0(v) for k, v in s.frozen.items()},
                  "argument": plan.argument_bytes}))
"""

TPU_TINY = r"""
import json
from lcm_jax import planning
from lcm_jax.cli import load_config

plan = planning.plan_step(load_config("configs/tiny_lcd.py"), "v5e-4")
chip = planning.CHIPS["v5e"]
print(json.dumps({"fits": plan.fits, "flops": plan.flops, "bytes": plan.bytes_accessed,
                  "step_time": plan.step_time, "peak": chip.peak_bf16_flops, "bw": chip.hbm_bandwidth,
                  "state": plan.state_bytes, "argument": plan.argument_bytes, "devices": plan.devices}))
"""


def _python(code: str, devices: int = 1, args=(), timeout=1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "lcm_jax.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_plan_bytes_are_the_live_arrays_bytes():
    out = _python(LIVE_BYTES, devices=8)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["plan"] == r["init"] == r["step"], r
    assert r["plan_frozen"] == r["frozen"], r
    assert r["plan"]["params"] > 0 and r["plan"]["opt_state"] > r["plan"]["params"]
    # XLA's arguments are the state, the frozen weights and this device's batch: at least the first two
    assert r["argument"] >= sum(r["plan"].values()) + sum(r["plan_frozen"].values())


@pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
def test_tpu_plan_of_a_tiny_config():
    out = _python(TPU_TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == 4 and r["fits"] is True and r["flops"] > 0 and r["bytes"] > 0
    assert r["step_time"] == pytest.approx(max(r["flops"] / r["peak"], r["bytes"] / r["bw"]))
    assert r["argument"] >= sum(r["state"].values())


@pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
def test_a_config_that_does_not_fit_says_so():
    out = _python("", args=["plan", "--config", "configs/tiny_lcd.py", "--topology", "v5e-4",
                            "--batch_size", "16384", "--set", "data.latent_size=64"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "does not fit" in out.stdout, out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_search_batch_doubles_then_bisects(monkeypatch):
    from lcm_jax import planning
    from lcm_jax.cli import load_config

    chip = planning.CHIPS["v5e"]
    monkeypatch.setattr(planning, "target_devices", lambda topology: ([None] * 4, chip))
    # a step whose bytes grow with the batch: fits up to 5 examples per device
    fake = lambda config, topology, batch: planning.Plan(topology, 4, batch, {}, {},
                                                          temp_bytes=batch // 4 * chip.hbm_bytes // 5, chip=chip)
    monkeypatch.setattr(planning, "plan_step", fake)
    best, plans = planning.search_batch(load_config(os.path.join(ROOT, "configs/tiny_lcd.py")), "v5e-4")
    assert best == 5
    assert [p.batch_size // 4 for p in plans] == [1, 2, 4, 8, 6, 5]


# Public parameter counts of the released models (diffusers / transformers `num_parameters()`).
PUBLIC_COUNTS = {"sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
                 "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                          "text_encoder_2": 694_659_840}}


@pytest.mark.parametrize("model, config", [("sd15", "sd15_lcd.py"), ("sdxl", "sdxl_lcd.py")])
def test_config_folders_build_the_released_models(tmp_path, model, config):
    import jax
    import numpy as np

    from lcm_jax import planning
    from lcm_jax.cli import load_config

    folder = planning.config_folder(model, str(tmp_path / model))
    models = planning.abstract_models(load_config(f"{ROOT}/configs/{config}:{folder}"))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    got = {k: count(models.frozen[k]) for k in PUBLIC_COUNTS[model] if k != "unet"}
    got["unet"] = count(models.frozen["teacher"])
    assert got == PUBLIC_COUNTS[model]
