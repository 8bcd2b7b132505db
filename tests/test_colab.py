"""experiments/colab_sample.ipynb runs: its code cells executed in order (the install cell,
tagged 'install', skipped; the 'parameters' cell's model swapped for the bundled teacher folder),
images come out; and the pipeline's default dtype per backend."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm_jax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_sample.ipynb")
TEACHER = os.path.join(ROOT, "lcm_jax", "worlds", "shapes", "assets", "teacher")


def code_cells():
    with open(NOTEBOOK) as f:
        cells = json.load(f)["cells"]
    return [("".join(c["source"]), c["metadata"].get("tags", [])) for c in cells if c["cell_type"] == "code"]


def test_notebook_is_format_4_without_stored_outputs():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4 and nb["cells"]
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("code", "markdown"), cell["cell_type"]
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_notebook_runs_on_the_bundled_teacher(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    monkeypatch.setattr(plt, "show", lambda: None)
    cells = code_cells()
    assert any("install" in tags and "git+{REPO_URL}" in src for src, tags in cells)
    namespace: dict = {}
    for src, tags in cells:
        if "install" in tags:
            continue
        exec(compile(src, NOTEBOOK, "exec"), namespace)
        if "parameters" in tags:
            assert namespace["MODEL_ID"] == "SimianLuo/LCM_Dreamshaper_v7" and namespace["STEPS_LIST"] == [1, 2, 4, 8]
            namespace.update(MODEL_ID=TEACHER, PROMPTS=["a red circle"], STEPS_LIST=[1, 2], HEIGHT=64, WIDTH=64,
                             GUIDANCE=3.0)
    results = namespace["results"]
    assert sorted(results) == [1, 2]
    for images, first, second in results.values():
        assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
        assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.01
        assert first > 0 and second > 0
    assert not np.allclose(results[1][0], results[2][0])


@pytest.mark.parametrize("backend, expected", [("cpu", jnp.float32), ("gpu", jnp.bfloat16), ("tpu", jnp.bfloat16)])
def test_default_dtype_follows_the_backend(monkeypatch, backend, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert pipeline.default_dtype() == jnp.dtype(expected)


def test_from_pretrained_takes_the_default_unless_a_dtype_is_given(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    pipe = pipeline.LCMPipeline.from_pretrained(TEACHER)
    assert pipe.components.unet.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(pipe.unet_params)} == {jnp.dtype(jnp.bfloat16)}
    explicit = pipeline.LCMPipeline.from_pretrained(TEACHER, dtype=jnp.float32)
    assert {leaf.dtype for leaf in jax.tree.leaves(explicit.unet_params)} == {jnp.dtype(jnp.float32)}
