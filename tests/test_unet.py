"""UNet parity with diffusers PyTorch (random, noised weights), loading paths, export and errors."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from lcm_jax.convert import common
from lcm_jax.convert.unet import load_unet, unet_to_diffusers
from lcm_jax.models.unet import UNet2DConditionModel

TOL = 1e-5
CTX_DIM, TEXT_DIM, TIME_DIM = 16, 12, 8

SD1 = dict(  # conv proj_in, attention_head_dim = number of heads (int)
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CTX_DIM, sample_size=8)
SD2 = dict(  # linear projections, per-block head counts, upcast attention, only_cross_attention list
    block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, attention_head_dim=(2, 4),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CTX_DIM,
    use_linear_projection=True, upcast_attention=True, only_cross_attention=(True, False),
    flip_sin_to_cos=False, freq_shift=1)
SDXL = dict(  # text_time micro-conditioning, transformer_layers_per_block list, explicit heads=None
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), num_attention_heads=None, transformer_layers_per_block=(1, 2),
    use_linear_projection=True, cross_attention_dim=CTX_DIM, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=TEXT_DIM + 6 * TIME_DIM)
CONFIGS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}


def _build(config: dict, tcpd, folder: str, seed: int = 0) -> TorchUNet:
    """A diffusers UNet with noise on every parameter (zero-init convs, unit norms made random)."""
    torch.manual_seed(seed)
    model = TorchUNet(**config, time_cond_proj_dim=tcpd).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(name, time_cond_proj_dim) -> (torch model, folder); each built and saved once."""
    cache = {}

    def get(name: str, tcpd=None):
        if (name, tcpd) not in cache:
            folder = str(tmp_path_factory.mktemp(f"{name}_{tcpd}"))
            cache[name, tcpd] = (_build(CONFIGS[name], tcpd, folder), folder)
        return cache[name, tcpd]
    return get


def _inputs(config: dict, tcpd, hw=(8, 8), batch: int = 2, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    x = {"sample": rng.standard_normal((batch, 4, *hw), np.float32),
         "timesteps": np.array([999.0, 3.0][:batch], np.float32),
         "encoder_hidden_states": rng.standard_normal((batch, 5, CTX_DIM), np.float32)}
    if tcpd:
        x["timestep_cond"] = rng.standard_normal((batch, tcpd), np.float32)
    if config.get("addition_embed_type"):
        x["added_cond_kwargs"] = {"text_embeds": rng.standard_normal((batch, TEXT_DIM), np.float32),
                                  "time_ids": rng.uniform(0, 1024, (batch, 6)).astype(np.float32)}
    return x


def _torch_forward(model: TorchUNet, x: dict) -> np.ndarray:
    t = {k: ({kk: torch.from_numpy(vv) for kk, vv in v.items()} if isinstance(v, dict)
             else torch.from_numpy(np.asarray(v))) for k, v in x.items()}
    t["timestep"] = t.pop("timesteps")
    with torch.no_grad():
        return model(**t).sample.numpy().transpose(0, 2, 3, 1)


_COMPILED = {}
# Compiling dominates the cost of these tiny models: skip the expensive LLVM passes.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jax_forward(module, params, x: dict, timestep_cond=None) -> np.ndarray:
    """Jitted forward, compiled once per architecture and input shapes."""
    y = dict(x, sample=x["sample"].transpose(0, 2, 3, 1))
    if timestep_cond is not None:
        y["timestep_cond"] = timestep_cond
    key = (module.config, jnp.dtype(module.dtype).name, str(jax.tree.map(np.shape, y)))
    if key not in _COMPILED:
        fn = jax.jit(lambda p, inputs: module.apply({"params": p}, **inputs))
        _COMPILED[key] = fn.lower(params, y).compile(compiler_options=_FAST_COMPILE)
    return np.asarray(_COMPILED[key](params, y))


def _rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _flat(params) -> dict:
    from flax import traverse_util
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tcpd", [None, 8])
@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_parity(saved, name, tcpd):
    model, folder = saved(name, tcpd)
    module, params = load_unet(folder)
    x = _inputs(CONFIGS[name], tcpd)
    ref = _torch_forward(model, x)
    assert _rel_err(_jax_forward(module, params, x), ref) <= TOL


def test_odd_latent_size_and_scalar_timestep(saved):
    """11x7 latents: upsampling goes to the skip's size (6x4 -> 11x7), as diffusers does."""
    model, folder = saved("sdxl")
    module, params = load_unet(folder)
    x = _inputs(SDXL, None, hw=(11, 7), batch=1)
    x["timesteps"] = np.float32(321.0)
    ref = _torch_forward(model, x)
    assert ref.shape == (1, 11, 7, 4)
    assert _rel_err(_jax_forward(module, params, x), ref) <= TOL


def test_student_from_teacher_starts_as_teacher(saved):
    """time_cond_proj_dim on a checkpoint without cond_proj: zero w-embedding, teacher outputs."""
    model, folder = saved("sd1")
    module, params = load_unet(folder, time_cond_proj_dim=8)
    assert module.config.time_cond_proj_dim == 8
    assert not np.any(np.asarray(params["time_embedding"]["cond_proj"]["kernel"]))
    x = _inputs(SD1, None)
    w_emb = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    assert _rel_err(_jax_forward(module, params, x, timestep_cond=w_emb), _torch_forward(model, x)) <= TOL


def test_remat_gradients_match_torch_and_bf16(saved):
    """remat=True (training): gradients of mean(eps^2) equal PyTorch autograd's; bf16 stays close."""
    model, folder = saved("sd1", 8)
    module, params = load_unet(folder)
    x = _inputs(SD1, 8)
    y = dict(x, sample=x["sample"].transpose(0, 2, 3, 1))
    unet = UNet2DConditionModel(module.config, remat=True)
    grad_fn = jax.jit(jax.grad(lambda p: jnp.mean(unet.apply({"params": p}, **y) ** 2)))
    grads = common.flax_to_torch(grad_fn.lower(params).compile(compiler_options=_FAST_COMPILE)(params))
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in x.items()}
    model.zero_grad()
    model(t["sample"], t["timesteps"], t["encoder_hidden_states"],
          timestep_cond=t["timestep_cond"]).sample.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert _rel_err(grads[name], p.grad.numpy()) <= 1e-4, name
    bf16 = _jax_forward(UNet2DConditionModel(module.config, dtype=jnp.bfloat16), params, x)
    assert bf16.dtype == jnp.bfloat16
    assert _rel_err(bf16.astype(np.float32), _jax_forward(module, params, x)) <= 0.05


