"""Scoring shapes-world images with the shipped attribute classifier (assets/classifier/).

`ShapesEvaluator(images, prompts)` reports
  - `fd`: Frechet distance between its penultimate features of the generated images and of real
    images of the world (the FID recipe, with a classifier that knows this world);
  - `prompt_accuracy`: the fraction of images whose every predicted attribute matches the prompt;
  - `acc/<attribute>`: per-attribute accuracy (background, num_shapes, shape, color, ...).
  - `diversity`: per caption, how far apart its images are (classifier features) against real
    images of the same caption; 1 is as varied as the world, 0 is one image per caption.
`heldout_prompts` gives prompts from the evaluation split of the world (`world.EVAL_SEED`), by
default with the shipped teacher's rate of captions that leave attributes out; accuracy judges
only what a caption states.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcm_jax.convert.common import WeightsError, read_safetensors
from lcm_jax.evaluation.frechet import frechet_distance
from lcm_jax.worlds.shapes import CLASSIFIER_DIR
from lcm_jax.worlds.shapes import world as shapes
from lcm_jax.worlds.shapes.classifier import ShapesClassifier

_SLOT_NAMES = {"shape": shapes.SHAPES, "color": shapes.COLORS, "size": shapes.SIZES,
               "position": shapes.POSITIONS}


# ---------------------------------------------------------------------------------------------
# Classifier labels
# ---------------------------------------------------------------------------------------------


def classifier_cell_heads() -> tuple[tuple[str, int], ...]:
    """(attribute, classes) of the per-cell classifier heads; the last class means 'empty'."""
    return tuple((key, len(_SLOT_NAMES[key]) + 1) for key in ("shape", "color", "size"))


def attrs_to_cells(attrs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked world attributes -> classifier targets: background (B,), shape/color/size (B, 9)."""
    shape = np.asarray(attrs["shape"])
    b, cells = shape.shape[0], len(shapes.POSITIONS)
    out = {"background": np.asarray(attrs["background"], np.int32)}
    for key, n in classifier_cell_heads():
        grid = np.full((b, cells), n - 1, np.int32)
        for slot in range(2):
            rows = np.nonzero(shape[:, slot] >= 0)[0]
            grid[rows, np.asarray(attrs["position"])[rows, slot]] = np.asarray(attrs[key])[rows, slot]
        out[key] = grid
    return out


def cells_to_attrs(cells: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-cell class predictions -> stacked world attributes (shapes in reading order).

    `num_shapes` counts the occupied cells (it can be 0 or more than 2 for a bad image); the
    slots hold the first two occupied cells, -1 where there is none.
    """
    empty = len(shapes.SHAPES)
    occupied = np.asarray(cells["shape"]) != empty
    out = {"background": np.asarray(cells["background"], np.int32),
           "num_shapes": occupied.sum(1).astype(np.int32)}
    order = np.argsort(~occupied, axis=1, kind="stable")[:, :2]        # occupied cells first
    present = np.take_along_axis(occupied, order, 1)
    out["position"] = np.where(present, order, -1).astype(np.int32)
    for key in ("shape", "color", "size"):
        values = np.take_along_axis(np.asarray(cells[key]), order, 1)
        out[key] = np.where(present, values, -1).astype(np.int32)
    return out


def heldout_prompts(n: int, seed: int = shapes.EVAL_SEED, understated: float = shapes.UNDERSTATED
                    ) -> tuple[list[str], dict[str, np.ndarray]]:
    """The first n prompts and stacked attributes of world `seed` (by default the eval split);
    `understated` of them leave attributes out (0: every prompt states everything)."""
    world = shapes.ShapesWorld(seed, understated)
    items = [world.attrs(i) for i in range(n)]
    return [world.caption(i, a) for i, a in enumerate(items)], shapes.stack_attrs(items)


# ---------------------------------------------------------------------------------------------
# Classifier weights
# ---------------------------------------------------------------------------------------------


def load_classifier(path: str = CLASSIFIER_DIR) -> tuple[ShapesClassifier, dict]:
    """The classifier module and params from a folder with config.json + model.safetensors."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise WeightsError(f"no classifier config at {config_path}; train one with "
                           f"`python -m lcm_jax.worlds.shapes.train_classifier --out {path}`")
    with open(config_path) as f:
        config = json.load(f)
    model = ShapesClassifier(num_backgrounds=config["num_backgrounds"],
                             cell_heads=tuple((h, n) for h, n in config["cell_heads"]),
                             grid=config["grid"],
                             layers=tuple(tuple(layer) for layer in config["layers"]),
                             features=config["features"])
    weights_path = os.path.join(path, "model.safetensors")
    flat = read_safetensors(weights_path)
    expected = traverse_util.flatten_dict(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"],
        sep="/")
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{weights_path} does not match {config_path}: missing {missing}, "
                           f"unexpected {unexpected}; re-run python -m lcm_jax.worlds.shapes.train_classifier")
    for key, leaf in expected.items():
        if tuple(flat[key].shape) != tuple(leaf.shape):
            raise WeightsError(f"{weights_path}: {key} has shape {flat[key].shape}, the config "
                               f"needs {leaf.shape}; re-run python -m lcm_jax.worlds.shapes.train_classifier")
    params = traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()},
                                          sep="/")
    return model, params


