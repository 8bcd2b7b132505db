"""Trains the shapes-world attribute classifier on CPU and writes it to the package assets.

    python lcm_jax/worlds/shapes/train_classifier.py [--steps 1500] [--batch 64] [--out DIR]

Training images come from `ShapesWorld(--train_seed)` (fresh images every step, made in a
background thread), with a little Gaussian pixel noise so that slightly imperfect generated
samples are still read. Held-out accuracy is measured on the evaluation split
(`shapes.EVAL_SEED`), which no model trains on. Writes model.safetensors + config.json (the
architecture, heads and held-out accuracy) to --out, by default lcm_jax/worlds/shapes/assets/classifier/.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lcm_jax.convert.common import write_safetensors
from lcm_jax.worlds.shapes import CLASSIFIER_DIR
from lcm_jax.worlds.shapes import world as shapes
from lcm_jax.worlds.shapes import evaluator as evaluate
from lcm_jax.worlds.shapes.classifier import ShapesClassifier


def batches(seed: int, batch: int, steps: int):
    """Yields (images in [-1, 1], labels) of consecutive world indices, made in a thread."""
    world, q = shapes.ShapesWorld(seed), queue.Queue(maxsize=8)

    def produce():
        for step in range(steps):
            images, _, attrs = world.batch(range(step * batch, (step + 1) * batch))
            q.put((images.astype(np.float32) / 127.5 - 1, evaluate.attrs_to_cells(attrs)))

    threading.Thread(target=produce, daemon=True).start()
    for _ in range(steps):
        yield q.get()


def make_train_step(model: ShapesClassifier, tx: optax.GradientTransformation, noise: float):
    """Jitted (params, opt_state, images, labels, rng) -> (params, opt_state, loss)."""

    def loss_fn(params, images, labels, rng):
        k_sigma, k_noise = jax.random.split(rng)
        sigma = noise * jax.random.uniform(k_sigma, (images.shape[0], 1, 1, 1))
        images = images + sigma * jax.random.normal(k_noise, images.shape)
        logits = model.apply({"params": params}, images)
        return sum(optax.softmax_cross_entropy_with_integer_labels(logits[k], labels[k]).mean()
                   for k in logits)   # background + per-cell shape, color, size

    @jax.jit
    def step(params, opt_state, images, labels, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def heldout_accuracy(model: ShapesClassifier, params, num: int) -> dict[str, float]:
    """Per-attribute and all-attributes accuracy on `num` images of the evaluation split."""
    images, _, attrs = shapes.ShapesWorld(shapes.EVAL_SEED).batch(range(num))
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    cells = {}
    for s in range(0, num, 250):
        logits = apply(params, images[s:s + 250].astype(np.float32) / 127.5 - 1)
        for k, v in logits.items():
            cells.setdefault(k, []).append(np.asarray(v).argmax(-1))
    pred = evaluate.cells_to_attrs({k: np.concatenate(v) for k, v in cells.items()})
    hits = {k: np.all((pred[k] == attrs[k]).reshape(num, -1), 1) for k in attrs}
    out = {k: float(v.mean()) for k, v in hits.items()}
    out["all"] = float(np.all(list(hits.values()), axis=0).mean())
    return out


def save(out_dir: str, model: ShapesClassifier, params, info: dict) -> None:
    """model.safetensors (flat 'conv_0/kernel' keys) + config.json."""
    os.makedirs(out_dir, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    write_safetensors(os.path.join(out_dir, "model.safetensors"),
                      {k: np.asarray(v, np.float32) for k, v in flat.items()})
    config = {"num_backgrounds": model.num_backgrounds,
              "cell_heads": [list(h) for h in model.cell_heads], "grid": model.grid,
              "layers": [list(layer) for layer in model.layers], "features": model.features,
              "input": "NHWC 64x64 RGB in [-1, 1]", **info}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--noise", type=float, default=0.1, help="max pixel noise std ([-1, 1])")
    parser.add_argument("--train_seed", type=int, default=1)
    parser.add_argument("--eval_num", type=int, default=2000)
    parser.add_argument("--out", default=CLASSIFIER_DIR)
    args = parser.parse_args()
    if args.train_seed == shapes.EVAL_SEED:
        raise SystemExit(f"--train_seed {args.train_seed} is the evaluation split; pick another")

    model = ShapesClassifier(num_backgrounds=len(shapes.BACKGROUNDS),
                             cell_heads=evaluate.classifier_cell_heads(), grid=3)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, 100, args.steps, args.lr * 0.01)
    tx = optax.adamw(schedule, weight_decay=1e-4)
    opt_state, step_fn = tx.init(params), make_train_step(model, tx, args.noise)
    print(f"classifier: {sum(x.size for x in jax.tree.leaves(params))} params")

    rng, start = jax.random.PRNGKey(1), time.time()
    for step, (images, labels) in enumerate(batches(args.train_seed, args.batch, args.steps), 1):
        params, opt_state, loss = step_fn(params, opt_state, images, labels,
                                          jax.random.fold_in(rng, step))
        if step % 50 == 0 or step == args.steps:
            loss, elapsed = float(loss), time.time() - start
            if not np.isfinite(loss):
                raise SystemExit(f"loss is {loss} at step {step}; lower --lr")
            print(f"step {step}/{args.steps} loss {loss:.4f} {step / elapsed:.2f} steps/s "
                  f"ETA {(args.steps - step) * elapsed / step:.0f}s", flush=True)

    acc = heldout_accuracy(model, params, args.eval_num)
    print("held-out accuracy:", json.dumps({k: round(v, 4) for k, v in acc.items()}))
    info = {"train": {"steps": args.steps, "batch": args.batch, "lr": args.lr,
                      "noise": args.noise, "train_seed": args.train_seed},
            "heldout_accuracy": {k: round(v, 4) for k, v in acc.items()}}
    save(args.out, model, params, info)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
