"""AutoencoderKL: parity with diffusers (PyTorch), loading, export and config/weight errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from lcm_jax.convert import common
from lcm_jax.convert.vae import load_vae, vae_to_diffusers
from lcm_jax.models.vae import AutoencoderKL, DiagonalGaussian

TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
            latent_channels=4, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159)
SD15 = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32,
            latent_channels=4, sample_size=512)


def _rel_err(jax_out, torch_out) -> float:
    t = torch_out.detach().numpy()
    return float(np.max(np.abs(np.asarray(jax_out) - t)) / np.max(np.abs(t)))


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _save_random_vae(config: dict, folder: str, seed: int = 0) -> TorchAutoencoderKL:
    """A diffusers VAE with every parameter perturbed (norm scales, zero-ish biases), saved."""
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("vae"))
    model = _save_random_vae(TINY, folder)
    vae, params = load_vae(folder)
    return folder, model, vae, params


def _check_parity(model, vae, params, size: int) -> DiagonalGaussian:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    f = 2 ** (len(vae.block_out_channels) - 1)
    latents = rng.normal(size=(2, size // f, size // f, 4)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(_nchw(images)).latent_dist
        decoded = model.decode(_nchw(latents)).sample
    jdist = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(params, images)
    jdec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))(params, latents)
    errs = {"mean": _rel_err(jdist.mean, dist.mean.permute(0, 2, 3, 1)),
            "logvar": _rel_err(jdist.logvar, dist.logvar.permute(0, 2, 3, 1)),
            "decode": _rel_err(jdec, decoded.permute(0, 2, 3, 1))}
    print("relative errors", errs)
    assert all(e <= 1e-5 for e in errs.values()), errs
    return jdist


def test_encode_decode_parity_and_posterior(tiny):
    _, model, vae, params = tiny
    dist = _check_parity(model, vae, params, size=32)
    assert isinstance(dist, DiagonalGaussian) and dist.mean.shape == (2, 16, 16, 4)
    rng = jax.random.key(7)
    noise = jax.random.normal(rng, dist.mean.shape)
    np.testing.assert_allclose(dist.sample(rng), dist.mean + dist.std * noise, rtol=1e-6, atol=1e-6)
    assert not np.allclose(dist.sample(rng), dist.mode())
    np.testing.assert_allclose(dist.std, np.exp(0.5 * np.asarray(dist.logvar)), rtol=1e-6)
    kl = 0.5 * np.sum(np.asarray(dist.mean) ** 2 + np.exp(dist.logvar) - 1 - dist.logvar, (1, 2, 3))
    np.testing.assert_allclose(dist.kl(), kl, rtol=1e-5)


def test_call_and_logvar_clipping():
    """__call__ decodes the posterior sample (rng) or mode (no rng); logvar is clipped as diffusers."""
    model = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=2)
    x = jax.random.uniform(jax.random.key(1), (1, 4, 4, 3), minval=-1, maxval=1)
    rs = np.random.default_rng(0)  # random params without compiling the (slow) initialisers
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rs.normal(size=s.shape), jnp.float32),
                          common.eval_shapes(model, x))
    apply = jax.jit(model.apply, static_argnames="method")
    dist = apply({"params": params}, x, method="encode")
    rng = jax.random.key(3)
    for key, z in ((rng, dist.sample(rng)), (None, dist.mode())):
        np.testing.assert_allclose(apply({"params": params}, x, key),
                                   apply({"params": params}, z, method="decode"), rtol=1e-5, atol=1e-5)
    for bias, bound in ((1e3, 20.0), (-1e3, -30.0)):
        params["quant_conv"]["bias"] = jnp.array([0.0, 0.0, bias, bias])  # the logvar channels
        np.testing.assert_array_equal(apply({"params": params}, x, method="encode").logvar, bound)


def test_scaling_and_shift_factors_are_carried(tiny):
    _, _, vae, _ = tiny
    assert vae.scaling_factor == pytest.approx(0.3611) and vae.shift_factor == pytest.approx(0.1159)
    default = AutoencoderKL.from_config({"block_out_channels": [32]})
    assert default.scaling_factor == pytest.approx(0.18215) and default.shift_factor is None


def test_export_round_trip_loads_in_diffusers(tiny, tmp_path):
    folder, model, vae, params = tiny
    config = common.read_config(folder)
    vae_to_diffusers(params, config, str(tmp_path))
    back = TorchAutoencoderKL.from_pretrained(str(tmp_path)).eval()
    want, got = model.state_dict(), back.state_dict()
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert back.config.scaling_factor == pytest.approx(0.3611)


def test_old_attention_names_load(tiny, tmp_path):
    folder, model, _, params = tiny
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in model.state_dict().items():
        v = v.numpy()
        for new, name in new_to_old.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{name}.")
                v = v[:, :, None, None] if v.ndim == 2 else v  # 1x1-conv shaped, as in LDM files
        old[k] = v
    assert any(k.endswith("attentions.0.proj_attn.weight") for k in old)
    common.write_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), old)
    with open(os.path.join(folder, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    _, old_params = load_vae(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, old_params, params)


def _write_variant(src: str, dst, edit) -> str:
    sd = dict(common.read_safetensors(os.path.join(src, "diffusion_pytorch_model.safetensors")))
    edit(sd)
    common.write_safetensors(str(dst / "diffusion_pytorch_model.safetensors"), sd)
    (dst / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    return str(dst)


def test_missing_unexpected_and_misshaped_keys(tiny, tmp_path):
    folder = tiny[0]
    cases = {
        "missing": (lambda sd: sd.pop("decoder.conv_out.bias"),
                    r"missing keys .*decoder/conv_out/bias"),
        "unexpected": (lambda sd: sd.update({"encoder.extra.weight": np.zeros(3, np.float32)}),
                       r"unexpected keys .*encoder\.extra\.weight"),
        "shape": (lambda sd: sd.update({"encoder.conv_in.weight": np.zeros((32, 4, 3, 3), np.float32)}),
                  r"encoder\.conv_in\.weight -> encoder/conv_in/kernel: checkpoint \(32, 4, 3, 3\).*"
                  r"expects \(3, 3, 3, 32\)"),
    }
    for name, (edit, pattern) in cases.items():
        (tmp_path / name).mkdir()
        path = _write_variant(folder, tmp_path / name, edit)
        with pytest.raises(common.WeightsError, match=pattern):
            load_vae(path)


@pytest.mark.parametrize("key,value,pattern", [
    ("latents_mean", [0.0] * 4, r"latents_mean=.*not supported"),
    ("act_fn", "gelu", r"act_fn='gelu' is not supported"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
     r"down_block_types=.*not supported"),
    ("norm_type", "spatial", r"does not know: \['norm_type'\]"),
])
def test_unsupported_config_key(key, value, pattern):
    config = {**TINY, key: value}
    with pytest.raises(ValueError, match=pattern):
        AutoencoderKL.from_config(config)


def test_config_switches_change_the_param_tree():
    config = {**TINY, "use_quant_conv": False, "use_post_quant_conv": False,
              "mid_block_add_attention": False}
    vae = AutoencoderKL.from_config(config)
    shapes = common.eval_shapes(vae, jnp.zeros((1, 8, 8, 3)))
    assert "quant_conv" not in shapes and "post_quant_conv" not in shapes
    assert "attentions_0" not in shapes["encoder"]["mid_block"]


@pytest.mark.slow
def test_sd15_vae_parity(tmp_path):
    model = _save_random_vae(SD15, str(tmp_path))
    vae, params = load_vae(str(tmp_path))
    _check_parity(model, vae, params, size=64)
