"""What a run shows while it trains: TensorBoard scalars and plot.png of losses, balancer factors and recall."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def tensorboard(path: Path) -> Any:
    """A TensorBoard SummaryWriter at `path`, or None when tensorboard is not installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: steps.jsonl and plot.png still hold everything
        return None
    return SummaryWriter(str(path))


def plot_run(out: Path) -> Path | None:
    """plot.png: raw losses, balancer factors and weights (per step) and val RSUM (per epoch) of a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line] \
        if (out / "metrics.jsonl").exists() else []
    if not steps:
        return None
    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    x = [s["step"] for s in steps]
    for n in steps[-1]["loss"]:
        ax[0].plot(x, _smooth([s["loss"][n] for s in steps]), label=n)
        ax[1].plot(x, [s["factor"][n] for s in steps], label=n)
        ax[2].plot(x, [s.get("weight", {}).get(n, float("nan")) for s in steps], label=n)
    ax[0].set(title="raw losses (smoothed)", xlabel="step", yscale="log")
    ax[1].set(title="balancer factor w·s per loss", xlabel="step", yscale="log")
    ax[2].set(title="balancer weight w (softmax of the loss rates)", xlabel="step")
    ax[3].plot([e["epoch"] for e in evals], [e["rsum"] for e in evals], marker="o")
    ax[3].set(title="val RSUM", xlabel="epoch")
    for a in ax[:3]:
        a.legend()
    fig.tight_layout()
    path = out / "plot.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _smooth(v: list[float], beta: float = 0.9) -> list[float]:
    out, m = [], v[0]
    for x in v:
        m = beta * m + (1 - beta) * x
        out.append(m)
    return out

