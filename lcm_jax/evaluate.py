"""Evaluating samples: Frechet distance, prompt accuracy on the shapes world, sample grids.

`ShapesEvaluator` reads generated images with the shipped attribute classifier
(lcm_jax/assets/shapes/classifier/) and reports
  - `fd`: Frechet distance between its penultimate features of the generated images and of real
    images of the world (the FID recipe, with a classifier that knows this world);
  - `prompt_accuracy`: the fraction of images whose every predicted attribute matches the prompt;
  - `acc/<attribute>`: per-attribute accuracy (background, num_shapes, shape, color, ...).
`heldout_prompts` gives prompts from the evaluation split of the world (`shapes.EVAL_SEED`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcm_jax.convert.common import WeightsError, read_safetensors
from lcm_jax.data import shapes
from lcm_jax.models.classifier import ShapesClassifier

CLASSIFIER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes",
                              "classifier")
_SLOT_NAMES = {"shape": shapes.SHAPES, "color": shapes.COLORS, "size": shapes.SIZES,
               "position": shapes.POSITIONS}


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray,
                                sigma_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two Gaussians.

    tr (S_a S_b)^(1/2) = tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): the right side is symmetric PSD, so
    eigenvalues give it exactly, without scipy's general sqrtm or its complex round-off.
    """
    root_a = _sqrtm_psd(sigma_a)
    cross = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.sqrt(
        np.clip(cross, 0, None)).sum()
    return float(max(value, 0.0))


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features (N, D), in float64."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D)."""
    if np.shape(feats_a)[-1] != np.shape(feats_b)[-1]:
        raise ValueError(f"feature sets differ in width: {np.shape(feats_a)} vs {np.shape(feats_b)}")
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


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


def heldout_prompts(n: int, seed: int = shapes.EVAL_SEED) -> tuple[list[str], dict[str, np.ndarray]]:
    """The first n prompts and stacked attributes of world `seed` (by default the eval split)."""
    world = shapes.ShapesWorld(seed)
    items = [world.attrs(i) for i in range(n)]
    return [shapes.caption_from_attrs(a) for a in items], shapes.stack_attrs(items)


# ---------------------------------------------------------------------------------------------
# Classifier weights
# ---------------------------------------------------------------------------------------------


