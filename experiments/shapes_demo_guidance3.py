"""`python -m lcm_jax.demo` with the guidance-3 recipe of the methods table's `lcd_k20_ema99_w13`,
for a teacher other than the shipped one (docs/shapes_decided.md, "The demo at guidance 3"):
LCD on the k = 20 grid (N = 50) with target EMA 0.99, w 1..3 (guidance 2..4, sampled at 3), its
endpoint error from the 4-step sampler's timesteps on that grid; LCM-LoRA at w 1..3 as well.
Same budget, rows and files as the demo.

    python experiments/shapes_demo_guidance3.py --teacher FOLDER --workdir WORKDIR
"""
import sys

from lcm_jax.worlds.shapes import demo
from lcm_jax.worlds.shapes.methods import METHODS, TABLE_BASE, W13, apply_overrides

demo_config = demo.load_config
RECIPE = {**TABLE_BASE, **METHODS["lcd_k20_ema99_w13"][1]}  # the methods table's entry, as it trains


def guidance3_config(arg=None, teacher=None):
    """configs/shapes_lcd.py (`arg` 'lora': its LCM-LoRA) with the guidance-3 recipe."""
    config = demo_config(arg, teacher)
    apply_overrides(config, W13 if arg == "lora" else RECIPE)
    return config


if __name__ == "__main__":
    demo.load_config = guidance3_config  # the demo builds both runs' configs through load_config
    sys.exit(demo.main(sys.argv[1:]))