# ---------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------

def _to_model_input(images: np.ndarray) -> np.ndarray:
    """float [0, 1] (or uint8) NHWC 64x64 images -> float32 in [-1, 1]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3):
        raise ValueError(f"expected images (N, 64, 64, 3) as in the shapes world, got "
                         f"{images.shape}; decode to 64x64 RGB NHWC first")
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    return (images.astype(np.float32) / scale) * 2 - 1


class ShapesEvaluator:
    """FD and prompt accuracy of generated shapes-world images, with the shipped classifier."""

    def __init__(self, classifier_dir: str = CLASSIFIER_DIR, num_real: int = 2000,
                 real_seed: int = shapes.EVAL_SEED, batch_size: int = 250):
        self.model, self.params = load_classifier(classifier_dir)
        self._real_features = None  # computed on first use, kept by this evaluator
        self.num_real, self.real_seed, self.batch_size = num_real, real_seed, batch_size
        self._apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x, return_features=True))

    def _run(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Logits per head and features, in fixed-size batches (one compile)."""
        x = _to_model_input(images)
        logits, feats = [], []
        for s in range(0, len(x), self.batch_size):
            chunk = x[s:s + self.batch_size]
            padded = np.pad(chunk, ((0, self.batch_size - len(chunk)), (0, 0), (0, 0), (0, 0)))
            out, f = self._apply(self.params, padded)
            logits.append({k: np.asarray(v)[:len(chunk)] for k, v in out.items()})
            feats.append(np.asarray(f)[:len(chunk)])
        return {k: np.concatenate([lg[k] for lg in logits]) for k in logits[0]}, np.concatenate(feats)

    def prompts(self, n: int, seed: int | None = None) -> list[str]:
        """The first n held-out prompts (world `seed`, by default the eval split)."""
        return heldout_prompts(n, shapes.EVAL_SEED if seed is None else seed)[0]

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Predicted stacked world attributes (see shapes.py) of float [0, 1] NHWC images."""
        return cells_to_attrs({k: v.argmax(-1) for k, v in self._run(images)[0].items()})

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate classifier features (N, D) of float [0, 1] NHWC images."""
        return self._run(images)[1]

    def real_features(self) -> np.ndarray:
        """Features of `num_real` real images of world `real_seed`, computed once per evaluator."""
        if self._real_features is None:
            images, _, _ = shapes.ShapesWorld(self.real_seed).batch(range(self.num_real))
            self._real_features = self.features(images)
        return self._real_features

    def prompt_accuracy(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
        """`prompt_accuracy` (every attribute right) and `acc/<attribute>` (both slots right)."""
        return self._accuracy(self._run(images)[0], prompts)

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
        """`fd` against real images plus everything `prompt_accuracy` returns."""
        logits, feats = self._run(images)
        out = {"fd": frechet_distance(feats, self.real_features()) if len(feats) > 1 else math.nan}
        out.update(self._accuracy(logits, prompts))
        return out

    def diversity(self, images: np.ndarray, prompts: Sequence[str], seed: int = 0) -> float:
        """Mean pairwise feature distance of the images of each prompt (runs of equal prompts),
        divided by the same for as many real images of that prompt (`shapes.fill`), averaged
        over prompts."""
        feats = self.features(images)
        groups = [list(g) for _, g in itertools.groupby(range(len(prompts)), key=lambda i: prompts[i])]
        if any(len(g) < 2 for g in groups):
            raise ValueError("diversity needs at least two images per prompt, in runs of equal prompts")
        rng = np.random.default_rng(seed)
        real = [shapes.fill(shapes.parse_caption(prompts[g[0]]), rng) for g in groups for _ in g]
        real_feats = self.features(shapes.render_batch(shapes.stack_attrs([a for a, _ in real]),
                                                       np.stack([j for _, j in real])))
        ratios = [_mean_pairwise(feats[g]) / max(_mean_pairwise(real_feats[g]), 1e-12) for g in groups]
        return float(np.mean(ratios))

    @staticmethod
    def _accuracy(logits: Mapping[str, np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
        """Only what each prompt states is judged (UNSTATED attributes match anything)."""
        truth = shapes.stack_attrs([shapes.parse_caption(p) for p in prompts])
        if len(logits["background"]) != len(prompts):
            raise ValueError(f"{len(logits['background'])} images but {len(prompts)} prompts")
        pred = cells_to_attrs({k: v.argmax(-1) for k, v in logits.items()})
        n = len(prompts)
        stated = {k: (truth[k] != shapes.UNSTATED).reshape(n, -1) for k in truth}
        right = {k: (pred[k] == truth[k]).reshape(n, -1) | ~stated[k] for k in truth}
        out = {"prompt_accuracy": float(np.mean(np.all([r.all(1) for r in right.values()], axis=0)))}
        out.update({f"acc/{k}": float(np.all(right[k], 1)[stated[k].any(1)].mean())
                    for k in truth if stated[k].any()})
        return out


def _mean_pairwise(x: np.ndarray) -> float:
    """Mean Euclidean distance over the distinct pairs of rows of `x`."""
    d = np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 0.0))
    return float(d[np.triu_indices(len(x), 1)].mean())
