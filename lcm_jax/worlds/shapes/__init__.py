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
# The evaluation protocol of the demo's quality table and the methods table: the teacher's
# reference guidance (strong, as the LCM training range of configs/shapes_lcd.py) and the step
# counts an LCM is judged at.
TEACHER_GUIDANCE = 5.0
SAMPLE_STEPS = (1, 2, 4)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

from lcm_jax.worlds.shapes import source as _source  # noqa: E402,F401  (registers 'shapes')
