"""Quality over distillation (worlds/shapes/eval_checkpoints.py): its report and its refusals."""
import pytest

from lcm_jax.worlds.shapes import eval_checkpoints

ROWS = [dict(step=0, fd={"1": 900.0, "4": 60.0}, acc={"1": 0.02, "4": 0.15}, endpoint={}),
        dict(step=500, fd={"1": 400.0, "4": 50.5}, acc={"1": 0.05, "4": 0.175},
             endpoint={"t259": 0.02, "t999": 0.5})]
TEACHER = dict(guidance=5.0, fd=66.4, acc=0.192, oracle={"1": (79.1, 0.19), "4": (51.0, 0.198)})


def test_markdown_has_a_row_per_checkpoint_the_logged_endpoints_and_the_ideal_lcm():
    text = eval_checkpoints.markdown(ROWS, [1, 4], TEACHER)
    assert text.startswith("Teacher, 50 DDIM steps, guidance 5: FD 66.40, prompt accuracy 0.192.")
    lines = text.splitlines()
    assert lines[2] == ("| training step | 1 step FD / acc | 4 steps FD / acc | endpoint MSE t999 "
                        "| endpoint MSE t259 |")
    assert lines[4] == "| 0 | 900.00 / 0.020 | 60.00 / 0.150 |  |  |"
    assert lines[5] == "| 500 | 400.00 / 0.050 | 50.50 / 0.175 | 0.5000 | 0.0200 |"
    assert lines[6] == "| ideal LCM | 79.10 / 0.190 | 51.00 / 0.198 | | |"
    without = eval_checkpoints.markdown(ROWS, [1, 4], {k: v for k, v in TEACHER.items() if k != "oracle"})
    assert "ideal LCM" not in without


def test_plot_writes_an_image(tmp_path):
    eval_checkpoints.plot(ROWS, [1, 4], TEACHER, str(tmp_path / "q.png"))
    assert (tmp_path / "q.png").stat().st_size > 1000


@pytest.mark.parametrize("config_name,error", [
    ("shapes_teacher", "method 'diffusion' is not a distillation run"),
    ("shapes_lcd", "checkpoints holds no finished checkpoint")])
def test_refused_before_anything_is_sampled_or_written(config_name, error, tmp_path):
    """A teacher run, or a distillation run with no checkpoint, is refused from its config alone;
    the workdir is left as it was (no quality_by_step.* appears)."""
    import importlib

    from lcm_jax.training.checkpoints import write_run_config

    module = importlib.import_module(f"lcm_jax.worlds.shapes.configs.{config_name}")
    write_run_config(str(tmp_path), module.get_config(), (None, []))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit, match=error):
        eval_checkpoints.main([str(tmp_path), "--steps", "1"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
