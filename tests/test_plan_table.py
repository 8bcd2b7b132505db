"""tools/plan_table.py: a row's settings, and the README's planning table as the tool prints it
from docs/plan_table.jsonl (the compiles themselves take minutes each; tests/test_plan.py compiles)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import plan_table  # noqa: E402


def test_row_settings_replace_and_add():
    config, settings, batch = plan_table.row_settings("sd15:lcd:v5e-16")
    assert config == "configs/sd15_lcd.py" and batch == 4 * 16
    assert settings == ["mesh.data=1", "mesh.fsdp=16", "model.remat=True", "model.teacher_dtype=bfloat16"]
    _, settings, batch = plan_table.row_settings("sdxl:lcm_lora:v5e-16:mesh.data=4,mesh.fsdp=4,model.remat=False")
    assert batch == 16
    assert settings == ["mesh.data=4", "mesh.fsdp=4", "model.remat=False"]


def test_settings_column_names_what_differs_from_the_defaults():
    row = {"row": "sd15:lcd:v5e-16", "settings": plan_table.row_settings("sd15:lcd:v5e-16")[1],
           "opt_level": "O0", "devices": 16, "per_device_batch": 4, "state_bytes": {"params": 2 ** 30},
           "frozen_bytes": {"teacher": 2 ** 29}, "temp_bytes": 2 ** 31, "total_bytes": 7 * 2 ** 29,
           "hbm_bytes": 16 * 2 ** 30, "fits": True, "refused": "", "flops": 2e13, "step_time_s": 0.2,
           "peak_flops": 2e14}
    line = plan_table.markdown([row]).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:5] == ["sd15", "lcd", "v5e-16 (16)",
                         "mesh.fsdp=16, model.remat=True, model.teacher_dtype=bfloat16, XLA O0", "4"]
    assert cells[5:] == ["1.0", "0.5", "2.0", "3.5 / 16.0", "yes", "20.00", "200 ms", "50%"]


def test_readme_table_is_the_tools_output_of_the_stored_rows():
    path = os.path.join(ROOT, "docs", "plan_table.jsonl")
    rows = {r["row"] for r in plan_table._read(path)}
    assert set(plan_table.ALL_ROWS) <= rows, sorted(set(plan_table.ALL_ROWS) - rows)
    table = plan_table.stored_table(path)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert table in readme
