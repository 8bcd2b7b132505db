"""`python -m lcm_jax.demo`: the main job on the bundled default (see lcm_jax.worlds.shapes.demo).

The one place outside lcm_jax/worlds/ that names a world: the entry point `make demo` runs.
"""
import sys

from lcm_jax.worlds.shapes.demo import main

if __name__ == "__main__":
    sys.exit(main())
