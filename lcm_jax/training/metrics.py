"""What a run reports: metrics.jsonl and TensorBoard (process 0), and the progress line with
steps/s and ETA that every trainer of the project prints."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax

from lcm_jax import fs


def _rows_kept(text: str, start_step: int) -> list[str]:
    """The lines of an earlier metrics.jsonl a run starting at `start_step` keeps: those up to the
    restored step (logged before its checkpoint was saved); none for a fresh start, which logs
    everything again from the step-0 baseline. A line cut short by a kill is dropped."""
    keep = []
    for line in text.splitlines():
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if 0 < start_step and step <= start_step:
            keep.append(line)
    return keep


class MetricsWriter:
    """metrics.jsonl + TensorBoard (process 0 only). Resuming drops lines past the restored step
    (`_rows_kept`).

    A remote workdir (gs://) is written through a local folder published after every write: an
    object cannot be appended to, so each write replaces metrics.jsonl and the events file whole,
    one atomic upload each (a kill leaves the previous complete versions; tensorboardX cannot
    write gs:// through gcsfs)."""

    def __init__(self, workdir: str, start_step: int, enabled: bool = True):
        self.enabled, self.workdir = enabled, workdir
        self.tb = None
        if not enabled:
            return
        self.local = tempfile.mkdtemp(prefix="lcm_jax_metrics_") if fs.is_remote(workdir) else workdir
        self.path = os.path.join(self.local, "metrics.jsonl")
        run_path = fs.join(workdir, "metrics.jsonl")
        if fs.exists(run_path):
            with fs.open(run_path) as f:
                keep = _rows_kept(f.read(), start_step)
            fs.write_text_atomic(self.path, "".join(line + "\n" for line in keep))
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"))
        except ImportError:
            self.tb = None
        self._publish()

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        self._publish()

    def _publish(self) -> None:
        if self.local != self.workdir:
            fs.publish_dir(self.local, self.workdir)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        self._publish()
        if self.local != self.workdir:
            shutil.rmtree(self.local, ignore_errors=True)


def main_process_print(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def endpoint_text(row: dict) -> str:
    """' endpoint_mse t999 0.3095 t759 0.0503' from a metrics row ('' when it has none)."""
    ends = [f"{k.split('/')[1]} {v:.4f}" for k, v in row.items() if k.startswith("endpoint_mse/")]
    return f" endpoint_mse {' '.join(ends)}" if ends else ""


def eta(step: int, total: int, steps_per_s: float) -> str:
    """'h:mm:ss' left at this rate."""
    m, sec = divmod(int((total - step) / max(steps_per_s, 1e-9)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}"


FIRST = ("loss", "eval_loss")  # the progress line's leading fields; the rest follow by name


def progress_line(step: int, total: int, row: dict, prefix: str = "step") -> str:
    """'step 10/50 loss 0.01234 eval_loss ... grad_norm 0.123 lr 1.00e-04 4.10 steps/s 33.0 ex/s
    ETA 0:00:09': every number of the row (endpoint errors grouped), then rate and time left."""
    rate = {"steps_per_s", "examples_per_s"}
    keys = sorted((k for k in row if k not in rate and not k.startswith("endpoint_mse/")),
                  key=lambda k: (FIRST.index(k) if k in FIRST else len(FIRST), k))
    fields = [f"{k} {_number(k, row[k])}" for k in keys]
    text = f"{prefix} {step}/{total} " + " ".join(fields) + endpoint_text(row)
    text += f" {row['steps_per_s']:.2f} steps/s"
    if "examples_per_s" in row:
        text += f" {row['examples_per_s']:.1f} ex/s"
    return text + f" ETA {eta(step, total, row['steps_per_s'])}"


def _number(key: str, value: float) -> str:
    if key == "lr":
        return f"{value:.2e}"
    if key in ("grad_norm", "kl"):
        return f"{value:.3f}"
    return f"{value:.5f}"
