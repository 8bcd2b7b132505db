"""The shapes world's components trainer (lcm_jax/worlds/shapes/train_vae.py) and the text encoder pretraining
(lcm_jax/train_text_encoder.py): the caption probe learns what the captions say, and the written
components folder loads in lcm-jax and in transformers with the same outputs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lcm_jax.worlds.shapes.configs import shapes_vae
from lcm_jax.convert.clip import load_text_encoder, load_tokenizer
from lcm_jax.worlds.shapes import world as shapes
from lcm_jax.models.clip import CLIPTextModel
from lcm_jax.worlds.shapes.train_text_encoder import caption_batch, pretrain
from lcm_jax.worlds.shapes import TOKENIZER_DIR
from lcm_jax.worlds.shapes.train_vae import text_encoder_config


def test_pretraining_teaches_the_encoder_the_captions():
    tc = shapes_vae.get_config().text_encoder
    tc.pretrain_understated = 0.0    # every attribute judged: chance is near zero
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    module = CLIPTextModel.from_config(text_encoder_config(tc, tokenizer))
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))["params"]
    tc.pretrain_batch_size = 64

    tc.pretrain_steps = 0            # the probe alone, untrained, on the random encoder
    same, before = pretrain(tc, module, params, tokenizer, log=lambda s: None)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), same, params))
    tc.pretrain_steps = 300
    trained, after = pretrain(tc, module, params, tokenizer, log=lambda s: None)

    # 1000 held-out captions, every attribute of every cell right.
    assert before["heldout_caption_accuracy"] < 0.05, before
    assert after["heldout_caption_accuracy"] > 0.9, after
    assert after["heldout_acc/color"] > 0.95 and after["heldout_acc/shape"] > 0.95, after
    # The encoder itself changed (the probe could not do this on its own states).
    ids, _ = caption_batch(shapes.ShapesWorld(1), 0, 4, tokenizer)
    s0 = module.apply({"params": params}, jnp.asarray(ids)).last_hidden_state
    s1 = module.apply({"params": trained}, jnp.asarray(ids)).last_hidden_state
    assert float(jnp.max(jnp.abs(s1 - s0))) > 0.1


def test_probe_targets_are_what_the_caption_states():
    from lcm_jax.worlds.shapes.evaluator import classifier_cell_heads
    from lcm_jax.worlds.shapes.train_text_encoder import masked_cross_entropy, stated_cells

    heads = classifier_cell_heads()
    full = stated_cells(shapes.parse_caption("a small red circle at the top left on a gray background"), heads)
    assert full["background"] == shapes.BACKGROUNDS.index("gray")
    assert full["shape"][0] == 0 and full["color"][0] == 0 and full["size"][0] == 0
    assert (full["shape"][1:] == len(shapes.SHAPES)).all()               # the other cells: empty
    part = stated_cells(shapes.parse_caption("a red circle and a large square at the bottom right"), heads)
    assert part["background"] == -1 and (part["shape"][:8] == -1).all()  # a cell unknown: no 'empty'
    assert part["shape"][8] == 1 and part["size"][8] == 1 and part["color"][8] == -1
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(9, 5)), jnp.float32)
    labels = jnp.asarray(part["shape"])
    expect = -jax.nn.log_softmax(logits)[8, 1]
    np.testing.assert_allclose(masked_cross_entropy(logits, labels), expect, rtol=1e-6)


def test_tiny_run_writes_a_components_folder_both_libraries_load(tmp_path):
    from transformers import CLIPTextModel as TorchCLIPTextModel

    from lcm_jax.components import load_components
    from lcm_jax.worlds.shapes import train_vae

    config = shapes_vae.get_config("tiny")
    report = train_vae.run(config, str(tmp_path))
    comps = os.path.join(tmp_path, "components")
    assert report["steps"] == config.total_steps and report["scaling_factor"] > 0
    with open(os.path.join(comps, "text_encoder", "pretrain.json")) as f:
        assert json.load(f)["pretrain_steps"] == config.text_encoder.pretrain_steps

    c = load_components(comps, with_unet=False)
    assert c.unet is None and c.vae.scaling_factor == pytest.approx(report["scaling_factor"])
    ids = np.asarray(c.tokenizer(["a small red circle at the top left on a black background"],
                                 padding="max_length", max_length=32, return_tensors="np").input_ids)
    ours = np.asarray(c.text_encoder.apply({"params": c.text_params}, jnp.asarray(ids)).last_hidden_state)
    theirs = TorchCLIPTextModel.from_pretrained(os.path.join(comps, "text_encoder")).eval()
    with torch.no_grad():
        ref = theirs(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)

    # Pretraining an existing folder again replaces text_encoder/ in place, still loadable.
    from lcm_jax.worlds.shapes.train_text_encoder import rewrite_text_encoder
    again = rewrite_text_encoder(config, comps)
    assert again["pretrain_steps"] == config.text_encoder.pretrain_steps
    _, params = load_text_encoder(os.path.join(comps, "text_encoder"))
    assert not any(n.startswith("text_encoder.") for n in os.listdir(comps))   # no temp folders left
    assert jax.tree.structure(params) == jax.tree.structure(c.text_params)