def load_classifier(path: str = CLASSIFIER_DIR) -> tuple[ShapesClassifier, dict]:
    """The classifier module and params from a folder with config.json + model.safetensors."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise WeightsError(f"no classifier config at {config_path}; train one with "
                           f"`python tools/train_shapes_classifier.py --out {path}`")
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
                           f"unexpected {unexpected}; re-run tools/train_shapes_classifier.py")
    for key, leaf in expected.items():
        if tuple(flat[key].shape) != tuple(leaf.shape):
            raise WeightsError(f"{weights_path}: {key} has shape {flat[key].shape}, the config "
                               f"needs {leaf.shape}; re-run tools/train_shapes_classifier.py")
    params = traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()},
                                          sep="/")
    return model, params


# ---------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------

_REAL_FEATURES: dict[tuple, np.ndarray] = {}   # (classifier dir, seed, num) -> features


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
        self.key = (os.path.abspath(classifier_dir), real_seed, num_real)
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

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Predicted stacked world attributes (see shapes.py) of float [0, 1] NHWC images."""
        return cells_to_attrs({k: v.argmax(-1) for k, v in self._run(images)[0].items()})

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate classifier features (N, D) of float [0, 1] NHWC images."""
        return self._run(images)[1]

    def real_features(self) -> np.ndarray:
        """Features of `num_real` real images of world `real_seed`, computed once per process."""
        if self.key not in _REAL_FEATURES:
            images, _, _ = shapes.ShapesWorld(self.real_seed).batch(range(self.num_real))
            _REAL_FEATURES[self.key] = self.features(images)
        return _REAL_FEATURES[self.key]

    def prompt_accuracy(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
        """`prompt_accuracy` (every attribute right) and `acc/<attribute>` (both slots right)."""
        return self._accuracy(self._run(images)[0], prompts)

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
        """`fd` against real images plus everything `prompt_accuracy` returns."""
        logits, feats = self._run(images)
        out = {"fd": frechet_distance(feats, self.real_features()) if len(feats) > 1 else math.nan}
        out.update(self._accuracy(logits, prompts))
        return out

    @staticmethod
    def _accuracy(logits: Mapping[str, np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
        truth = shapes.stack_attrs([shapes.parse_caption(p) for p in prompts])
        if len(logits["background"]) != len(prompts):
            raise ValueError(f"{len(logits['background'])} images but {len(prompts)} prompts")
        pred = cells_to_attrs({k: v.argmax(-1) for k, v in logits.items()})
        hits = {k: np.all((pred[k] == truth[k]).reshape(len(prompts), -1), 1) for k in truth}
        out = {"prompt_accuracy": float(np.mean(np.all(list(hits.values()), axis=0)))}
        out.update({f"acc/{k}": float(v.mean()) for k, v in hits.items()})
        return out


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------


def save_grid(images: np.ndarray, path: str, nrow: int, labels: Optional[Sequence[str]] = None,
              pad: int = 2) -> tuple[int, int]:
    """Writes images (N, H, W, 3), float [0, 1] or uint8, as a PNG grid of `nrow` per row.

    `labels`, one per grid row, are drawn in a column on the left. Returns (width, height).
    """
    from PIL import Image, ImageDraw, ImageFont

    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)
    n, h, w, _ = images.shape
    rows = math.ceil(n / nrow)
    if labels is not None and len(labels) != rows:
        raise ValueError(f"save_grid: {len(labels)} labels for {rows} rows of {nrow} images")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0 if labels is None else int(max(probe.textlength(t, font=font) for t in labels)) + 2 * pad
    grid = Image.new("RGB", (label_w + nrow * (w + pad) + pad, rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        grid.paste(Image.fromarray(image), (label_w + pad + c * (w + pad), pad + r * (h + pad)))
    for r, text in enumerate(labels or []):
        draw.text((pad, pad + r * (h + pad) + h // 2 - 6), text, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return grid.size


# ---------------------------------------------------------------------------------------------
# The steps-vs-quality table (LCM paper, Table 1 at the shapes world's scale)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QualityRow:
    model: str           # 'teacher', 'LCM', 'LCM-LoRA'
    sampler: str         # 'ddim', 'dpm', 'lcm'
    steps: int
    guidance: float
    fd: float
    prompt_accuracy: float
    seconds: float       # wall time to sample every prompt (after the first compile)


def _padded_chunks(prompts: Sequence[str], batch: int):
    """(i, chunk) of `batch` prompts each, the last padded with its last prompt (one shape per
    compile); chunk i samples from seed + i."""
    for i, s in enumerate(range(0, len(prompts), batch)):
        chunk = list(prompts[s:s + batch])
        yield i, chunk + [chunk[-1]] * (batch - len(chunk))


def generate(pipe, prompts: Sequence[str], sampler: str, steps: int, guidance: float,
             seed: int = 0, batch: int = 100, size: int = 64) -> np.ndarray:
    """Images for `prompts` in fixed-size batches; batch i draws its latents from seed + i, so
    every sampler sees the same starting noise. Only the UNet and VAE calls are compiled
    (compile='model'), once for every sampler and step count."""
    out = []
    for i, chunk in _padded_chunks(prompts, batch):
        out.append(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, height=size,
                        width=size, seed=seed + i, sampler=sampler, compile="model"))
    return np.concatenate(out)[:len(prompts)]


def oracle_generate(pipe, prompts: Sequence[str], steps: int, guidance: float, seed: int = 0,
                    batch: int = 100, size: int = 64,
                    num_ddim_timesteps: Optional[int] = None) -> np.ndarray:
    """What a perfectly distilled LCM of `pipe`'s teacher would sample: generate(pipe, prompts,
    'lcm', ...) with the same starting noise and re-noising draws, the consistency function
    replaced by the value LCD converges to, the teacher's own CFG DDIM chain on the skipping
    grid of N = `num_ddim_timesteps` (the run's config.loss.num_ddim_timesteps; None: the
    scheduler config's original_inference_steps, else 50) from each sampling timestep to t = 0
    (consistency.teacher_chain_endpoint, guidance scale `guidance` = w + 1). The ceiling of
    distillation at this guidance, to tell a student that has not learned the ODE from a
    sampler that cannot use it. A step from t costs up to N teacher CFG passes. SD 1.x/2.x-style
    pipelines (no pooled text embeddings)."""
    from lcm_jax import sampling, schedules
    from lcm_jax.losses import consistency

    if pipe.c.unet.config.time_cond_proj_dim is not None:
        raise ValueError("oracle_generate needs the teacher's pipeline (a UNet without a w-embedding), "
                         "not a distilled LCM's")
    schedule = pipe.c.schedule
    num_ddim = int(num_ddim_timesteps or pipe.c.scheduler_config.get("original_inference_steps", 50))
    ts = [int(t) for t in pipe.timesteps("lcm", steps, original_inference_steps=num_ddim)]
    params, _ = pipe.unet_call_params()
    teacher_fn = lambda _, frozen, x, t, text, w_emb, added: pipe._apply_unet(frozen, x, t, text, None, added)
    chains = {t: jax.jit(lambda frozen, cond, z, t=t: consistency.teacher_chain_endpoint(
        teacher_fn, frozen, cond, z, t, guidance - 1.0, schedule, num_ddim)) for t in ts}
    decode = pipe._jitted_parts[1]
    out = []
    for i, chunk in _padded_chunks(prompts, batch):
        text, pooled = pipe.encode_prompt(chunk)
        if pooled is not None:
            raise ValueError("oracle_generate supports pipelines without pooled text embeddings (not SDXL)")
        cond = {"prompt_embeds": text, "uncond_embeds": pipe._negative_prompt(None, text, None)[0]}
        rng_lat, rng_steps = jax.random.split(jax.random.PRNGKey(seed + i))  # as pipe(..., seed)
        latents = jax.random.normal(rng_lat, (batch, size // 8, size // 8, pipe.c.unet.config.in_channels))

        def model_fn(x, t):  # the model output whose x0-prediction at t is the chain's endpoint
            t0 = int(t[0])
            x0 = chains[t0](params, cond, x)
            a = jnp.float32(schedule.alpha_bar(np.asarray(t0)))
            return schedules.output_for_x0(x0, x, a, schedule.prediction_type)

        z = sampling.lcm_sample(model_fn, latents, schedule, np.asarray(ts), rng_steps, debug=True)
        out.append(np.asarray(decode(pipe.c.vae_params, z)))
    return np.concatenate(out)[:len(prompts)]


def steps_quality_table(runs: Sequence[tuple], evaluator: "ShapesEvaluator", prompts: Sequence[str],
                        seed: int = 0, batch: int = 100, log=print) -> list[QualityRow]:
    """One row per (name, pipe, sampler, steps, guidance) in `runs`: FD and prompt accuracy."""
    rows = []
    for name, pipe, sampler, steps, guidance in runs:
        # Warm up: compiles the pipe's UNet and VAE (shared by every sampler and step count).
        generate(pipe, prompts[:batch], sampler, 1, guidance, seed, batch)
        t0 = time.perf_counter()
        images = generate(pipe, prompts, sampler, steps, guidance, seed, batch)
        seconds = time.perf_counter() - t0
        m = evaluator(images, prompts)
        rows.append(QualityRow(name, sampler, steps, guidance, m["fd"], m["prompt_accuracy"], seconds))
        log(f"  {name:9s} {sampler:5s} {steps:3d} steps  FD {m['fd']:8.2f}  "
            f"prompt acc {m['prompt_accuracy']:.3f}  ({seconds:.1f}s)")
    return rows


def one_step_distances(pipes: Sequence[tuple[Any, float]], reference, prompts: Sequence[str],
                       reference_guidance: float, seed: int = 0, batch: int = 100,
                       size: int = 64) -> list[float]:
    """For each (pipe, guidance): the RMS pixel distance (images in [0, 1]) between its one-step
    LCM images and `reference`'s 50-step DDIM images from the same starting noise (`generate`
    seeds batch i with seed + i for every sampler), i.e. how far a consistency model is from the
    endpoint of the teacher's probability-flow ODE, the map LCD distills."""
    ref = generate(reference, prompts, "ddim", 50, reference_guidance, seed, batch, size)
    return [float(np.sqrt(np.mean(np.square(
        generate(pipe, prompts, "lcm", 1, guidance, seed, batch, size) - ref))))
        for pipe, guidance in pipes]


