"""The import rules of docs/design.md, read from the package's source (ast), so a change that
breaks one fails here with the file and the import."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lcm_jax")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str) -> set[str]:
    """Every lcm_jax module `path` imports, at any depth of the file (function-level too)."""
    tree = ast.parse(open(path).read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m == "lcm_jax" or m.startswith("lcm_jax.")}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                graph[_module_name(path)] = _imports(path)
    return graph


GRAPH = _graph()


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _broken(importer_in, imported_in, allowed=()) -> list[str]:
    return sorted(f"{m} imports {i}" for m, deps in GRAPH.items() if importer_in(m) and m not in allowed
                  for i in deps if imported_in(i))


def test_the_graph_is_read():
    """The reader sees function-level imports too (a check that cannot fail proves nothing)."""
    assert "lcm_jax.pipeline" in GRAPH["lcm_jax.runs"]
    assert "lcm_jax.worlds.shapes.demo" in GRAPH["lcm_jax.demo"]
    assert any(_within(i, "lcm_jax.convert") for i in GRAPH["lcm_jax.cli"])


def test_models_import_only_models():
    assert _broken(lambda m: _within(m, "lcm_jax.models"),
                   lambda i: not _within(i, "lcm_jax.models") and i != "lcm_jax") == []


def test_nothing_outside_worlds_imports_a_world():
    """The core plugs a world in through the source registry, the eval CLI's evaluator spec and
    the sample-grid hook; only the `python -m lcm_jax.demo` entry point names one."""
    assert _broken(lambda m: not _within(m, "lcm_jax.worlds"), lambda i: _within(i, "lcm_jax.worlds"),
                   allowed={"lcm_jax.demo"}) == []


@pytest.mark.parametrize("trainer, inference", [
    ("lcm_jax.training", "lcm_jax.pipeline"),
    ("lcm_jax.train", "lcm_jax.pipeline"),
])
def test_training_and_pipeline_do_not_import_each_other(trainer, inference):
    assert _broken(lambda m: _within(m, trainer), lambda i: _within(i, inference)) == []
    assert _broken(lambda m: _within(m, inference),
                   lambda i: _within(i, "lcm_jax.training") or i == "lcm_jax.train") == []


def test_lower_layers_import_neither_training_nor_pipeline():
    """convert/, losses/, data/, schedules, sampling, sharding, components, evaluation: the
    layers both sides build on."""
    lower = ("lcm_jax.convert", "lcm_jax.losses", "lcm_jax.data", "lcm_jax.schedules",
             "lcm_jax.sampling", "lcm_jax.sharding", "lcm_jax.components", "lcm_jax.evaluation")
    upper = ("lcm_jax.training", "lcm_jax.train", "lcm_jax.pipeline", "lcm_jax.runs", "lcm_jax.cli")
    assert _broken(lambda m: any(_within(m, p) for p in lower),
                   lambda i: any(_within(i, p) for p in upper)) == []


def test_the_trainer_runs_without_loading_the_pipeline():
    """At run time too: importing the trainer (and the package's public names lazily) leaves
    lcm_jax.pipeline unloaded."""
    import subprocess
    import sys

    code = ("import sys, lcm_jax, lcm_jax.train; "
            "print(sorted(m for m in sys.modules if m in ('lcm_jax.pipeline', 'lcm_jax.runs')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(PACKAGE))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert callable(__import__("lcm_jax").load_unet)
