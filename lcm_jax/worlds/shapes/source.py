"""The shapes world as a training source: examples [0, num_examples) of world `data.world_seed`,
`data.understated` of whose captions leave attributes out."""
from __future__ import annotations

from lcm_jax.data import sources
from lcm_jax.worlds.shapes.world import ShapesWorld


def make_shapes_source(cfg, tokenize, latent_shape, text_shape) -> sources.ImageCaptionSource:
    world = ShapesWorld(cfg.data.world_seed, cfg.data.get("understated", 0.0))

    def read(i: int):
        image, caption, _ = world.sample(i)
        return image, caption

    return sources.ImageCaptionSource(read, cfg.data.num_examples, cfg.batch_size,
                                      sources.needs_tokenizer("shapes", tokenize), seed=cfg.seed,
                                      name="shapes")


sources.register_source("shapes", make_shapes_source)