def table_markdown(rows: Sequence[QualityRow]) -> str:
    lines = ["| model | sampler | steps | guidance | FD (lower is better) | prompt accuracy | seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.model} | {r.sampler.upper() if r.sampler != 'dpm' else 'DPM-Solver++'} | "
              f"{r.steps} | {r.guidance:g} | {r.fd:.2f} | {r.prompt_accuracy:.3f} | {r.seconds:.1f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def plot_table(rows: Sequence[QualityRow], path: str) -> None:
    """FD and prompt accuracy against steps, one line per (model, sampler); the teacher's
    many-step reference as a dashed horizontal line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ref = max((r for r in rows if r.model == "teacher"), key=lambda r: r.steps)
    groups: dict = {}
    for r in rows:
        if r is not ref:
            groups.setdefault(f"{r.model} {r.sampler}", []).append(r)
    for ax, field, label in ((axes[0], "fd", "FD (log scale)"), (axes[1], "prompt_accuracy",
                                                                   "prompt accuracy")):
        for name, g in groups.items():
            g = sorted(g, key=lambda r: r.steps)
            ax.plot([r.steps for r in g], [getattr(r, field) for r in g], "o-", label=name)
        ax.axhline(getattr(ref, field), ls="--", c="k", label=f"teacher {ref.sampler} {ref.steps} steps")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        if field == "fd":
            ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_endpoint_errors(metrics_path: str) -> tuple[list[int], dict[int, list[float]]]:
    """The endpoint_mse/t* rows of a training run's metrics.jsonl: (steps, {t: errors})."""
    steps, errors = [], {}
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line) if line.strip() else {}
            found = {int(k.split("/t")[1]): v for k, v in row.items() if k.startswith("endpoint_mse/t")}
            if found:
                steps.append(int(row["step"]))
                for t, v in found.items():
                    errors.setdefault(t, []).append(float(v))
    if not steps:
        raise ValueError(f"{metrics_path} has no endpoint_mse/t* rows: train with "
                         "config.eval_every > 0 and config.eval_endpoint_timesteps set")
    return steps, dict(sorted(errors.items(), reverse=True))


def endpoint_markdown(steps: Sequence[int], errors: Mapping[int, Sequence[float]]) -> str:
    lines = ["| LCD step | " + " | ".join(f"from t={t}" for t in errors) + " |",
             "|---:|" + "---:|" * len(errors)]
    lines += [f"| {s} | " + " | ".join(f"{errors[t][i]:.4f}" for t in errors) + " |"
              for i, s in enumerate(steps)]
    return "\n".join(lines) + "\n"


def plot_endpoint_errors(steps: Sequence[int], errors: Mapping[int, Sequence[float]], path: str) -> None:
    """One-step MSE to the teacher's ODE endpoint against training step, one line per start t."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for t, v in errors.items():
        ax.plot(steps, v, "o-", label=f"from t={t}")
    ax.set_yscale("log")
    ax.set_xlabel("LCD step")
    ax.set_ylabel("one-step MSE to the teacher's ODE endpoint")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
