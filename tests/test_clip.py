"""CLIP text encoders and tokenizer loading: parity with transformers (PyTorch) and load errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lcm_jax.convert.clip import encode_prompt_ids, load_text_encoder, load_tokenizer
from lcm_jax.convert.common import read_safetensors, write_safetensors

VOCAB = 1000
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, projection_dim=24,
            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=VOCAB - 3, pad_token_id=1)
VIT_L14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
               num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
               hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1)


def _save_torch(folder, cls_name: str, seed: int = 0, **config):
    """A transformers CLIP text model with noised weights, saved with save_pretrained."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(transformers.CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorm weights are 1 and biases 0 at init
            p.add_(0.1 * (p.std() if p.ndim > 1 else 1.0) * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def _ids(batch: int, length: int, eos: int, seed: int = 0) -> np.ndarray:
    """Random ids below `eos` with EOS at a different position per row, padded with EOS."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB - 3, size=(batch, length))
    for b, end in enumerate(rng.choice(np.arange(2, length), size=batch, replace=False)):
        ids[b, end:] = eos
    return ids


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), b.detach().numpy().astype(np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _check_parity(tmp_path, cls_name, ids, attention_mask=None, tol=1e-5, **config):
    model = _save_torch(tmp_path, cls_name, **config)
    te, params = load_text_encoder(str(tmp_path))
    assert type(te).__name__ == cls_name
    out = te.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                   attention_mask=None if attention_mask is None else jnp.asarray(attention_mask))
    with torch.no_grad():
        ref = model(torch.as_tensor(ids), output_hidden_states=True,
                    attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask))
    errors = {"last_hidden_state": _rel(out.last_hidden_state, ref.last_hidden_state)}
    assert len(out.hidden_states) == len(ref.hidden_states) == config["num_hidden_layers"] + 1
    for i, (h, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        errors[f"hidden_states[{i}]"] = _rel(h, r)
    if cls_name == "CLIPTextModel":
        errors["pooler_output"] = _rel(out.pooler_output, ref.pooler_output)
        assert out.text_embeds is None
    else:
        errors["text_embeds"] = _rel(out.text_embeds, ref.text_embeds)
    print(cls_name, {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= tol, errors
    return te, params, out


@pytest.mark.parametrize("cls_name,act,eos", [
    ("CLIPTextModel", "quick_gelu", 2),                    # SD 1.x config (legacy eos id)
    ("CLIPTextModel", "quick_gelu", VOCAB - 2),            # eos id fixed in the config
    ("CLIPTextModelWithProjection", "gelu", VOCAB - 2),    # SDXL text_encoder_2 (OpenCLIP)
])
def test_parity(tmp_path, cls_name, act, eos):
    # Legacy configs pool at the largest id, the others at the first `eos`: ids where the two
    # rules pick different positions.
    ids = _ids(3, 77, VOCAB - 1 if eos == 2 else eos)
    if eos != 2:
        ids[:, 1] = VOCAB - 1
    _check_parity(tmp_path, cls_name, ids, hidden_act=act, eos_token_id=eos, **TINY)


def test_parity_with_padding_mask(tmp_path):
    ids = _ids(3, 77, VOCAB - 1, seed=1)
    ends = np.argmax(ids == VOCAB - 1, axis=1)  # the mask keeps tokens up to the first eos
    mask = (np.arange(77)[None] <= ends[:, None]).astype(np.int64)
    mask[0] = 1  # and one row without padding
    _check_parity(tmp_path, "CLIPTextModelWithProjection", ids, attention_mask=mask,
                  hidden_act="gelu", eos_token_id=VOCAB - 1, **TINY)


def test_pooling_rule():
    """Legacy eos id 2 pools at the largest id; otherwise at the first eos (pad may equal eos)."""
    from lcm_jax.models.clip import eos_positions
    ids = jnp.array([[5, 9, 7, 9, 9], [5, 3, 4, 6, 6]])
    np.testing.assert_array_equal(eos_positions(ids, 2), [1, 3])
    np.testing.assert_array_equal(eos_positions(ids, 9), [1, 0])
    np.testing.assert_array_equal(eos_positions(ids, 6), [0, 3])  # no eos: position 0, as torch


def test_legacy_prefixed_fp16_variant_and_bf16(tmp_path):
    """SD folders: `text_model.` keys (transformers 4), a position_ids buffer, model.fp16 files."""
    model = _save_torch(tmp_path / "src", "CLIPTextModel", eos_token_id=2, **TINY)
    legacy = {f"text_model.{k}": v.numpy().astype(np.float16) for k, v in model.state_dict().items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    os.makedirs(tmp_path / "sd")
    write_safetensors(str(tmp_path / "sd" / "model.fp16.safetensors"), legacy)
    shutil.copy(tmp_path / "src" / "config.json", tmp_path / "sd" / "config.json")
    _, params = load_text_encoder(str(tmp_path / "sd"), variant="fp16")
    q = params["text_model"]["encoder"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    want = legacy["text_model.encoder.layers.1.self_attn.q_proj.weight"].astype(np.float32).T
    np.testing.assert_array_equal(np.asarray(q), want)

    te, p16 = load_text_encoder(str(tmp_path / "src"), dtype=jnp.bfloat16)
    assert p16["text_model"]["final_layer_norm"]["scale"].dtype == jnp.bfloat16
    ids = _ids(2, 77, VOCAB - 1)
    out = jax.jit(te.apply)({"params": p16}, jnp.asarray(ids))  # one compile, not one per op
    with torch.no_grad():
        ref = model(torch.as_tensor(ids))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert _rel(out.last_hidden_state.astype(jnp.float32), ref.last_hidden_state) < 5e-2


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved_tiny(tmp_path):
    _save_torch(tmp_path, "CLIPTextModel", eos_token_id=2, **TINY)
    return tmp_path


def test_error_shape_mismatch(saved_tiny):
    cfg = json.loads((saved_tiny / "config.json").read_text())
    cfg["vocab_size"] = VOCAB + 1
    (saved_tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"embeddings\.token_embedding\.weight .*"
                                         r"checkpoint \(1000, 32\).*model expects \(1001, 32\)"):
        load_text_encoder(str(saved_tiny))


def test_error_missing_key(saved_tiny):
    path = str(saved_tiny / "model.safetensors")
    sd = read_safetensors(path)
    del sd["final_layer_norm.bias"]
    write_safetensors(path, sd)
    with pytest.raises(ValueError, match=r"1 missing keys.*text_model/final_layer_norm/bias"):
        load_text_encoder(str(saved_tiny))


def test_error_projection_weights_in_plain_model(saved_tiny):
    cfg = json.loads((saved_tiny / "config.json").read_text())
    cfg["architectures"] = ["CLIPTextModelWithProjection"]
    (saved_tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing keys.*text_projection/kernel"):
        load_text_encoder(str(saved_tiny))


def test_error_unknown_architecture(saved_tiny):
    cfg = json.loads((saved_tiny / "config.json").read_text())
    cfg["architectures"] = ["CLIPVisionModel"]
    (saved_tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: architectures \['CLIPVisionModel'\] "
                                         r"name no supported text encoder"):
        load_text_encoder(str(saved_tiny))


def test_error_no_config(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json not found"):
        load_text_encoder(str(tmp_path))


def test_error_too_many_tokens(saved_tiny):
    te, params = load_text_encoder(str(saved_tiny))
    with pytest.raises(ValueError, match=r"at most 77 tokens; got shape \(1, 78\)"):
        te.apply({"params": params}, jnp.zeros((1, 78), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _byte_chars() -> list[str]:
    """CLIP's byte -> printable-unicode table: the base alphabet of its BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]


def _write_tiny_tokenizer(folder, words=("a", "photo", "of", "cat", "dog")):
    """vocab.json + merges.txt in CLIP's format whose merges spell each word as one token."""
    vocab = _byte_chars() + [c + "</w>" for c in _byte_chars()]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return {t: i for i, t in enumerate(vocab)}


def test_tokenizer_pads_truncates_and_reports(tmp_path):
    vocab = _write_tiny_tokenizer(tmp_path)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tok = load_tokenizer(str(tmp_path))
    ids, cut = encode_prompt_ids(tok, ["a photo of a cat", "Dog"])
    assert ids.dtype == np.int32 and ids.shape == (2, 77) and cut == []
    words = [vocab[w] for w in ("a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>")]
    np.testing.assert_array_equal(ids[0, :7], [bos, *words, eos])
    np.testing.assert_array_equal(ids[1, :3], [bos, vocab["dog</w>"], eos])
    assert (ids[:, 7:] == eos).all()  # CLIPTokenizer pads with <|endoftext|> by default

    ids, cut = encode_prompt_ids(tok, ["a photo of a cat", "dog"], max_length=5)
    assert ids.shape == (2, 5) and cut == ["a photo of a cat"]
    np.testing.assert_array_equal(ids[0], [bos, *words[:3], eos])

    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"model_max_length": 8}, f)
    ids, cut = encode_prompt_ids(load_tokenizer(str(tmp_path)), "a photo of a cat dog cat")
    assert ids.shape == (1, 8) and cut == ["a photo of a cat dog cat"]


def test_tokenizer_error_without_files(tmp_path):
    os.makedirs(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match=r"not a CLIP tokenizer folder: it needs vocab\.json and "
                                         r"merges\.txt.*pass .*tokenizer"):
        load_tokenizer(str(tmp_path))


@pytest.mark.slow
def test_parity_clip_vit_l14(tmp_path):
    """The real SD 1.x text-encoder configuration (CLIP ViT-L/14), random weights."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 49406, size=(2, 77))
    ids[0, 0], ids[1, 0] = 49406, 49406
    ids[0, 12:], ids[1, 40:] = 49407, 49407
    _check_parity(tmp_path, "CLIPTextModel", ids, **VIT_L14)
