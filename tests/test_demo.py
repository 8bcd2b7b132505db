"""The LCM paper's claim at the shapes world's scale, on the shipped teacher after a short
distillation: few-step LCM sampling beats few-step DDIM / DPM-Solver++ and is close to the
teacher's 50 DDIM steps. Runs the demo's own code path (lcm_jax.demo.run) with fewer steps."""
import os

import pytest

from lcm_jax import demo
from lcm_jax.evaluate import CLASSIFIER_DIR

LCD_STEPS = int(os.environ.get("LCM_JAX_TEST_LCD_STEPS", "600"))

# A full demo distillation (about 10-25 minutes on 2 cores): `make test-slow`.
pytestmark = pytest.mark.slow


def _row(rows, model, sampler, steps):
    return next(r for r in rows if (r.model, r.sampler, r.steps) == (model, sampler, steps))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    assert os.path.isdir(CLASSIFIER_DIR)
    return demo.run(str(tmp_path_factory.mktemp("demo")), lcd_steps=LCD_STEPS, lora_steps=0,
                    num_prompts=200)


@pytest.mark.parametrize("steps", [1, 2])
def test_lcm_has_at_most_half_the_fd_of_ddim_and_dpm(rows, steps):
    lcm = _row(rows, "LCM", "lcm", steps)
    for sampler in ("ddim", "dpm"):
        base = _row(rows, "teacher", sampler, steps)
        assert lcm.fd <= 0.5 * base.fd, (steps, sampler, lcm.fd, base.fd)


def test_lcm_four_steps_close_to_teacher_fifty(rows):
    lcm, ref = _row(rows, "LCM", "lcm", 4), _row(rows, "teacher", "ddim", 50)
    assert lcm.fd <= 1.5 * ref.fd, (lcm.fd, ref.fd)
    assert lcm.prompt_accuracy >= 0.9 * ref.prompt_accuracy, (lcm.prompt_accuracy, ref.prompt_accuracy)
