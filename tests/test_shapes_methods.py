"""The methods table's plumbing (lcm_jax/worlds/shapes/methods.py): each method is the demo's config
with only its own overrides, sampled with its own sampler, and the report's ratios are taken
against the teacher's 50 steps. The table itself is a long CPU job (README, Status)."""
import numpy as np
import pytest

from lcm_jax.config_checks import check_config
from lcm_jax.worlds.shapes import methods
from lcm_jax.worlds.shapes import world as shapes
from lcm_jax.worlds.shapes.configs import shapes_lcd


def _flat(config) -> dict:
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if hasattr(value, "items"):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value
    walk(config, "")
    return out


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_each_method_is_the_demo_config_with_its_overrides(name, tmp_path):
    overrides = dict(methods.METHODS[name][1])
    start = overrides.get("model.student_init")
    if start:  # the method a student starts from is a run in the same workdir
        assert start in methods.METHODS and methods.with_starts([name]) == [start, name]
        overrides["model.student_init"] = str(tmp_path / start)
        (tmp_path / start).mkdir()
        (tmp_path / start / "config.json").write_text("{}")
    config = methods.method_config(name, 300, "", str(tmp_path))
    check_config(config, 1, 1)   # every method's config passes the trainer's checks
    base = _flat(shapes_lcd.get_config("lora" if overrides.get("method") == "lcm_lora" else None))
    expected = {**base, **methods.TABLE_BASE, **overrides, "total_steps": 300, "sample_every": 0,
                "checkpoint_every": min(base["checkpoint_every"], 300),
                "eval_ema_decay": methods.EVAL_EMA}
    assert _flat(config) == expected
    assert config.data.understated == shapes.UNDERSTATED


def test_the_method_labelled_the_demos_recipe_trains_as_the_demo():
    """The row the table calls the demo's recipe differs from configs/shapes_lcd.py only in what
    the table sets for every method: its length, checkpoints, samples and evaluation."""
    (name,) = [n for n, (label, _) in methods.METHODS.items() if "the demo's recipe" in label]
    config = _flat(methods.method_config(name, 300, ""))
    demo = _flat(shapes_lcd.get_config())
    table_only = {"total_steps", "sample_every", "checkpoint_every", "eval_ema_decay",
                  "eval_endpoint_timesteps", "data.cache_dir"}
    differ = {k for k in config.keys() | demo.keys() if config.get(k) != demo.get(k)}
    assert differ <= table_only, sorted(differ - table_only)
    assert config["loss.num_ddim_timesteps"] == 10 and config["loss.ema_decay"] == 0.99


def test_another_teacher_is_every_methods_teacher(tmp_path):
    """--teacher: the methods train from that folder; one that is no pipeline is refused by name,
    before the workdir gets anything."""
    other = tmp_path / "other"   # method_config reads no weights: a pipeline's index is enough
    other.mkdir()
    (other / "model_index.json").write_text("{}")
    for name in ("lcd", "lora"):
        assert methods.method_config(name, 10, "", teacher=str(other)).model.teacher == str(other)
    with pytest.raises(SystemExit, match=f"no teacher pipeline at {tmp_path}"):
        methods.main(["--workdir", str(tmp_path / "w"), "--teacher", str(tmp_path), "--methods", ""])
    assert not (tmp_path / "w").exists()


def test_samplers_follow_the_method():
    lcd = methods.sampler_runs(methods.method_config("lcd", 10, ""))
    assert [(s, n) for s, n, _ in lcd] == [("lcm", n) for n in methods.SAMPLE_STEPS]
    tcd = methods.sampler_runs(methods.method_config("tcd", 10, ""))
    assert {s for s, _, _ in tcd} == {"tcd"} and all(e["gamma"] == 0.3 for _, _, e in tcd)
    (pcm,) = methods.sampler_runs(methods.method_config("pcm", 10, ""))
    assert pcm[0] == "tcd" and pcm[1] == 4 and pcm[2]["gamma"] == 0.0
    assert pcm[2]["timesteps"] == [999, 739, 499, 239]   # the phases' upper edges on the N = 50 grid


def test_diversity_prompts_leave_something_out():
    prompts = methods.diversity_prompts(5, per_prompt=3)
    assert len(prompts) == 15 and len(set(prompts)) == 5 and prompts[:3] == [prompts[0]] * 3
    for p in prompts:
        values = np.concatenate([np.ravel(v) for v in shapes.parse_caption(p).values()])
        assert shapes.UNSTATED in values, p


