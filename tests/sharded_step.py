"""Run as a script under 8 fake CPU devices: one LCD step on a (4, 2) mesh and on 1 device.

Prints a JSON line with the two losses, the largest parameter difference and example
PartitionSpecs, for tests/test_train.py (a subprocess, so the test session keeps 1 device).
"""
import json
import sys

import jax
import numpy as np

from lcm_jax import sharding, train


def one_step(config, mesh):
    s = train.setup(config, mesh)
    batch = sharding.shard_batch(s.source.batch(0), mesh)
    state, metrics = s.step_fn(s.state, s.frozen, batch)
    return state, metrics, s.state_sh


def main(method: str):
    sys.path.insert(0, "configs")
    import tiny_lcd

    config = tiny_lcd.get_config(method)
    config.optim.grad_accum_steps = 2
    # Adam's first step is lr * g / (|g| + eps): for gradients near zero that is a sign, which
    # float rounding can flip between reduction orders. A larger eps keeps the update continuous
    # in g so the comparison measures the sharded computation, not that discontinuity.
    config.optim.eps = 1e-3
    devices = jax.devices()
    assert len(devices) == 8, devices
    s1, m1, _ = one_step(config, sharding.make_mesh(1, 1, devices[:1]))
    s8, m8, sh8 = one_step(config, sharding.make_mesh(4, 2, devices))
    p1, p8 = jax.device_get(s1.params), jax.device_get(s8.params)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(p1))
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): str(s.spec)
            for path, s in jax.tree_util.tree_leaves_with_path(
                sh8.params, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))}
    print(json.dumps({"loss_1": float(m1["loss"]), "loss_8": float(m8["loss"]),
                      "max_param_diff": diff, "param_scale": scale, "specs": flat}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lcd")
