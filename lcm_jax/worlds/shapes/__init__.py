"""The shapes world: captions that describe coloured shapes on a background, rendered exactly, with
a shipped VAE / text encoder / teacher (assets/teacher), an attribute classifier that scores
samples (assets/classifier), and the demo (`python -m lcm_jax.demo`).

Importing this package registers the 'shapes' data source (`config.data.source = 'shapes'`).
"""
import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TEACHER_DIR = os.path.join(ASSETS, "teacher")        # diffusers pipeline folder
CLASSIFIER_DIR = os.path.join(ASSETS, "classifier")  # the evaluator's classifier
TOKENIZER_DIR = os.path.join(ASSETS, "tokenizer")    # CLIP-format tokenizer of the vocabulary
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

from lcm_jax.worlds.shapes import source as _source  # noqa: E402,F401  (registers 'shapes')
