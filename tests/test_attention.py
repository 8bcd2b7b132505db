"""Splash attention (Pallas, interpret mode on CPU) against the XLA attention at Stable Diffusion
shapes, 'auto' choosing it for a TPU mesh, and the SD 1.5 LCD step compiled with it for v5e."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm_jax.models import layers
from test_plan import HAS_LIBTPU, NO_LIBTPU  # one test of "libtpu is here" for both files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _qkv(q_tokens: int, kv_tokens: int, head_dim: int, heads: int = 2, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(q_tokens + kv_tokens + head_dim), 3)
    return (jax.random.normal(kq, (1, q_tokens, heads, head_dim)).astype(dtype),
            jax.random.normal(kk, (1, kv_tokens, heads, head_dim)).astype(dtype),
            jax.random.normal(kv, (1, kv_tokens, heads, head_dim)).astype(dtype))


def _check(q_tokens: int, kv_tokens: int, head_dim: int, dtype) -> None:
    q, k, v = _qkv(q_tokens, kv_tokens, head_dim, dtype=dtype)
    got = layers.dot_product_attention(q, k, v, implementation="splash")
    want = layers.dot_product_attention(q, k, v, implementation="xla")
    assert got.shape == want.shape == q.shape and got.dtype == dtype
    err = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())
    assert err <= TOLERANCE[dtype], err


# SD 1.5's 64x64 latents: 4096 tokens at the first level, 1024 at the second; 77 text tokens in
# cross-attention; SD 2.x/SDXL head dims 40/80 are padded to 128 inside the kernel wrapper.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("q_tokens, kv_tokens, head_dim", [
    (4096, 4096, 40), (4096, 4096, 64), (4096, 77, 80), (1024, 1024, 40), (1024, 77, 64), (1024, 1024, 80)])
def test_splash_matches_xla(q_tokens, kv_tokens, head_dim, dtype):
    _check(q_tokens, kv_tokens, head_dim, dtype)


def test_splash_gradients_match_xla():
    q, k, v = _qkv(128, 77, 40)
    loss = lambda impl: lambda *a: jnp.sum(layers.dot_product_attention(*a, implementation=impl) ** 2)
    got = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_splash_takes_no_mask():
    q, k, v = _qkv(128, 128, 64)
    with pytest.raises(ValueError, match="'splash' takes no mask"):
        layers.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 128, 128), bool), implementation="splash")


@pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
def test_auto_is_splash_on_a_tpu_mesh():
    from lcm_jax import planning, sharding

    devices, _ = planning.target_devices("v5e-4")
    mesh = sharding.make_mesh(4, 1, devices)
    x = jax.ShapeDtypeStruct((8, 1024, 2, 64), jnp.bfloat16, sharding=sharding.batch_sharding(mesh))
    attend = jax.jit(lambda q: layers.dot_product_attention(q, q, q))
    with jax.set_mesh(mesh):
        tpu_text = attend.lower(x).as_text()
    cpu_text = attend.lower(jax.ShapeDtypeStruct(x.shape, x.dtype)).as_text()
    assert "tpu_custom_call" in tpu_text
    assert "tpu_custom_call" not in cpu_text


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
def test_sd15_lcd_step_with_splash_compiles_for_v5e(tmp_path):
    from lcm_jax import planning
    from lcm_jax.cli import load_config

    config = load_config(f"{ROOT}/configs/sd15_lcd.py:{planning.config_folder('sd15', str(tmp_path / 'sd15'))}",
                         ["mesh.data=1", "mesh.fsdp=4"])
    # At XLA's default level this compile outgrows a 24 GiB host (README, "Planning a run"); O0
    # (`lcm-jax plan --opt-level O0`) compiles the same step in a fraction of the time and memory.
    jax.config.update("jax_optimization_level", "O0")
    try:
        plan = planning.plan_step(config, "v5e-4", batch_size=4)
    finally:
        jax.config.update("jax_optimization_level", "UNKNOWN")
    print(planning.format_plan(plan))  # pytest -s shows what `lcm-jax plan` would print
    assert plan.fits
    assert "tpu_custom_call" in plan.compiled.as_text()  # the splash kernels are in the program
    assert plan.state_bytes["params"] == pytest.approx(859_520_964 * 4 / 4, rel=0.01)  # fp32, over 4