# ---------------------------------------------------------------------------------------------
# Loading paths and export
# ---------------------------------------------------------------------------------------------


def test_fp16_variant(saved, tmp_path):
    model, folder = saved("sd1")
    TorchUNet.from_pretrained(folder, torch_dtype=torch.float16).save_pretrained(tmp_path, variant="fp16")
    assert os.listdir(tmp_path).count("diffusion_pytorch_model.fp16.safetensors") == 1
    _, p16 = load_unet(str(tmp_path), variant="fp16")
    _, p32 = load_unet(folder)
    f16, f32 = _flat(p16), _flat(p32)
    assert f16.keys() == f32.keys()
    for k in f32:
        assert f16[k].dtype == np.float32
        np.testing.assert_array_equal(f16[k], f32[k].astype(np.float16).astype(np.float32), err_msg=str(k))


def test_sharded_checkpoint(saved, tmp_path):
    model, folder = saved("sd2")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    _, sharded = load_unet(str(tmp_path))
    _, single = load_unet(folder)
    a, b = _flat(sharded), _flat(single)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_export_round_trip(saved, tmp_path, name):
    """Student (w-conditioned) params -> diffusers folder -> diffusers loads the same network."""
    model, folder = saved(name, 8)
    module, params = load_unet(folder)
    unet_to_diffusers(params, module.config, str(tmp_path))
    reloaded = TorchUNet.from_pretrained(str(tmp_path)).eval()
    want = model.state_dict()
    for k, v in reloaded.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), want[k].numpy(), err_msg=k)
    assert reloaded.state_dict().keys() == want.keys()
    x = _inputs(CONFIGS[name], 8)
    assert _rel_err(_torch_forward(reloaded, x), _torch_forward(model, x)) == 0.0


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _edited_copy(folder: str, dest, edit) -> str:
    """A copy of `folder` whose state dict went through `edit(state_dict)`."""
    shutil.copytree(folder, dest)
    path = os.path.join(dest, "diffusion_pytorch_model.safetensors")
    state = dict(common.read_safetensors(path))
    edit(state)
    common.write_safetensors(path, state)
    return str(dest)


