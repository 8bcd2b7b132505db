"""The LCM paper's claim at the shapes world's scale, on the shipped teacher after a short
distillation: few-step LCM sampling beats few-step DDIM / DPM-Solver++ and is close to the
teacher's 50 DDIM steps. Runs the demo's own code path (lcm_jax.worlds.shapes.demo.run) with fewer steps."""
import os

import pytest

from lcm_jax.worlds.shapes import CLASSIFIER_DIR
from lcm_jax.worlds.shapes import demo

LCD_STEPS = int(os.environ.get("LCM_JAX_TEST_LCD_STEPS", "0"))  # 0: the config's total_steps

# A full demo distillation (about 10-25 minutes on 2 cores): `make test-slow`.
pytestmark = pytest.mark.slow


def _row(rows, model, sampler, steps):
    return next(r for r in rows if (r.model, r.sampler, r.steps) == (model, sampler, steps))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def rows(workdir):
    from lcm_jax.worlds.shapes.configs.shapes_lcd import get_config

    assert os.path.isdir(CLASSIFIER_DIR)
    return demo.run(workdir, lcd_steps=LCD_STEPS or get_config().total_steps, lora_steps=0,
                    num_prompts=500)


def test_distillation_brings_one_step_output_to_the_teachers_ode_endpoint(rows, workdir):
    """What LCD does, which the table alone does not show (the undistilled teacher under the LCM
    sampler already meets the 4-step claim): the student's one-step latent error to the end of
    the teacher's CFG ODE chain falls from every start timestep of the 4-step sampler."""
    from lcm_jax.evaluation.report import read_endpoint_errors

    steps, errors = read_endpoint_errors(os.path.join(workdir, "lcd", "metrics.jsonl"))
    assert steps[0] == 0 and steps[-1] > 0
    for t, e in errors.items():
        assert e[-1] < 0.9 * e[0], (t, e)


# The aims, and which of them `make demo` met on the shipped teacher (README, Status: its
# quality.md, 500 prompts; LCD at k = 100, target EMA 0.99). Met, and asserted here: at 1, 2 and
# 4 steps at most half the FD of the teacher's DDIM and DPM-Solver++ (at most 0.38x); at 1 and 2
# steps at most half the FD of the undistilled student under the LCM sampler (0.37x, 0.37x);
# 4 steps at most the teacher's 50-step FD (0.79x). Missed, so not asserted: half the undistilled
# student's FD at 4 steps (0.94x), 1 step within 2x of the teacher's 50 steps (6.8x), 2 steps
# within 1.2x (1.24x), and 4 steps with at least 0.95x the teacher's prompt accuracy (0.75x).
# These prompts are set 0 of docs/shapes_spread.md; on 3 other sets of 500, half DDIM's and
# DPM-Solver++'s FD at 4 steps and half the undistilled student's at 2 are each missed on one.
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("baseline", ["ddim", "dpm"])
def test_lcm_has_at_most_half_the_fd_of_ddim_and_dpm(rows, steps, baseline):
    lcm, base = _row(rows, "LCM", "lcm", steps), _row(rows, "teacher", baseline, steps)
    assert lcm.fd <= 0.5 * base.fd, (steps, baseline, lcm.fd, base.fd)


def test_lcm_four_steps_fd_at_most_the_teachers_fifty(rows):
    lcm, ref = _row(rows, "LCM", "lcm", 4), _row(rows, "teacher", "ddim", 50)
    assert lcm.fd <= ref.fd, (lcm.fd, ref.fd)


@pytest.mark.parametrize("steps", [1, 2])
def test_lcm_has_at_most_half_the_fd_of_the_undistilled_student(rows, steps):
    lcm, base = _row(rows, "LCM", "lcm", steps), _row(rows, "teacher", "lcm", steps)
    assert lcm.fd <= 0.5 * base.fd, (steps, lcm.fd, base.fd)
