"""from_pretrained("org/name"): Hub ids through huggingface_hub's cache, offline, against a cache
this test lays out itself (models--org--name/snapshots/<rev>/..., refs/main)."""
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file, save_file

from tiny_pipeline import build_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REVISION = "0123456789abcdef0123456789abcdef01234567"

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from lcm_jax import hub
    from lcm_jax.components import load_components
    def total(folder, variant):
        c = load_components(folder, variant=variant)
        return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(c.unet_params)))
    out = {"path": hub.local_folder("org/tiny-lcm"),
           "hub": total("org/tiny-lcm", None), "local": total(sys.argv[1], None),
           "hub_fp16": total("org/tiny-lcm", "fp16"), "local_fp16": total(sys.argv[1], "fp16")}
    try:
        hub.local_folder("org/not-cached")
    except FileNotFoundError as e:
        out["error"] = str(e)
    print(json.dumps(out))
""")


def _add_fp16_variant(folder):
    """Each weights file again as `<name>.fp16.safetensors` in float16 (as diffusers' variants)."""
    for path in glob.glob(os.path.join(folder, "*", "*.safetensors")):
        tensors = {k: v.half() for k, v in load_file(path).items()}
        save_file(tensors, path[:-len(".safetensors")] + ".fp16.safetensors")


def test_hub_id_resolves_through_the_offline_cache(tmp_path):
    local = str(tmp_path / "tiny")
    build_pipeline(local)
    _add_fp16_variant(local)
    cache = tmp_path / "hf" / "hub" / "models--org--tiny-lcm"
    shutil.copytree(local, cache / "snapshots" / REVISION)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(REVISION)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=REPO,
               JAX_PLATFORMS="cpu")
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", SCRIPT, local], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["path"] == str(cache / "snapshots" / REVISION)
    assert out["hub"] == out["local"]
    assert out["hub_fp16"] == out["local_fp16"] != out["hub"]  # the variant's files were read
    assert "org/not-cached is not in the Hugging Face cache" in out["error"]


@pytest.mark.parametrize("name, expected", [("org/name", True), ("runwayml/stable-diffusion-v1-5", True),
                                            ("gs://bucket/model", False), ("a/b/c", False),
                                            ("/abs/path", False), ("model", False)])
def test_is_hub_id(name, expected):
    from lcm_jax import hub

    assert hub.is_hub_id(name) is expected


def test_local_folder_named_like_a_hub_id_stays_local(tmp_path, monkeypatch):
    from lcm_jax import hub

    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.local_folder("org/name") == "org/name"


def test_download_patterns_pick_the_variant():
    from fnmatch import fnmatch

    from lcm_jax import hub

    files = ["model_index.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "tokenizer/merges.txt",
             "unet/diffusion_pytorch_model.bin"]

    def picked(variant):
        allow, ignore = hub._patterns(variant)
        return [f for f in files if any(fnmatch(f, p) for p in allow) and not any(fnmatch(f, p) for p in ignore)]

    assert picked(None) == ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "tokenizer/merges.txt"]
    assert picked("fp16") == ["model_index.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                              "tokenizer/merges.txt"]
