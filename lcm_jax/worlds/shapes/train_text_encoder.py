"""Pretrains the shapes world's small CLIP text encoder so its token states carry the caption.

Stable Diffusion conditions on a *pretrained* CLIP text encoder; a randomly initialised one
leaves the UNet to untangle which colour, size and shape words belong to which position phrase
("a small red circle at the top left and a large blue square at the bottom"), and a small
teacher trained on a CPU does not: its colours come out at chance. This trains the encoder (the
same CLIPTextModel that ships in text_encoder/) on captions alone, with a probe that asks what
the UNet's cross-attention asks: ten learned queries (one per cell of the 3x3 position grid, one
for the whole image) attend over the final hidden states and must predict the shape, colour and
size in their cell (or 'empty') and the background. The probe is thrown away; the encoder is
frozen from then on, as CLIP is in Stable Diffusion.

    python -m lcm_jax.worlds.shapes.train_text_encoder --config=lcm_jax/worlds/shapes/configs/shapes_vae.py --components=DIR

rewrites DIR/text_encoder/ (atomically) with the pretrained weights. `lcm_jax.worlds.shapes.train_vae` runs
it too when config.text_encoder.pretrain_steps > 0.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lcm_jax.training.metrics import progress_line
from lcm_jax.training.state import optimizer
from lcm_jax.worlds.shapes import world as shapes


class AttributeProbe(nn.Module):
    """Token states (B, L, D) -> per-cell and background logits via single-head cross-attention."""
    cell_heads: tuple          # ((attribute, classes), ...) as evaluator.classifier_cell_heads()
    num_backgrounds: int
    num_cells: int = len(shapes.POSITIONS)
    width: int = 128

    @nn.compact
    def __call__(self, states: jax.Array) -> dict:
        d = states.shape[-1]
        queries = self.param("queries", nn.initializers.normal(1.0), (self.num_cells + 1, d))
        k = nn.Dense(d, name="key")(states)
        v = nn.Dense(d, name="value")(states)
        attn = jax.nn.softmax(jnp.einsum("qd,bld->bql", queries, k) / np.sqrt(d), axis=-1)
        h = nn.gelu(nn.Dense(self.width, name="hidden")(jnp.einsum("bql,bld->bqd", attn, v)))
        out = {"background": nn.Dense(self.num_backgrounds, name="background")(h[:, -1])}
        for key, n in self.cell_heads:
            out[key] = nn.Dense(n, name=key)(h[:, :-1])
        return out


def stated_cells(stated: dict, heads) -> dict[str, np.ndarray]:
    """The probe's targets for what one caption states: per cell the shape, colour and size of a
    shape whose position is stated ('empty' for the other cells when every position is), and
    the background; -1 where the caption does not say (no loss)."""
    n = int(stated["num_shapes"])
    pos = np.asarray(stated["position"])[:n]
    out = {"background": np.int32(max(int(stated["background"]), -1))}
    for key, classes in heads:
        grid = np.full(len(shapes.POSITIONS), classes - 1 if (pos >= 0).all() else -1, np.int32)
        for slot in np.nonzero(pos >= 0)[0]:
            grid[pos[slot]] = max(int(np.asarray(stated[key])[slot]), -1)
        out[key] = grid
    return out


def caption_batch(world: shapes.ShapesWorld, start: int, size: int, tokenizer):
    """Token ids and the probe's targets (`stated_cells`) of captions start..start+size of `world`."""
    from lcm_jax.convert.clip import encode_prompt_ids
    from lcm_jax.worlds.shapes.evaluator import classifier_cell_heads

    items = [world.stated(i) for i in range(start, start + size)]
    ids, truncated = encode_prompt_ids(tokenizer, [shapes.caption_from_attrs(a) for a in items])
    if truncated:
        raise ValueError(f"a shapes caption does not fit the tokenizer: {truncated[0]!r}")
    cells = [stated_cells(a, classifier_cell_heads()) for a in items]
    return np.asarray(ids), {k: np.stack([c[k] for c in cells]) for k in cells[0]}


def masked_cross_entropy(logits, labels):
    """Mean softmax cross-entropy over the labels >= 0 (the caption says them)."""
    keep = labels >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    return jnp.sum(jnp.where(keep, ce, 0.0)) / jnp.maximum(keep.sum(), 1)


