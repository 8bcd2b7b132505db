"""A small CNN that reads the attributes of a shapes-world image (for evaluating samples).

Input: NHWC images in [-1, 1], 64x64. Output: one logit vector per head, e.g. `background`,
`num_shapes`, and per slot `shape_0`, `color_0`, ..., `position_1`, where a slot head has one
class more than the attribute (the last one means "no shape in this slot"). With
`return_features=True` it also returns the penultimate activations, used for Frechet distance.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class ShapesClassifier(nn.Module):
    """Conv stack -> flatten (keeps where things are) -> dense features -> linear heads.

    The default first layer is a 4x4 stride-4 patch embedding, which keeps training cheap on CPU.
    """

    heads: Sequence[tuple[str, int]]          # (name, number of classes), in output order
    layers: Sequence[tuple[int, int, int]] = ((32, 4, 4), (32, 3, 1), (64, 3, 2), (64, 3, 1),
                                              (64, 3, 2))   # (channels, kernel, stride)
    features: int = 128

    @nn.compact
    def __call__(self, images: jax.Array, return_features: bool = False):
        x = images
        for i, (ch, k, s) in enumerate(self.layers):
            pad = (k - 1) // 2 if k > s else 0
            x = nn.relu(nn.Conv(ch, (k, k), strides=s, padding=pad, name=f"conv_{i}")(x))
        x = x.reshape(x.shape[0], -1)
        feats = nn.relu(nn.Dense(self.features, name="features")(x))
        logits = {name: nn.Dense(n, name=f"head_{name}")(feats) for name, n in self.heads}
        return (logits, feats) if return_features else logits

    def features_of(self, images: jax.Array) -> jax.Array:
        """Penultimate activations (B, features); use as `apply(..., method='features_of')`."""
        return self(images, return_features=True)[1]

