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
import json, jax
from lcm_jax import planning
from lcm_jax.cli import load_config

plan = planning.plan_step(load_config("configs/tiny_lcd.py"), "v5e-4")
jax.config.update("jax_optimization_level", "O0")  # what `lcm-jax plan --opt-level O0` sets
fast = planning.plan_step(load_config("configs/tiny_lcd.py"), "v5e-4")
chip = planning.CHIPS["v5e"]
print(json.dumps({"fits": plan.fits, "flops": plan.flops, "bytes": plan.bytes_accessed,
                  "step_time": plan.step_time, "peak": chip.peak_bf16_flops, "bw": chip.hbm_bandwidth,
                  "state": plan.state_bytes, "argument": plan.argument_bytes, "devices": plan.devices,
                  "levels": [plan.opt_level, fast.opt_level], "o0_argument": fast.argument_bytes,
                  "temps": [plan.temp_bytes, fast.temp_bytes], "o0_text": planning.format_plan(fast)}))
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
    # --opt-level O0 reaches libtpu: the same arguments (up to layout padding), another program
    # (other temporaries), and the plan says which level it was compiled at
    assert r["levels"] == ["", "O0"] and r["o0_argument"] == pytest.approx(r["argument"], rel=1e-3)
    assert r["temps"][0] > 0 and r["temps"][1] > 0 and r["temps"][0] != r["temps"][1], r["temps"]
    assert "compiled at XLA optimisation level O0" in r["o0_text"]


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


# The shapes LCD's 1- and 2-step samplers planned on cpu:2 (2 images per device): the extra step
# costs one UNet forward of the student on those 2 images, counted on its own here.
SAMPLER = r"""
import json, jax, jax.numpy as jnp, numpy as np
from lcm_jax import planning
from lcm_jax.cli import load_config
from lcm_jax.training.models import build_models

config = load_config("lcm_jax/worlds/shapes/configs/shapes_lcd.py")
plans = {n: planning.plan_sampler(config, "cpu:2", 4, n) for n in (1, 2)}
models = build_models(config)
c, s = models.unet.config, config.data.latent_size
w = jnp.zeros((2, c.time_cond_proj_dim))
unet = jax.jit(lambda p, x, t, text: models.unet.apply({"params": p}, x, t, text, timestep_cond=w))
args = (models.init_params, jnp.zeros((2, s, s, c.in_channels)), jnp.zeros((2,), jnp.int32),
        jnp.zeros((2, config.data.text_len, c.cross_attention_dim[0])))
nbytes = lambda t: sum(np.asarray(x).nbytes for x in jax.tree.leaves(t))
print(json.dumps({"flops": [plans[n].flops for n in (1, 2)], "unet": unet.lower(*args).cost_analysis()["flops"],
                  "params": plans[1].state_bytes["params"], "live_params": nbytes(models.init_params),
                  "vae": plans[1].frozen_bytes["vae"], "live_vae": nbytes(models.frozen["vae"]),
                  "runs": plans[1].compiled is not None}))
"""


def test_sampler_plan_counts_every_step():
    out = _python(SAMPLER, devices=2)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["params"] == r["live_params"] and r["vae"] == r["live_vae"], r
    assert r["runs"]
    # XLA's own count of the compiled scan would be the same for 1 and 2 steps
    assert r["flops"][1] - r["flops"][0] == pytest.approx(r["unet"], rel=0.01), r


# What XLA's cost analysis of the compiled TPU program misses: an 8-step sampler's scan counted as
# one step, splash attention's kernel as nothing. The planner's count has both.
TPU_COUNTS = r"""
import json, jax, jax.numpy as jnp
from lcm_jax import planning, sampling, schedules, sharding
from lcm_jax.models import layers

devices, _ = planning.target_devices("v5e-4")
mesh = sharding.make_mesh(4, 1, devices)
rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
x = jax.ShapeDtypeStruct((4, 1, 512, 512), jnp.float32, sharding=data)
w = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=rep)
ts = schedules.lcm_timesteps(8)
sampler = lambda model: jax.jit(lambda x, w: sampling.lcm_sample(lambda z, t: model(z, w), x,
                                                                 schedules.NoiseSchedule(), ts, jax.random.PRNGKey(0)))
scan, no_model = sampler(lambda z, w: z @ w), sampler(lambda z, w: z)
q = jax.ShapeDtypeStruct((4, 1024, 2, 64), jnp.bfloat16, sharding=data)
attend = jax.jit(lambda a: layers.dot_product_attention(a, a, a, implementation="splash"))
flops = lambda c: (c[0] if isinstance(c, list) else c)["flops"]
with jax.set_mesh(mesh):
    compiled = {"scan": flops(scan.lower(x, w).compile().cost_analysis()),
                "splash": flops(attend.lower(q).compile().cost_analysis())}
print(json.dumps({"compiled": compiled, "counted": {"scan": planning.count_flops(mesh, scan, x, w),
                                                    "no_model": planning.count_flops(mesh, no_model, x, w),
                                                    "splash": planning.count_flops(mesh, attend, q)}}))
"""


@pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
def test_flop_count_sees_loop_trips_and_kernels():
    out = _python(TPU_COUNTS)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    matmuls = 8 * 2 * 4 * 512 ** 3 / 4              # 8 steps of the batch of 4, over 4 devices
    attention = 2 * 2 * 4 * 2 * 1024 * 1024 * 64 / 4  # QK^T and PV, 2 heads, batch 4 over 4 devices
    assert r["counted"]["scan"] - r["counted"]["no_model"] == pytest.approx(matmuls, rel=1e-3), r
    assert r["counted"]["splash"] == pytest.approx(attention, rel=0.05), r  # + the softmax
    assert r["compiled"]["scan"] < matmuls / 4 and r["compiled"]["splash"] < attention / 100, r  # XLA's own