def pretrain(tc: ml_collections.ConfigDict, encoder, params, tokenizer, log=print):
    """Trains `params` of `encoder` (a CLIPTextModel) with the attribute probe for
    tc.pretrain_steps steps; returns (params, report with held-out probe accuracy)."""
    from lcm_jax.worlds.shapes.evaluator import classifier_cell_heads

    probe = AttributeProbe(classifier_cell_heads(), len(shapes.BACKGROUNDS))
    rate = tc.get("pretrain_understated", 0.0)
    world = shapes.ShapesWorld(tc.get("pretrain_world_seed", 0), rate)
    heldout = shapes.ShapesWorld(shapes.EVAL_SEED, rate)
    batch = tc.get("pretrain_batch_size", 256)
    ids0, _ = caption_batch(world, 0, 2, tokenizer)
    states0 = encoder.apply({"params": params}, jnp.asarray(ids0)).last_hidden_state
    variables = {"encoder": params,
                 "probe": probe.init(jax.random.PRNGKey(tc.seed + 1), states0)["params"]}
    steps = tc.pretrain_steps
    tx, _ = optimizer(tc.get("pretrain_learning_rate", 3e-3), steps, warmup_steps=min(100, steps // 10 + 1),
                      schedule="cosine", grad_clip=1.0)
    opt_state = tx.init(variables)

    def logits_fn(v, ids):
        return probe.apply({"params": v["probe"]},
                           encoder.apply({"params": v["encoder"]}, ids).last_hidden_state)

    def loss_fn(v, ids, targets):
        logits = logits_fn(v, ids)
        return sum(masked_cross_entropy(logits[k], targets[k]) for k in logits)

    @jax.jit
    def step_fn(v, opt_state, ids, targets):
        loss, grads = jax.value_and_grad(loss_fn)(v, ids, targets)
        updates, opt_state = tx.update(grads, opt_state, v)
        return optax.apply_updates(v, updates), opt_state, loss

    t0 = time.time()
    for step in range(steps):
        ids, targets = caption_batch(world, step * batch, batch, tokenizer)
        variables, opt_state, loss = step_fn(variables, opt_state, jnp.asarray(ids), targets)
        done = step + 1
        if done % max(1, steps // 10) == 0 or done == steps:
            row = {"probe_loss": float(loss), "steps_per_s": done / (time.time() - t0)}
            log(progress_line(done, steps, row, prefix="text encoder step"))
    ids, targets = caption_batch(heldout, 0, 1000, tokenizer)
    logits = jax.jit(logits_fn)(variables, jnp.asarray(ids))
    hits = {k: ((np.asarray(logits[k]).argmax(-1) == targets[k]) | (targets[k] < 0))
            .reshape(len(ids), -1).all(1) for k in logits}
    report = {"pretrain_steps": steps, "pretrain_seconds": round(time.time() - t0, 1),
              "heldout_caption_accuracy": float(np.mean(np.all(list(hits.values()), axis=0))),
              **{f"heldout_acc/{k}": float(v.mean()) for k, v in hits.items()}}
    return variables["encoder"], report


def save_weights(params, out_dir: str, report: dict | None = None) -> None:
    """Writes text-encoder `params` as transformers' model.safetensors into `out_dir`, and the
    pretraining `report` as pretrain.json when given."""
    from lcm_jax.convert.common import flax_to_torch, write_safetensors

    write_safetensors(os.path.join(out_dir, "model.safetensors"), flax_to_torch(params),
                      metadata={"format": "pt"})
    if report is not None:
        with open(os.path.join(out_dir, "pretrain.json"), "w") as f:
            json.dump(report, f, indent=2)


def rewrite_text_encoder(config: ml_collections.ConfigDict, components: str) -> dict:
    """Pretrains the encoder in `components`/text_encoder (from its current weights) and replaces
    that folder atomically; returns the report (also written to text_encoder/pretrain.json)."""
    from lcm_jax.convert.clip import load_text_encoder, load_tokenizer

    folder = os.path.join(components, "text_encoder")
    encoder, params = load_text_encoder(folder)
    tokenizer = load_tokenizer(os.path.join(components, "tokenizer"))
    params, report = pretrain(config.text_encoder, encoder, params, tokenizer)
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shutil.copy(os.path.join(folder, "config.json"), tmp)
    save_weights(params, tmp, report)
    old = f"{folder}.old-{os.getpid()}"
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old)
    print("text encoder: " + json.dumps(report), flush=True)
    return report


def main(argv) -> None:
    from absl import flags

    del argv
    rewrite_text_encoder(flags.FLAGS.config, flags.FLAGS.components)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "VAE config file (its text_encoder block)",
                                    lock_config=True)
    flags.DEFINE_string("components", None, "components folder whose text_encoder/ to pretrain")
    flags.mark_flags_as_required(["config", "components"])
    app.run(main)
