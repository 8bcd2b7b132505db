"""lcm_jax.fs on local paths and on a real GCS endpoint (gcp-storage-emulator): a tiny LCD run with
a gs:// workdir (config.json, checkpoints, metrics.jsonl, TensorBoard events in the bucket; kill -9
and resume equal to an uninterrupted run) and a gs:// teacher folder loaded like a local one."""
import json
import os
import signal
import subprocess
import time

import fsspec
import jax
import numpy as np
import pytest
from gcs_emulator import gcs_bucket, gcs_server  # noqa: F401  (fixtures)
from test_train import ROOT, TRAIN, _env

from lcm_jax import fs


def _tree_equal(a, b) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _write_files(folder, files: dict) -> None:
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
        with open(os.path.join(folder, rel), "w") as f:
            f.write(text)


def _read_files(folder) -> dict:
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n)).read()
            for d, _, names in os.walk(folder) for n in names if n != fs.COMPLETE_MARKER}


# --------------------------------------------------------------------------- local paths

def test_local_paths(tmp_path):
    d = str(tmp_path / "a" / "b")
    assert not fs.is_remote(d) and fs.is_remote("gs://bucket/run")
    assert fs.join(d, "x.txt") == os.path.join(d, "x.txt")
    assert fs.join("gs://bucket/run/", "checkpoints", "10") == "gs://bucket/run/checkpoints/10"
    fs.makedirs(d)
    assert os.path.isdir(d) and fs.exists(d) and not fs.exists(fs.join(d, "x.txt"))
    path = fs.join(d, "x.txt")
    fs.write_text_atomic(path, "old")
    fs.write_text_atomic(path, "new\n")
    with fs.open(path) as f:
        assert f.read() == "new\n"
    assert os.listdir(d) == ["x.txt"]  # no temporary file left behind
    assert fs.local_copy(d) == d


def test_publish_dir_locally(tmp_path):
    files = {"model_index.json": "{}", "unet/config.json": '{"a": 1}'}
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    _write_files(src, files)
    assert fs.publish_dir(src, src) == src and _read_files(src) == files
    assert fs.publish_dir(src, dst) == dst and _read_files(dst) == files


def test_save_grid_to_a_bucket_equals_local(gcs_bucket, tmp_path):
    from PIL import Image

    from lcm_jax.evaluation.grids import save_grid

    images = np.random.default_rng(0).uniform(size=(4, 8, 8, 3))
    local, remote = str(tmp_path / "grid.png"), f"{gcs_bucket}/samples/step_000010.png"
    assert save_grid(images, local, nrow=2) == save_grid(images, remote, nrow=2)
    with fs.open(remote, "rb") as f:
        np.testing.assert_array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(local)))


# --------------------------------------------------------------------------- a bucket

def test_remote_text_and_local_copy(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LCM_JAX_CACHE_DIR", str(tmp_path / "cache"))
    files = {"model_index.json": '{"x": 1}', "unet/config.json": "{}", "vae/a/b.txt": "deep"}
    src, url = str(tmp_path / "src"), f"{gcs_bucket}/teacher"
    _write_files(src, files)
    assert fs.publish_dir(src, url) == url
    fs.write_text_atomic(fs.join(url, "note.txt"), "hello")
    with fs.open(fs.join(url, "note.txt")) as f:
        assert f.read() == "hello"
    assert fs.exists(fs.join(url, "unet", "config.json")) and not fs.exists(fs.join(url, "nope"))

    copy = fs.local_copy(url)
    assert copy.startswith(fs.cache_dir()) and _read_files(copy) == {**files, "note.txt": "hello"}
    fsspec.filesystem("gs").rm(url[len("gs://"):], recursive=True)
    assert fs.local_copy(url + "/") == copy and _read_files(copy)["note.txt"] == "hello"  # no download

    os.remove(os.path.join(copy, fs.COMPLETE_MARKER))  # as if the download had been interrupted
    fs.publish_dir(src, url)
    assert fs.local_copy(url) == copy and _read_files(copy) == files
    with pytest.raises(FileNotFoundError, match="holds no files"):
        fs.local_copy(f"{gcs_bucket}/missing")


def test_teacher_folder_in_a_bucket_loads_like_the_local_one(gcs_bucket, tmp_path, monkeypatch):
    from tiny_pipeline import build_pipeline

    from lcm_jax import LCMPipeline
    from lcm_jax.components import load_components

    monkeypatch.setenv("LCM_JAX_CACHE_DIR", str(tmp_path / "cache"))
    local = str(tmp_path / "teacher")
    build_pipeline(local)
    url = fs.publish_dir(local, f"{gcs_bucket}/models/teacher")
    ref, got = load_components(local), load_components(url)
    for k in ("unet_params", "vae_params", "text_params"):
        _tree_equal(getattr(ref, k), getattr(got, k))
    assert got.scheduler_config == ref.scheduler_config and got.unet.config == ref.unet.config
    pipe = LCMPipeline.from_pretrained(url)
    _tree_equal(pipe.unet_params, ref.unet_params)
    assert pipe.components.tokenizer("a cat").input_ids == ref.tokenizer("a cat").input_ids


# --------------------------------------------------------------------------- a run in a bucket

def _bucket_fs():
    gfs = fsspec.filesystem("gs")
    gfs.invalidate_cache()
    return gfs


def _metrics(workdir) -> list[dict]:
    text = _bucket_fs().cat(workdir[len("gs://"):] + "/metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _train(args, timeout=900):
    out = subprocess.run(TRAIN + args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_run_in_a_bucket_resumes_after_kill(gcs_bucket):
    from lcm_jax.training.checkpoints import restore

    full, killed = f"{gcs_bucket}/full", f"{gcs_bucket}/killed"
    out = _train([f"--workdir={full}", "--config.checkpoint_every=10"])
    assert "credentials" not in (out.stdout + out.stderr).lower(), out.stderr[-3000:]
    gfs, root = _bucket_fs(), full[len("gs://"):]
    assert json.loads(gfs.cat(f"{root}/config.json"))["method"] == "lcd"
    assert sorted(int(p.rsplit("/", 1)[1]) for p in gfs.ls(f"{root}/checkpoints")
                  if p.rsplit("/", 1)[1].isdigit()) == [30, 40, 50]
    events = gfs.ls(f"{root}/tensorboard")
    assert len(events) == 1 and "tfevents" in events[0] and gfs.size(events[0]) > 0
    ref = {r["step"]: r for r in _metrics(full)}
    assert sorted(ref) == list(range(5, 51, 5))

    args = [f"--workdir={killed}", "--config.checkpoint_every=10"]
    proc = subprocess.Popen(TRAIN + args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not _bucket_fs().exists(killed[len("gs://"):] + "/checkpoints/20/commit_success.txt"):
        assert proc.poll() is None and time.time() < deadline, "run ended before step 20"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(r["step"] for r in _metrics(killed)) < 50
    assert "resumed from" in _train(args).stdout
    rows = _metrics(killed)
    assert [r["step"] for r in rows] == sorted(ref)
    for r in rows:
        np.testing.assert_allclose(r["loss"], ref[r["step"]]["loss"], rtol=1e-6)
    a, b = restore(full).state, restore(killed).state  # orbax reads gs:// in this process too
    assert int(a.step) == int(b.step) == 50
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
