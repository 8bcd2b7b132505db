"""A small CNN that reads the attributes of a shapes-world image (for evaluating samples).

Input: NHWC images in [-1, 1], 64x64. The image is a 3x3 grid of cells, each empty or holding
one shape, so the network predicts per cell (with weights shared by all cells) which shape,
colour and size it holds, the last class of each meaning "empty"; plus the background colour.
Slot attributes (first and second shape in reading order) follow from the cells; see
`lcm_jax.evaluate.cells_to_attrs`. With `return_features=True` it also returns penultimate
features (the cell features averaged over cells, like a global pool), used for Frechet distance.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _cell_windows(size: int, cells: int) -> tuple[int, list[int]]:
    """Window length and start of each grid cell's window on a feature axis of `size`."""
    win = min(size, -(-size // cells) + 1)
    return win, [min(int(k * size / cells), size - win) for k in range(cells)]


class ShapesClassifier(nn.Module):
    """Conv trunk -> each cell's window of the feature map, flattened -> shared MLP -> heads.

    Flattening the window (not pooling it) keeps the layout of a shape, which is what tells a
    circle from a square of the same area.
    """

    num_backgrounds: int
    cell_heads: Sequence[tuple[str, int]]     # (name, classes incl. the last 'empty' class)
    grid: int = 3
    layers: Sequence[tuple[int, int, int]] = ((32, 4, 2), (32, 3, 2), (32, 3, 1))
    features: int = 128                       # (channels, kernel, stride) per conv above

    @nn.compact
    def __call__(self, images: jax.Array, return_features: bool = False):
        x = images
        for i, (ch, k, s) in enumerate(self.layers):
            pad = (k - 1) // 2 if k > s else 0
            x = nn.relu(nn.Conv(ch, (k, k), strides=s, padding=pad, name=f"conv_{i}")(x))
        b, h, w, _ = x.shape
        win_h, rows = _cell_windows(h, self.grid)
        win_w, cols = _cell_windows(w, self.grid)
        cells = jnp.stack([x[:, r:r + win_h, c:c + win_w].reshape(b, -1)
                           for r in rows for c in cols], axis=1)        # (B, cells, window)
        hidden = nn.relu(nn.Dense(self.features, name="cell_mlp_0")(cells))
        hidden = nn.relu(nn.Dense(self.features, name="cell_mlp_1")(hidden))
        logits = {"background": nn.Dense(self.num_backgrounds, name="head_background")(
            x.mean((1, 2)))}
        for name, n in self.cell_heads:
            logits[name] = nn.Dense(n, name=f"head_{name}")(hidden)      # (B, cells, n)
        feats = hidden.mean(1)
        return (logits, feats) if return_features else logits

    def features_of(self, images: jax.Array) -> jax.Array:
        """Penultimate features (B, features); use as `apply(..., method='features_of')`."""
        return self(images, return_features=True)[1]
