"""The steps-vs-quality report: markdown tables and plots of harness rows, and the endpoint error
a distillation run logs in metrics.jsonl."""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from lcm_jax.evaluation.harness import QualityRow


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_markdown(rows: Sequence[QualityRow]) -> str:
    lines = ["| model | sampler | steps | guidance | FD (lower is better) | prompt accuracy | seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.model} | {r.sampler.upper() if r.sampler != 'dpm' else 'DPM-Solver++'} | "
              f"{r.steps} | {r.guidance:g} | {r.fd:.2f} | {r.prompt_accuracy:.3f} | {r.seconds:.1f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def plot_table(rows: Sequence[QualityRow], path: str) -> None:
    """FD and prompt accuracy against steps, one line per (model, sampler); the teacher's
    many-step reference as a dashed horizontal line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ref = max((r for r in rows if r.model == "teacher"), key=lambda r: r.steps)
    groups: dict = {}
    for r in rows:
        if r is not ref:
            groups.setdefault(f"{r.model} {r.sampler}", []).append(r)
    for ax, field, label in ((axes[0], "fd", "FD (log scale)"), (axes[1], "prompt_accuracy",
                                                                   "prompt accuracy")):
        for name, g in groups.items():
            g = sorted(g, key=lambda r: r.steps)
            ax.plot([r.steps for r in g], [getattr(r, field) for r in g], "o-", label=name)
        ax.axhline(getattr(ref, field), ls="--", c="k", label=f"teacher {ref.sampler} {ref.steps} steps")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        if field == "fd":
            ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    _save(plt, fig, path)


def read_endpoint_errors(metrics_path: str) -> tuple[list[int], dict[int, list[float]]]:
    """The endpoint_mse/t* rows of a training run's metrics.jsonl: (steps, {t: errors})."""
    steps, errors = [], {}
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line) if line.strip() else {}
            found = {int(k.split("/t")[1]): v for k, v in row.items() if k.startswith("endpoint_mse/t")}
            if found:
                steps.append(int(row["step"]))
                for t, v in found.items():
                    errors.setdefault(t, []).append(float(v))
    if not steps:
        raise ValueError(f"{metrics_path} has no endpoint_mse/t* rows: train with "
                         "config.eval_every > 0 and config.eval_endpoint_timesteps set")
    return steps, dict(sorted(errors.items(), reverse=True))


def endpoint_markdown(steps: Sequence[int], errors: Mapping[int, Sequence[float]]) -> str:
    lines = ["| LCD step | " + " | ".join(f"from t={t}" for t in errors) + " |",
             "|---:|" + "---:|" * len(errors)]
    lines += [f"| {s} | " + " | ".join(f"{errors[t][i]:.4f}" for t in errors) + " |"
              for i, s in enumerate(steps)]
    return "\n".join(lines) + "\n"


def plot_endpoint_errors(steps: Sequence[int], errors: Mapping[int, Sequence[float]], path: str) -> None:
    """One-step MSE to the teacher's ODE endpoint against training step, one line per start t."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for t, v in errors.items():
        ax.plot(steps, v, "o-", label=f"from t={t}")
    ax.set_yscale("log")
    ax.set_xlabel("LCD step")
    ax.set_ylabel("one-step MSE to the teacher's ODE endpoint")
    ax.legend(fontsize=8)
    _save(plt, fig, path)