def test_report_ratios_are_against_the_teachers_fifty_steps(tmp_path):
    rows = [{"method": "teacher, 50 DDIM steps", "sampler": "ddim", "steps": 50, "fd": 20.0,
             "prompt_accuracy": 0.4, "diversity": 0.9},
            {"method": "LCD", "weights": "target", "sampler": "lcm", "steps": 1, "fd": 50.0,
             "prompt_accuracy": 0.2, "diversity": 0.5},
            {"method": "ideal LCM", "sampler": "lcm", "steps": 1, "fd": 30.0, "prompt_accuracy": 0.3}]
    text = methods.markdown(rows, 10, 100)
    assert "| LCD | target | lcm | 1 | 50.00 | 2.50 | 0.200 | 0.50 | 0.50 |" in text
    assert "| ideal LCM | | lcm | 1 | 30.00 | 1.50 | 0.300 | 0.75 | |" in text
    compact = methods.compact_markdown(rows + [dict(rows[1], steps=4, fd=25.0)])
    assert "| LCD | target | 50.0 / 25.0 | 0.200 / 0.200 | 0.50 / 0.50 |" in compact
    assert "| ideal LCM |  | 30.0 / - | 0.300 / - | - / - |" in compact
    methods.plot(rows, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="unknown"):
        methods.main(["--methods", "lcd,nope", "--workdir", str(tmp_path)])


def test_aims_are_each_methods_target_against_the_baselines_of_its_own_table():
    """Each aim's cell is the ratio of the method's target-network row to the baseline row the aim
    names; the ideal LCM and the eval EMA never stand in for them; a missing step count is '-'."""
    base = [{"method": "teacher, 50 DDIM steps", "sampler": "ddim", "steps": 50, "fd": 60.0,
             "prompt_accuracy": 0.2}]
    for sampler, fd in (("ddim", 1000.0), ("dpm", 400.0), ("lcm", 100.0)):
        base += [{"method": f"baseline {sampler}", "sampler": sampler, "steps": n, "fd": fd / n,
                  "prompt_accuracy": 0.1} for n in methods.SAMPLE_STEPS]
    base += [{"method": methods.IDEAL, "sampler": "lcm", "steps": n, "fd": 1.0, "prompt_accuracy": 1.0}
             for n in methods.SAMPLE_STEPS]
    lcd = [{"method": "LCD", "name": "lcd", "weights": w, "sampler": "lcm", "steps": n,
            "fd": (45.0 if w == "target" else 1.0) / n, "prompt_accuracy": 0.196}
           for w in ("target", "eval EMA") for n in methods.SAMPLE_STEPS]
    pcm = [{"method": "PCM", "name": "pcm", "weights": "target", "sampler": "tcd", "steps": 4,
            "fd": 12.0, "prompt_accuracy": 0.1}]
    lines = methods.aims_markdown(base + lcd + pcm).splitlines()
    assert lines[0] == "| aim | lcd | pcm |" and len(lines) == 2 + 13
    cells = {parts[0]: parts[1:] for parts in (line.strip("| ").split(" | ") for line in lines[2:])}
    # 45 / 100 = 0.45 of the undistilled student at 1 step (met); PCM has no 1-step row
    assert cells["1 step: FD at most 0.5x the undistilled student"] == ["**0.450x**", "-"]
    # 45/4 / 60 = 0.1875 of the teacher's 50 steps; PCM's 12 / 60 = 0.2
    assert cells["4 steps: FD at most 1x the teacher's 50 steps"] == ["**0.188x**", "**0.200x**"]
    # 12 / (100/4) = 0.48 of the undistilled student at 4 steps, by PCM's own sampler
    assert cells["4 steps: FD at most 0.5x the undistilled student"][1] == "**0.480x**"
    # accuracy 0.196 / 0.2 = 0.98: met; PCM's 0.5 is not
    assert cells["4 steps: prompt accuracy at least 0.95x the teacher's 50 steps"] == ["**0.980x**", "0.500x"]
    assert cells["1 step: FD at most 2x the teacher's 50 steps"] == ["**0.750x**", "-"]


@pytest.mark.parametrize("stem,steps,aims", [("shapes_methods", 600, False), ("shapes_methods_3000", 3000, True),
                                             ("shapes_methods_long", 10000, False),
                                             ("shapes_methods_s0125", 1200, True)])
def test_docs_and_readme_tables_are_the_stored_rows(stem, steps, aims):
    """docs/<stem>.md and README's table are what the report makes of docs/<stem>.jsonl (the
    600-step table, every method at 3000 steps with its aims, the long run, and the scale-0.125
    teacher's table with its aims)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = methods.read_rows(os.path.join(root, "docs", f"{stem}.jsonl"))
    assert any(r["steps"] == 50 for r in rows) and {r["name"] for r in rows if "name" in r} <= set(methods.METHODS)
    with open(os.path.join(root, "docs", f"{stem}.md")) as f:
        assert f.read() == methods.report(rows, 500, steps)
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    assert methods.compact_markdown(rows) in readme
    assert not aims or methods.aims_markdown(rows) in readme


def test_a_stopped_method_is_not_scored(tmp_path, monkeypatch):
    """A method whose training stops early (SIGTERM saves and returns) adds no rows: the table
    must not hold a half-trained row under the full budget's name."""
    from types import SimpleNamespace

    from lcm_jax import train

    monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir: SimpleNamespace(step=7))
    with pytest.raises(SystemExit, match="lcd: training stopped at step 7 of 300; nothing is scored"):
        methods.method_rows("lcd", str(tmp_path), 300, "", None, [], [])
