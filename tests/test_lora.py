"""LoRA as a param-tree transform, and LoRA files exchanged with diffusers/PEFT and kohya.

The diffusers side is a tiny random UNet with a PEFT adapter on the LCM-LoRA recipe's modules
(random nonzero lora_B), saved with diffusers' `save_lora_weights`; lcm-jax must reproduce its
outputs with the LoRA merged, and diffusers must reproduce lcm-jax's from `save_lora_peft`.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from flax import traverse_util
from safetensors.numpy import save_file

from lcm_jax import defaults
from lcm_jax.convert.common import WeightsError, torch_key_to_flax_module_path, write_safetensors
from lcm_jax.convert.lora import load_lora, save_lora_peft
from lcm_jax.convert.unet import load_unet, unet_shapes
from lcm_jax.models import lora
from lcm_jax.models.unet import UNet2DConditionModel
from tiny_pipeline import UNET

peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict  # noqa: E402

TOL = 1e-5
RANK = 4
# diffusers' train_lcm_distill_lora_sd_wds.py target modules (PEFT matches name suffixes)
RECIPE = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
          "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def _random_like(shapes, seed: int = 0, scale: float = 0.1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


def _rel_err(a, ref) -> float:
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


def _lora_config(alpha: int = RANK):
    return peft.LoraConfig(r=RANK, lora_alpha=alpha, target_modules=RECIPE, init_lora_weights="gaussian")


# ---------------------------------------------------------------------------------------------
# LoRA tree transform
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _tiny_flax_params():
    module = UNet2DConditionModel.from_config(defaults.tiny_unet())
    return _random_like(unet_shapes(module))


def test_init_lora_is_a_noop_on_a_real_unet():
    params = _tiny_flax_params()
    # an 'rbg' key: the no-op property does not depend on the generator, and threefry's per-shape
    # compilations (one per distinct kernel shape) would dominate this file's run time
    factors = lora.init_lora(jax.random.key(0, impl="rbg"), params, RANK)
    merged = lora.merge(params, factors, scale=3.0)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    for path, (down, up) in lora.adapters(factors).items():
        assert np.abs(np.asarray(down)).max() > 0 and not np.any(np.asarray(up)), path
        assert down.shape[-1] == up.shape[0] == RANK


def test_targets_are_the_modules_peft_adapts_with_the_recipe():
    """Same module set as PEFT's LoraConfig(target_modules=RECIPE) on the same diffusers UNet."""
    torch_unet = TorchUNet(**defaults.tiny_unet())
    torch_unet.add_adapter(_lora_config())
    peft_modules = {"/".join(torch_key_to_flax_module_path(k)[0][:-1])
                    for k in get_peft_model_state_dict(torch_unet) if ".lora_A." in k}
    ours = set(lora.target_paths(_tiny_flax_params()))
    assert ours == peft_modules
    for name in RECIPE:  # every recipe entry names at least one module of this UNet
        flax_name = "/".join(torch_key_to_flax_module_path(name + ".weight")[0])
        assert any(p.endswith("/" + flax_name) for p in ours), name


@pytest.mark.parametrize("kind", ["dense", "conv3x3", "conv3x3_stride2", "conv1x1"])
def test_merged_kernel_equals_unmerged_adapter(kind):
    """W + s down@up applied once == base layer + s * up(down(x)) (what PEFT computes)."""
    rng = np.random.default_rng(0)
    cin, cout, s = 6, 5, 0.7
    if kind == "dense":
        x = rng.standard_normal((3, cin)).astype(np.float32)
        make = lambda f, name: nn.Dense(f, name=name)
        down_layer = nn.Dense(RANK, use_bias=False)
    else:
        k, stride = (1, 1) if kind == "conv1x1" else (3, 2 if "stride" in kind else 1)
        x = rng.standard_normal((2, 7, 7, cin)).astype(np.float32)
        pad = ((k // 2, k // 2),) * 2
        make = lambda f, name: nn.Conv(f, (k, k), strides=(stride, stride), padding=pad, name=name)
        down_layer = nn.Conv(RANK, (k, k), strides=(stride, stride), padding=pad, use_bias=False)
    base = make(cout, "base")
    p = base.init(jax.random.key(0), x)["params"]
    p = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), p)
    down = jnp.asarray(rng.standard_normal((*p["kernel"].shape[:-1], RANK)), jnp.float32)
    up = jnp.asarray(rng.standard_normal((RANK, cout)), jnp.float32)
    unmerged = (base.apply({"params": p}, x)
                + s * nn.Dense(cout, use_bias=False).apply(
                    {"params": {"kernel": up}}, down_layer.apply({"params": {"kernel": down}}, x)))
    merged_params = lora.merge({"layer": p}, {"layer": {"down": down, "up": up}}, s)["layer"]
    merged = base.apply({"params": merged_params}, x)
    np.testing.assert_array_equal(merged_params["bias"], p["bias"])
    assert _rel_err(merged, np.asarray(unmerged)) <= TOL


def test_merge_errors_on_a_module_without_kernel():
    with pytest.raises(KeyError, match="LoRA adapter for 'a/missing' has no kernel in the model"):
        lora.merge({"a": {"dense": {"kernel": jnp.zeros((2, 2))}}},
                   {"a": {"missing": {"down": jnp.zeros((2, 1)), "up": jnp.zeros((1, 2))}}}, 1.0)
    with pytest.raises(ValueError, match="no kernel in the model matches the LoRA targets"):
        lora.init_lora(jax.random.key(0), {"conv_in": {"kernel": jnp.zeros((3, 3, 4, 8))}}, RANK)


# ---------------------------------------------------------------------------------------------
# Interop with diffusers / PEFT
# ---------------------------------------------------------------------------------------------


def _noised(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(diffusers UNet folder, Flax module, Flax params, inputs) of one random tiny SD UNet."""
    folder = str(tmp_path_factory.mktemp("unet"))
    torch.manual_seed(0)
    _noised(TorchUNet(**UNET), 0).save_pretrained(folder)
    module, params = load_unet(folder)
    rng = np.random.default_rng(1)
    x = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
         "timestep": np.array([999.0, 21.0], np.float32),
         "encoder_hidden_states": rng.standard_normal((2, 5, UNET["cross_attention_dim"])).astype(np.float32)}
    return folder, module, params, x


def _torch_out(model: TorchUNet, x: dict) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in x.items()}).sample
    return out.numpy().transpose(0, 2, 3, 1)


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, params, sample, t, context):
    return UNet2DConditionModel(config).apply({"params": params}, sample, t, context)


def _jax_out(module, params, x: dict) -> np.ndarray:
    return np.asarray(_apply(module.config, params, x["sample"].transpose(0, 2, 3, 1), x["timestep"],
                             x["encoder_hidden_states"]))


def _torch_with_peft_lora(folder: str, alpha: int, seed: int = 3) -> TorchUNet:
    model = TorchUNet.from_pretrained(folder)
    model.add_adapter(_lora_config(alpha))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; make every adapter matter
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_peft_lora_saved_by_diffusers_loads_into_flax(base, tmp_path):
    folder, module, params, x = base
    model = _torch_with_peft_lora(folder, alpha=RANK)
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(tmp_path),
                                                     unet_lora_layers=get_peft_model_state_dict(model))
    factors, scale = load_lora(str(tmp_path / "pytorch_lora_weights.safetensors"), params)
    assert scale == 1.0 and set(lora.adapters(factors)) == set(lora.target_paths(params))
    ref = _torch_out(model, x)
    base_out = _jax_out(module, params, x)
    assert _rel_err(base_out, ref) > 1e-2  # the LoRA changes the output ...
    assert _rel_err(_jax_out(module, lora.merge(params, factors, scale), x), ref) <= TOL  # ... exactly


def test_peft_lora_alpha_from_diffusers_metadata(base, tmp_path):
    """lora_alpha != r: diffusers stores the PEFT config in the safetensors metadata."""
    folder, module, params, x = base
    model = _torch_with_peft_lora(folder, alpha=2 * RANK)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(tmp_path), unet_lora_layers=get_peft_model_state_dict(model),
        unet_lora_adapter_metadata=model.peft_config["default"].to_dict())
    factors, scale = load_lora(str(tmp_path / "pytorch_lora_weights.safetensors"), params)
    ref = _torch_out(model, x)
    assert _rel_err(_jax_out(module, lora.merge(params, factors, scale), x), ref) <= TOL


def test_unsupported_peft_config_is_refused(base, tmp_path):
    _, _, params, _ = base
    to_q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    path = str(tmp_path / "rs.safetensors")
    save_file({f"{to_q}.lora_A.weight": np.ones((RANK, 32), np.float32),
               f"{to_q}.lora_B.weight": np.ones((32, RANK), np.float32)}, path,
              metadata={"lora_adapter_metadata": '{"unet.lora_alpha": 8, "unet.r": 4, "unet.use_rslora": true}'})
    with pytest.raises(WeightsError, match=r"rs\.safetensors: the LoRA's PEFT config sets \['use_rslora'\], "
                                           "which lcm-jax does not implement"):
        load_lora(path, params)


def test_flax_lora_saved_as_peft_loads_into_diffusers(base, tmp_path):
    folder, module, params, x = base
    shapes = jax.eval_shape(functools.partial(lora.init_lora, rank=RANK), jax.random.key(1), params)
    factors = _random_like(shapes, seed=5, scale=0.2)  # random down and (nonzero) up
    scale = 0.75
    path = str(tmp_path / "lcm_lora.safetensors")
    save_lora_peft(factors, scale, path)
    model = TorchUNet.from_pretrained(folder).eval()
    model.load_lora_adapter(str(tmp_path), weight_name="lcm_lora.safetensors", prefix="unet")
    ref = _torch_out(model, x)
    assert _rel_err(_jax_out(module, params, x), ref) > 1e-2
    assert _rel_err(_jax_out(module, lora.merge(params, factors, scale), x), ref) <= TOL
    # and back: the file round-trips through load_lora
    again, s = load_lora(path, params)
    for a, b in zip(jax.tree.leaves(lora.merge(params, again, s)),
                    jax.tree.leaves(lora.merge(params, factors, scale))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# kohya files and errors
# ---------------------------------------------------------------------------------------------


KOHYA_MODULES = {  # torch module -> (torch weight shape (out, in[, kh, kw]))
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
    "down_blocks.0.attentions.0.proj_in": (32, 32, 1, 1),
    "up_blocks.1.resnets.0.conv1": (32, 96, 3, 3),
    "up_blocks.1.resnets.0.conv_shortcut": (32, 96, 1, 1),
}


def _kohya_file(path: str, alpha: float, rank: int = RANK) -> dict:
    rng = np.random.default_rng(0)
    tensors, deltas = {}, {}
    for name, (out, cin, *k) in KOHYA_MODULES.items():
        down = rng.standard_normal((rank, cin, *k)).astype(np.float32)
        up = rng.standard_normal((out, rank, *([1, 1] if k else []))).astype(np.float32)
        key = "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": np.array(alpha, np.float32)})
        # kohya's delta: (alpha / rank) up @ down, in torch layout (out, in[, kh, kw])
        delta = (alpha / rank) * np.einsum("or,ri...->oi...", up.reshape(out, rank), down)
        deltas[name] = delta.transpose(2, 3, 1, 0) if k else delta.T  # -> Flax kernel layout
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = np.ones((rank, 4), np.float32)
    save_file(tensors, path)  # the reference writer: alpha stays a 0-d tensor as in kohya's files
    return deltas


@pytest.mark.parametrize("alpha", [1.0, 8.0])
def test_kohya_file_loads_with_alpha_over_rank(base, tmp_path, alpha):
    _, _, params, _ = base
    path = str(tmp_path / "kohya.safetensors")
    deltas = _kohya_file(path, alpha)
    factors, scale = load_lora(path, params)
    merged = traverse_util.flatten_dict(lora.merge(params, factors, scale))
    flat = traverse_util.flatten_dict(params)
    assert len(lora.adapters(factors)) == len(KOHYA_MODULES)  # text-encoder keys skipped
    for name, delta in deltas.items():
        key = torch_key_to_flax_module_path(name + ".weight")[0] + ("kernel",)
        np.testing.assert_allclose(merged[key] - flat[key], delta, rtol=1e-5, atol=1e-5)


def _write(path, tensors) -> str:
    write_safetensors(str(path), {k: np.asarray(v, np.float32) for k, v in tensors.items()})
    return str(path)


def test_load_lora_errors(base, tmp_path):
    _, _, params, _ = base
    a = np.zeros((RANK, 32))
    with pytest.raises(WeightsError, match=r"key 'unet\.mid_block\.foo\.weight' is not a LoRA weight "
                                           r"of a known layout \(PEFT lora_A/lora_B"):
        load_lora(_write(tmp_path / "a.safetensors", {"unet.mid_block.foo.weight": a}), params)
    with pytest.raises(WeightsError, match=r"names module 'down_blocks\.7\.resnets\.0\.conv1', which "
                                           r"this UNet does not have"):
        load_lora(_write(tmp_path / "b.safetensors",
                         {"unet.down_blocks.7.resnets.0.conv1.lora_A.weight": a}), params)
    with pytest.raises(WeightsError, match=r"module down_blocks_0/attentions_0/transformer_blocks_0/"
                                           r"attn1/to_q has only \['down'\]; both down \(A\) and up"):
        load_lora(_write(tmp_path / "c.safetensors", {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a}), params)
    with pytest.raises(WeightsError, match=r"LoRA for down_blocks_0/attentions_0/transformer_blocks_0/"
                                           r"attn1/to_q has down \(16, 4\), up \(4, 32\); the kernel is "
                                           r"\(32, 32\)"):
        load_lora(_write(tmp_path / "d.safetensors", {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((RANK, 16)),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.zeros((32, RANK))}),
            params)
    with pytest.raises(WeightsError, match=r"e\.safetensors contains no UNet LoRA weights"):
        load_lora(_write(tmp_path / "e.safetensors", {"lora_te_text_model_x.lora_down.weight": a}), params)


def test_text_encoder_lora_in_a_diffusers_file_is_skipped(base, tmp_path):
    """diffusers files may carry text_encoder.*.lora_A/B: LCM-LoRA adapts the UNet only."""
    _, _, params, _ = base
    to_q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    path = _write(tmp_path / "te.safetensors", {
        f"{to_q}.lora_A.weight": np.ones((RANK, 32)), f"{to_q}.lora_B.weight": np.ones((32, RANK)),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": np.ones((RANK, 32)),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": np.ones((32, RANK))})
    factors, _ = load_lora(path, params)
    assert list(lora.adapters(factors)) == ["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"]


@pytest.mark.parametrize("a_key,b_key", [
    ("unet.{}.lora.down.weight", "unet.{}.lora.up.weight"),                        # older diffusers
    ("base_model.model.{}.lora_A.weight", "base_model.model.{}.lora_B.weight"),    # PEFT save_pretrained
    ("{}.lora_A.default.weight", "{}.lora_B.default.weight"),                      # PEFT module state dict
])
def test_other_key_layouts_load_like_diffusers_peft(base, tmp_path, a_key, b_key):
    _, _, params, _ = base
    rng = np.random.default_rng(0)
    conv = "up_blocks.1.resnets.0.conv1"
    down, up = rng.standard_normal((RANK, 96, 3, 3)), rng.standard_normal((32, RANK, 1, 1))
    ref, _ = load_lora(_write(tmp_path / "ref.safetensors", {f"unet.{conv}.lora_A.weight": down,
                                                             f"unet.{conv}.lora_B.weight": up}), params)
    got, _ = load_lora(_write(tmp_path / "x.safetensors", {a_key.format(conv): down, b_key.format(conv): up}),
                       params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Several adapters at once in the pipeline (LCM-LoRA + a style LoRA), as diffusers' set_adapters
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    """A teacher pipeline folder and two LoRAs for its UNet: 'lcm' (PEFT, saved by diffusers)
    and 'style' (alpha = 2r; PEFT for diffusers, the same factors as a kohya file for lcm-jax)."""
    from tiny_pipeline import build_pipeline

    root = tmp_path_factory.mktemp("stacked")
    tpipe = build_pipeline(str(root / "pipe"), time_cond_proj_dim=None, seed=6)
    files = {}
    for name, alpha, seed in (("lcm", RANK, 7), ("style", 2 * RANK, 8)):
        model = _torch_with_peft_lora(str(root / "pipe" / "unet"), alpha=alpha, seed=seed)
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            str(root / name), unet_lora_layers=get_peft_model_state_dict(model),
            unet_lora_adapter_metadata=model.peft_config["default"].to_dict())
        files[name] = str(root / name / "pytorch_lora_weights.safetensors")
    return tpipe, str(root / "pipe"), files


def _kohya_copy(peft_file: str, unet_params, out: str) -> str:
    from lcm_jax.convert.lora import save_lora_kohya

    factors, scale = load_lora(peft_file, unet_params)
    save_lora_kohya(factors, scale, out)
    return out


def test_two_adapters_fused_and_unfused_match_diffusers(stacked, tmp_path):
    """LCM sampling (guidance 1, no CFG) of a teacher with 'lcm' at 1.0 and 'style' at 0.5."""
    from diffusers import StableDiffusionPipeline

    from lcm_jax.pipeline import LCMPipeline

    tpipe, folder, files = stacked
    sd = StableDiffusionPipeline.from_pipe(tpipe)
    for name, path in files.items():
        sd.load_lora_weights(path, adapter_name=name)
    sd.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.5])
    g = torch.Generator().manual_seed(9)
    latents, *noises = [torch.randn((1, 4, 8, 8), generator=g).numpy().transpose(0, 2, 3, 1) for _ in range(4)]
    args = dict(num_inference_steps=3, guidance_scale=1.0, height=64, width=64)
    run_ref = lambda: sd(["a red circle"], generator=torch.Generator().manual_seed(9), output_type="np",
                         **args).images
    ref_unfused = run_ref()
    sd.fuse_lora(adapter_names=["lcm", "style"])
    ref_fused = run_ref()

    pipe = LCMPipeline.from_pretrained(folder)
    base = pipe(["a red circle"], latents=latents, noises=np.stack(noises), **args)
    pipe.load_lora_weights(files["lcm"], fuse=False, adapter_name="lcm")
    pipe.load_lora_weights(_kohya_copy(files["style"], pipe.unet_params, str(tmp_path / "style_kohya.safetensors")),
                           fuse=False, adapter_name="style")
    pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.5])
    unfused = pipe(["a red circle"], latents=latents, noises=np.stack(noises), **args)
    pipe.fuse_lora()
    fused = pipe(["a red circle"], latents=latents, noises=np.stack(noises), **args)
    for ours, ref in ((unfused, ref_unfused), (fused, ref_fused)):
        assert np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()
    assert np.abs(base - unfused).max() > 1e-2  # the adapters change the image
    with pytest.raises(ValueError, match=r"adapters \['sketch'\] are not loaded"):
        pipe.set_adapters(["sketch"])
