"""The spread of the shapes quality table over disjoint prompt sets (worlds/shapes/spread.py)."""
import os

import numpy as np
import pytest

from lcm_jax.worlds.shapes import spread
from lcm_jax.worlds.shapes.evaluator import heldout_prompts


def test_prompt_sets_are_disjoint_and_the_first_is_the_quality_tables():
    sets = spread.prompt_sets(3, 40)
    assert sets[0] == (heldout_prompts(40)[0], 0)
    assert [seed for _, seed in sets] == [0, spread.SEED_STRIDE, 2 * spread.SEED_STRIDE]
    assert [p for prompts, _ in sets for p in prompts] == heldout_prompts(120)[0]


def _rows(values: dict[tuple, list[tuple[float, float]]]) -> list[dict]:
    """Synthetic spread rows: {(model, sampler, steps): [(fd, acc) per set]}."""
    return [dict(set=s, model=k[0], sampler=k[1], steps=k[2], fd=fd, prompt_accuracy=acc)
            for k, per_set in values.items() for s, (fd, acc) in enumerate(per_set)]


def _world(lcm_fd_4: list[float], lcm_acc_4: list[float]) -> list[dict]:
    rng = np.random.default_rng(0)
    values = {spread.TEACHER: [(60.0, 0.2), (50.0, 0.25), (70.0, 0.1)]}
    for n in (1, 2, 4):
        for s in ("ddim", "dpm", "lcm"):
            values[("teacher", s, n)] = [(float(x), 0.1) for x in rng.uniform(100, 200, 3)]
    values[("LCM a", "lcm", 1)] = [(100.0, 0.1)] * 3
    values[("LCM a", "lcm", 2)] = [(70.0, 0.1)] * 3
    values[("LCM a", "lcm", 4)] = list(zip(lcm_fd_4, lcm_acc_4))
    return _rows(values)


def test_summary_is_the_mean_sd_and_range_over_sets():
    rows = _world([50.0, 40.0, 90.0], [0.2, 0.2, 0.2])
    entry = next(e for e in spread.summary(rows) if (e["model"], e["steps"]) == ("LCM a", 4))
    assert entry["sets"] == 3
    np.testing.assert_allclose([entry["fd"][k] for k in ("mean", "sd", "min", "max")],
                               [60.0, np.std([50, 40, 90], ddof=1), 40.0, 90.0])


def test_aim_ratios_are_paired_by_set_and_met_in_the_aims_direction():
    rows = _world([50.0, 40.0, 90.0], [0.19, 0.30, 0.05])
    by_label = {a.label: a for a in spread.aims("LCM a")}
    fd4 = by_label["4 steps: FD at most 1x the teacher's 50 steps"]
    ratios = spread.aim_ratios(rows, fd4)
    np.testing.assert_allclose(ratios, [50 / 60, 40 / 50, 90 / 70])
    assert [fd4.met(r) for r in ratios] == [True, True, False]
    acc4 = by_label["4 steps: prompt accuracy at least 0.95x the teacher's 50 steps"]
    ratios = spread.aim_ratios(rows, acc4)
    np.testing.assert_allclose(ratios, [0.95, 1.2, 0.5])
    assert [acc4.met(r) for r in ratios] == [True, True, False]


def test_the_aims_are_the_issues_thirteen():
    aims = spread.aims("LCM a")
    halves = [a for a in aims if a.bound == 0.5]
    assert {(a.row[2], a.reference[:2]) for a in halves} == {
        (n, ("teacher", s)) for n in (1, 2, 4) for s in ("lcm", "ddim", "dpm")}
    assert {(a.row[2], a.bound) for a in aims if a.reference == spread.TEACHER and a.metric == "fd"} == {
        (1, 2.0), (2, 1.2), (4, 1.0)}
    assert len(aims) == 13 and all(a.row[0] == "LCM a" for a in aims)


def test_markdown_counts_the_sets_that_meet_each_aim():
    text = spread.markdown(_world([50.0, 40.0, 90.0], [0.2, 0.2, 0.2]), 40)
    matrix, by_set = [l for l in text.splitlines() if l.startswith("| 4 steps: FD at most 1x")]
    assert matrix == "| 4 steps: FD at most 1x the teacher's 50 steps | 2 of 3 (0.97x) |"
    assert by_set.endswith("| 0.833 / 0.800 / 1.286 | 2 of 3 |")
    assert "over 3 disjoint sets of 40 held-out prompts" in text
    assert text.count("| aim | ratio by set |") == 1  # one run: the teacher's rows are no run
    assert "| aim | LCM a |" in text


def test_one_prompt_set_is_refused_before_anything_is_loaded(tmp_path):
    with pytest.raises(SystemExit, match="--sets 1: a spread needs at least 2"):
        spread.main([str(tmp_path / "missing"), "--sets", "1", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_page_is_the_report_of_the_stored_rows_whose_set_0_is_the_methods_tables():
    """docs/shapes_spread.md is what the tool writes for docs/shapes_spread.jsonl (and README holds
    its aims by run); set 0's teacher rows are the methods table's to the last digit (same
    prompts, noise and code)."""
    import json

    from lcm_jax.worlds.shapes import methods

    with open(os.path.join(ROOT, "docs", "shapes_spread.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(ROOT, "docs", "shapes_spread.md")) as f:
        assert f.read() == spread.TITLE + spread.markdown(rows, 500)
    with open(os.path.join(ROOT, "README.md")) as f:
        assert spread.aims_markdown(rows) in f.read()
    baselines = ("teacher, 50 DDIM steps", "teacher, DDIM", "teacher, DPM-Solver++",
                 "not distilled (teacher under the LCM sampler)")
    stored = methods.read_rows(os.path.join(ROOT, "docs", "shapes_methods.jsonl"))
    table = {(r["sampler"], r["steps"]): r for r in stored if r.get("method") in baselines}
    set0 = [r for r in rows if r["set"] == 0 and r["model"] == "teacher"]
    assert len(set0) == len(table) == 10
    for r in set0:
        ref = table[(r["sampler"], r["steps"])]
        assert (r["fd"], r["prompt_accuracy"]) == (ref["fd"], ref["prompt_accuracy"]), r


def test_a_run_that_is_not_lcd_or_lcm_lora_is_refused_before_it_is_restored(tmp_path):
    from lcm_jax.training.checkpoints import write_run_config
    from lcm_jax.worlds.shapes.configs.shapes_teacher import get_config

    run = tmp_path / "teacher"
    run.mkdir()
    write_run_config(str(run), get_config(), (None, []))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit, match="method 'diffusion' does not sample with the LCM sampler"):
        spread.main([f"t={run}", "--sets", "2", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("labels", [("a", "a"), ("teacher", "b")])
def test_run_labels_that_would_merge_rows_are_refused(labels, tmp_path):
    args = [f"{x}={tmp_path / 'missing'}" for x in labels]
    with pytest.raises(SystemExit, match="give each run its own LABEL"):
        spread.main(args + ["--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []
