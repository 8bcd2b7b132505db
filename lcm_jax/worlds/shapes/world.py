"""The 'shapes' world: a small procedural text-to-image distribution for the bundled demo.

Each image is 64x64 RGB with one or two shapes (circle, square, triangle, star) of a named colour
and size, each in one cell of a 3x3 grid, on a named background colour that no shape shares. The
full caption states all of it, shapes in reading order of their cells:

    "a small red circle at the top left and a large blue square at the bottom right on a gray
    background"

A world may leave attributes out (`ShapesWorld(seed, understated=rate)`): that fraction of
captions drops each of the background and every shape's size, colour and position with
probability 1/2 (at least one), e.g. "a red circle and a large square at the bottom right". Such
a caption has many right images; the images themselves do not change with the rate (their
random stream is separate). Parsed attributes hold UNSTATED where the caption is silent.

Shapes are rendered at 4x resolution and box-filtered down (anti-aliased), with a little jitter
of position (+-1 px) and scale (+-5%), so the images form a smooth distribution while every
caption stays determinable from the pixels. A sample is a pure function of (seed, index).

Attributes are a dict of ints: `background`, `num_shapes`, and per slot (shape 1, shape 2)
`shape`, `color`, `size`, `position` as length-2 arrays, -1 in slot 2 when there is one shape.
`batch` returns the same keys with a leading batch axis.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "white")
BACKGROUNDS = ("black", "gray", "white", "blue")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
SLOT_KEYS = ("shape", "color", "size", "position")
ATTR_KEYS = ("background", "num_shapes") + SLOT_KEYS
UNSTATED = -2          # an attribute the caption leaves out (parse_caption, understate)
UNDERSTATED = 0.5      # the shipped teacher's rate of captions that leave attributes out
# The seed of the evaluation split (heldout prompts, FD reference images); never train on it.
EVAL_SEED = 2_147_483_647

_RGB = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40),
    "green": (40, 170, 60), "blue": (40, 80, 220), "purple": (140, 50, 180),
    "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
}
_RADIUS = {"small": 6.0, "large": 9.0}   # half-extent of a shape in pixels, before jitter
_SS = 4                                   # supersampling factor per axis
_PATCH = 24                               # rendered patch (output pixels) around a shape
_PAD = _PATCH // 2                        # canvas padding so patches never leave the canvas
_CELL = IMAGE_SIZE / 3


def _star_vertices(points: int = 5, inner: float = 0.45) -> np.ndarray:
    """Vertices of a star pointing up, outer radius 1 (image y axis points down)."""
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)


_STAR = _star_vertices()


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd crossing test of points (u, v) against a closed polygon."""
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if y0 == y1:
            continue
        crosses = (y0 > v) != (y1 > v)
        x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points in unit shape coordinates (centre 0, half-extent 1) are inside `shape`."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":   # apex up at v=-1, base at v=0.8, half-width 1 at the base
        return (v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8)
    if shape == "star":
        return _inside_polygon(u, v, _STAR)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _coverage(shape_ids: np.ndarray, cx: np.ndarray, cy: np.ndarray,
              radius: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anti-aliased coverage (n, _PATCH, _PATCH) of n shapes and each patch's top-left pixel."""
    ox = np.floor(cx).astype(np.int64) - _PAD
    oy = np.floor(cy).astype(np.int64) - _PAD
    sub = (np.arange(_PATCH * _SS, dtype=np.float32) + 0.5) / _SS
    u = ((ox[:, None] + sub[None] - cx[:, None]) / radius[:, None]).astype(np.float32)
    v = ((oy[:, None] + sub[None] - cy[:, None]) / radius[:, None]).astype(np.float32)
    inside = np.zeros((len(cx), _PATCH * _SS, _PATCH * _SS), bool)
    for k, name in enumerate(SHAPES):
        sel = shape_ids == k
        if sel.any():
            inside[sel] = _inside(name, u[sel][:, None, :], v[sel][:, :, None])
    cov = inside.reshape(-1, _PATCH, _SS, _PATCH, _SS).mean((2, 4), dtype=np.float32)
    return cov, ox, oy


def render(attrs: Mapping[str, np.ndarray], jitter: np.ndarray) -> np.ndarray:
    """Renders a batch of attributes as uint8 images (B, 64, 64, 3).

    `jitter` (B, 2, 3) in [-1, 1] moves each slot's shape by up to 1 px in x, y and scales it by
    up to 5%; all zeros renders the canonical image of the attributes.
    """
    bg = np.asarray(attrs["background"]).reshape(-1)
    b = len(bg)
    bg_rgb = np.array([_RGB[BACKGROUNDS[i]] for i in range(len(BACKGROUNDS))], np.float32)
    fg_rgb = np.array([_RGB[c] for c in COLORS], np.float32)
    side = IMAGE_SIZE + 2 * _PAD
    canvas = np.broadcast_to(bg_rgb[bg][:, None, None], (b, side, side, 3)).copy()
    rows, cols = np.arange(_PATCH)[None, :, None], np.arange(_PATCH)[None, None, :]
    for slot in range(2):
        idx = np.nonzero(np.asarray(attrs["shape"])[:, slot] >= 0)[0]
        if len(idx) == 0:
            continue
        pos = np.asarray(attrs["position"])[idx, slot]
        size = np.asarray(attrs["size"])[idx, slot]
        jit = np.asarray(jitter, np.float32)[idx, slot]
        cx = (pos % 3 + 0.5) * _CELL + jit[:, 0]
        cy = (pos // 3 + 0.5) * _CELL + jit[:, 1]
        radius = np.where(size == 1, _RADIUS["large"], _RADIUS["small"]) * (1 + 0.05 * jit[:, 2])
        cov, ox, oy = _coverage(np.asarray(attrs["shape"])[idx, slot], cx, cy, radius)
        color = fg_rgb[np.asarray(attrs["color"])[idx, slot]][:, None, None]
        r, c, i = oy[:, None, None] + _PAD + rows, ox[:, None, None] + _PAD + cols, idx[:, None, None]
        a = cov[..., None]
        canvas[i, r, c] = canvas[i, r, c] * (1 - a) + color * a
    out = canvas[:, _PAD:_PAD + IMAGE_SIZE, _PAD:_PAD + IMAGE_SIZE]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _position_phrase(position: int) -> str:
    name = POSITIONS[position]
    return "in the center" if name == "center" else f"at the {name}"


def caption_from_attrs(attrs: Mapping[str, object]) -> str:
    """The caption of one sample's attributes: slot 2 is skipped when its shape is -1, and every
    attribute that is UNSTATED is left out."""
    parts = []
    for slot in range(2):
        shape = int(np.asarray(attrs["shape"])[slot])
        if shape < 0:
            continue
        size, color, pos = (int(np.asarray(attrs[k])[slot]) for k in ("size", "color", "position"))
        words = ["a"] + [names[i] for names, i in ((SIZES, size), (COLORS, color)) if i >= 0]
        words += [SHAPES[shape]] + ([_position_phrase(pos)] if pos >= 0 else [])
        parts.append(" ".join(words))
    background = int(attrs["background"])
    tail = f" on a {BACKGROUNDS[background]} background" if background >= 0 else ""
    return " and ".join(parts) + tail


def understate(attrs: Mapping[str, object], rng: np.random.Generator) -> dict:
    """`attrs` with the background and each shape's size, colour and position independently
    UNSTATED with probability 1/2, at least one of them."""
    n = int(attrs["num_shapes"])
    fields = [("background", None)] + [(k, s) for s in range(n) for k in ("size", "color", "position")]
    drop = rng.random(len(fields)) < 0.5
    if not drop.any():
        drop[rng.integers(len(fields))] = True
    out = {k: (np.array(v) if k in SLOT_KEYS else v) for k, v in attrs.items()}
    for (key, slot), dropped in zip(fields, drop):
        if dropped and slot is None:
            out[key] = UNSTATED
        elif dropped:
            out[key][slot] = UNSTATED
    return out


def _alt(names: Iterable[str]) -> str:
    """Regex alternation, longest first so that 'top left' wins over 'top'."""
    return "|".join(sorted(names, key=len, reverse=True))


_SHAPE_RE = (rf"a (?:(?P<size{{i}}>{_alt(SIZES)}) )?(?:(?P<color{{i}}>{_alt(COLORS)}) )?"
             rf"(?P<shape{{i}}>{_alt(SHAPES)})(?: in the (?P<center{{i}}>center)|"
             rf" at the (?P<position{{i}}>{_alt(p for p in POSITIONS if p != 'center')}))?")
_CAPTION_RE = re.compile(
    _SHAPE_RE.format(i=0) + rf"(?: and {_SHAPE_RE.format(i=1)})?"
    + rf"(?: on a (?P<background>{_alt(BACKGROUNDS)}) background)?")


def parse_caption(caption: str) -> dict:
    """Attributes of a caption in the world's grammar, two shapes put in reading order when both
    positions are stated (else taken in the caption's order, the world's convention); UNSTATED
    where the caption is silent.

    ValueError for other text, and for scenes the world never draws (two shapes in one cell, a
    shape of the background colour).
    """
    m = _CAPTION_RE.fullmatch(" ".join(caption.lower().split()))
    if m is None:
        raise ValueError(f"caption {caption!r} is not a shapes-world caption; expected e.g. "
                         "'a small red circle at the top left on a gray background'")
    g = m.groupdict()

    def index(names, value):
        return names.index(value) if value is not None else UNSTATED

    attrs = {"background": index(BACKGROUNDS, g["background"]),
             "num_shapes": 1 + (g["shape1"] is not None)}
    for key in SLOT_KEYS:
        attrs[key] = np.full(2, -1, np.int32)
    for slot in range(attrs["num_shapes"]):
        attrs["shape"][slot] = SHAPES.index(g[f"shape{slot}"])
        attrs["color"][slot] = index(COLORS, g[f"color{slot}"])
        attrs["size"][slot] = index(SIZES, g[f"size{slot}"])
        attrs["position"][slot] = index(POSITIONS, g[f"position{slot}"] or g[f"center{slot}"])
    return _canonical(attrs, caption)


def _canonical(attrs: dict, caption: str) -> dict:
    """Puts two shapes with stated positions in reading order; rejects what the world never draws."""
    pos = attrs["position"]
    if attrs["num_shapes"] == 2 and min(pos) >= 0 and pos[0] == pos[1]:
        raise ValueError(f"caption {caption!r} puts both shapes at the {POSITIONS[pos[0]]}; "
                         "the shapes world draws two shapes in different grid cells")
    if attrs["num_shapes"] == 2 and min(pos) >= 0 and pos[1] < pos[0]:
        for key in SLOT_KEYS:
            attrs[key] = attrs[key][::-1].copy()
    colors = {COLORS[c] for c in attrs["color"][:attrs["num_shapes"]] if c >= 0}
    if attrs["background"] >= 0 and BACKGROUNDS[attrs["background"]] in colors:
        raise ValueError(f"caption {caption!r} has a shape of the background colour; the shapes "
                         "world never draws that (it could not be seen)")
    return attrs


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted."""
    words = {"a", "and", "at", "the", "in", "on", "background"}
    for names in (SHAPES, COLORS, BACKGROUNDS, SIZES, POSITIONS):
        for name in names:
            words.update(name.split())
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------


def _draw_attrs(rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """One sample's attributes and its render jitter (2, 3)."""
    n = int(rng.integers(1, 3))
    positions = np.sort(rng.choice(len(POSITIONS), size=n, replace=False))
    attrs = {key: np.full(2, -1, np.int32) for key in SLOT_KEYS}
    attrs["shape"][:n] = rng.integers(0, len(SHAPES), n)
    attrs["color"][:n] = rng.integers(0, len(COLORS), n)
    attrs["size"][:n] = rng.integers(0, len(SIZES), n)
    attrs["position"][:n] = positions
    used = {COLORS[c] for c in attrs["color"][:n]}
    allowed = [i for i, name in enumerate(BACKGROUNDS) if name not in used]
    attrs["background"] = int(rng.choice(allowed))
    attrs["num_shapes"] = n
    return attrs, rng.uniform(-1.0, 1.0, (2, 3)).astype(np.float32)


def stack_attrs(items: Sequence[Mapping[str, object]]) -> dict[str, np.ndarray]:
    """Stacks per-sample attribute dicts into arrays with a leading batch axis."""
    return {key: np.stack([np.asarray(a[key], np.int32) for a in items]) for key in ATTR_KEYS}


def fill(stated: Mapping[str, object], rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """Attributes (and render jitter) of a random image the caption `stated` describes: every
    UNSTATED attribute drawn as the world draws it, until the scene is one the world draws."""
    n = int(stated["num_shapes"])
    while True:
        attrs, jitter = _draw_attrs(rng)
        if attrs["num_shapes"] != n:
            continue
        for key in SLOT_KEYS:
            given = np.asarray(stated[key])[:n]
            if key == "position":  # draw the unstated cells anew: the world's draw sorted them
                given = np.where(given >= 0, given, rng.choice(len(POSITIONS), n, replace=False))
            attrs[key][:n] = np.where(given >= 0, given, attrs[key][:n])
        if int(stated["background"]) >= 0:
            attrs["background"] = int(stated["background"])
        pos, colors = attrs["position"][:n], {COLORS[c] for c in attrs["color"][:n]}
        if len(set(pos)) == n and np.all(np.diff(pos) > 0) and BACKGROUNDS[attrs["background"]] not in colors:
            return attrs, jitter


class ShapesWorld:
    """The shapes text-to-image world; sample `index` of world `seed` is always the same.

    `understated`: the fraction of captions that leave attributes out (`understate`); 0 states
    everything. The images do not depend on it.
    """

    def __init__(self, seed: int = 0, understated: float = 0.0):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"ShapesWorld seed must be a non-negative int, got {seed!r}")
        if not 0.0 <= understated <= 1.0:
            raise ValueError(f"ShapesWorld understated must be a fraction in [0, 1], got {understated!r}")
        self.seed, self.understated = int(seed), float(understated)

    def _rng(self, index: int, stream: int = 0) -> np.random.Generator:
        if index < 0:
            raise ValueError(f"ShapesWorld index must be non-negative, got {index}")
        return np.random.default_rng([self.seed, int(index)] + ([stream] if stream else []))

    def attrs(self, index: int) -> dict:
        """The attributes of sample `index` (without rendering it)."""
        return _draw_attrs(self._rng(index))[0]

    def stated(self, index: int, attrs: Mapping[str, object] | None = None) -> dict:
        """What the caption of sample `index` states: its attributes (`attrs`, when already
        drawn), some UNSTATED."""
        attrs = self.attrs(index) if attrs is None else attrs
        rng = self._rng(index, stream=1) if self.understated else None
        return understate(attrs, rng) if rng is not None and rng.random() < self.understated else dict(attrs)

    def caption(self, index: int, attrs: Mapping[str, object] | None = None) -> str:
        return caption_from_attrs(self.stated(index, attrs))

    def sample(self, index: int) -> tuple[np.ndarray, str, dict]:
        """Image uint8 (64, 64, 3), caption and attributes of sample `index`."""
        images, captions, attrs = self.batch([index])
        return images[0], captions[0], {k: (v[0] if v.ndim > 1 else int(v[0]))
                                        for k, v in attrs.items()}

    def batch(self, indices: Iterable[int], chunk: int = 512
              ) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
        """Images (B, 64, 64, 3) uint8, captions and stacked attributes of many samples."""
        indices = list(indices)
        drawn = [_draw_attrs(self._rng(i)) for i in indices]
        if not drawn:
            raise ValueError("ShapesWorld.batch needs at least one index")
        attrs = stack_attrs([a for a, _ in drawn])
        images = render_batch(attrs, np.stack([j for _, j in drawn]), chunk)
        return images, [self.caption(i, a) for i, (a, _) in zip(indices, drawn)], attrs


def render_batch(attrs: Mapping[str, np.ndarray], jitter: np.ndarray, chunk: int = 512) -> np.ndarray:
    """`render` in chunks of `chunk` images (bounded memory)."""
    n = len(jitter)
    return np.concatenate([render({k: v[s:s + chunk] for k, v in attrs.items()}, jitter[s:s + chunk])
                           for s in range(0, n, chunk)])


def write_image_folder(world: ShapesWorld, out_dir: str, num: int, start: int = 0) -> str:
    """Writes samples start..start+num-1 as PNGs plus `metadata.jsonl` (HF imagefolder layout).

    Each metadata line is `{"file_name": "00000012.png", "text": caption}`. Returns the path of
    metadata.jsonl.
    """
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    lines = []
    for s in range(start, start + num, 512):
        idx = range(s, min(s + 512, start + num))
        images, captions, _ = world.batch(idx)
        for i, image, caption in zip(idx, images, captions):
            name = f"{i:08d}.png"
            Image.fromarray(image).save(os.path.join(out_dir, name))
            lines.append(json.dumps({"file_name": name, "text": caption}))
    path = os.path.join(out_dir, "metadata.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
