"""The package as users install it: a wheel (`pip wheel .`) installed non-editable into a fresh
virtual environment runs its own demo entry point and samples from the bundled teacher, from a
folder that is not the checkout (so nothing is read from the source tree)."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A venv that sees this machine's dependencies (jax, flax, ...) but has its own lcm-jax,
    installed from the wheel without the source tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation",
          "-q", "-w", str(tmp / "dist")], cwd=str(tmp))
    wheel, = glob.glob(str(tmp / "dist" / "lcm_jax-*.whl"))
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")], cwd=str(tmp))
    python = str(tmp / "venv" / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=str(tmp))
    work = tmp / "elsewhere"
    work.mkdir()
    return python, str(tmp / "venv"), str(work)


def test_the_installed_package_is_the_wheel(venv):
    python, prefix, work = venv
    where = _run([python, "-c", "import lcm_jax.worlds.shapes as s, lcm_jax; "
                  "print(lcm_jax.__file__); print(s.TEACHER_DIR)"], cwd=work).split()
    assert all(p.startswith(prefix) for p in where), where   # not the checkout
    assert os.path.exists(os.path.join(where[1], "unet", "diffusion_pytorch_model.safetensors"))


def test_demo_help_runs_from_the_wheel(venv):
    python, _, work = venv
    out = _run([python, "-m", "lcm_jax.demo", "--help"], cwd=work)
    assert "--workdir" in out and "--lcd_steps" in out


def test_one_step_sample_from_the_bundled_teacher(venv):
    python, prefix, work = venv
    teacher = _run([python, "-c", "from lcm_jax.worlds.shapes import TEACHER_DIR; print(TEACHER_DIR)"],
                   cwd=work).strip()
    out = os.path.join(work, "samples")
    _run([os.path.join(prefix, "bin", "lcm-jax"), "sample", "--model", teacher, "--prompt",
          "a large red circle at the center on a blue background", "--steps", "1",
          "--guidance", "5", "--height", "64", "--width", "64", "--out", out], cwd=work)
    from PIL import Image

    image = np.asarray(Image.open(os.path.join(out, "00_00.png")))
    assert image.shape == (64, 64, 3) and image.std() > 1.0   # an image, not a constant