def test_missing_key(saved, tmp_path):
    _, folder = saved("sd1")
    bad = _edited_copy(folder, tmp_path / "m", lambda s: s.pop("mid_block.resnets.1.conv2.bias"))
    with pytest.raises(common.WeightsError, match=r"1 missing keys.*mid_block/resnets_1/conv2/bias"):
        load_unet(bad)


def test_unexpected_key(saved, tmp_path):
    _, folder = saved("sd1")
    bad = _edited_copy(folder, tmp_path / "u",
                       lambda s: s.update({"down_blocks.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(common.WeightsError, match=r"1 unexpected keys.*down_blocks\.0\.extra\.weight"):
        load_unet(bad)


def test_misshaped_key(saved, tmp_path):
    _, folder = saved("sd1")
    bad = _edited_copy(folder, tmp_path / "s",
                       lambda s: s.update({"conv_in.weight": np.zeros((32, 5, 3, 3), np.float32)}))
    with pytest.raises(common.WeightsError,
                       match=r"conv_in\.weight -> conv_in/kernel: checkpoint \(32, 5, 3, 3\).*"
                             r"model expects \(3, 3, 4, 32\)"):
        load_unet(bad)


def test_truncated_file(saved, tmp_path):
    _, folder = saved("sd1")
    shutil.copytree(folder, tmp_path / "t")
    path = tmp_path / "t" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(common.WeightsError, match=r"diffusion_pytorch_model\.safetensors is truncated"):
        load_unet(str(tmp_path / "t"))


def test_not_a_safetensors_file(saved, tmp_path):
    _, folder = saved("sd1")
    shutil.copytree(folder, tmp_path / "n")
    (tmp_path / "n" / "diffusion_pytorch_model.safetensors").write_bytes(b"<html>not weights</html>")
    with pytest.raises(common.WeightsError, match=r"is not a safetensors file"):
        load_unet(str(tmp_path / "n"))


def test_num_attention_heads_means_heads():
    """diffusers' quirk: attention_head_dim is the head count unless num_attention_heads is set.

    diffusers itself refuses num_attention_heads for this class; lcm-jax reads it as meant."""
    quirk = UNet2DConditionModel.from_config({**SD1, "attention_head_dim": (2, 4)}).config
    meant = UNet2DConditionModel.from_config({**SD1, "attention_head_dim": 16,
                                              "num_attention_heads": (2, 4)}).config
    assert quirk.num_heads == meant.num_heads == (2, 4)


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"), ("dual_cross_attention", True),
                                       ("down_block_types", ("AttnDownBlock2D", "DownBlock2D")),
                                       ("made_up_option", 1)])
def test_unsupported_config_key(key, value):
    with pytest.raises(ValueError, match=f"'{key}'"):
        UNet2DConditionModel.from_config({**SD1, key: value})


def test_cond_proj_dim_conflict(saved):
    _, folder = saved("sd1", 8)
    with pytest.raises(common.WeightsError, match=r"time_cond_proj_dim=8 .* time_cond_proj_dim=16"):
        load_unet(folder, time_cond_proj_dim=16)


# ---------------------------------------------------------------------------------------------
# Full size
# ---------------------------------------------------------------------------------------------

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    only_cross_attention=False, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8, dual_cross_attention=False,
    use_linear_projection=False, class_embed_type=None, num_class_embeds=None,
    upcast_attention=False, resnet_time_scale_shift="default", time_cond_proj_dim=256)


@pytest.mark.slow
def test_parity_full_size_sd15(tmp_path):
    torch.manual_seed(0)
    model = TorchUNet(**SD15).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    module, params = load_unet(str(tmp_path))
    rng = np.random.default_rng(0)
    x = {"sample": rng.standard_normal((1, 4, 32, 32), np.float32),
         "timesteps": np.array([759.0], np.float32),
         "encoder_hidden_states": rng.standard_normal((1, 77, 768), np.float32),
         "timestep_cond": rng.standard_normal((1, 256), np.float32)}
    ref = _torch_forward(model, x)
    assert _rel_err(_jax_forward(module, params, x), ref) <= TOL


def test_blocked_attention_matches_xla():
    """The CPU default for long sequences (query blocks x online softmax over key blocks)."""
    from lcm_jax.models import layers
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 64, 3, 8), np.float32) for _ in range(3))
    want = np.asarray(layers._xla_attention(q, k, v, None, 0.3))
    got = np.asarray(layers._blocked_attention(q, k, v, None, 0.3, q_block=16, k_block=32))
    assert _rel_err(got, want) <= 1e-6
