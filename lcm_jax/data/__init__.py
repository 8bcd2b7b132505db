"""Input pipelines, and the procedural 'shapes' text-to-image world used by the bundled demo."""
from lcm_jax.data.shapes import ShapesWorld, caption_from_attrs, parse_caption, vocabulary

__all__ = ["ShapesWorld", "caption_from_attrs", "parse_caption", "vocabulary"]
