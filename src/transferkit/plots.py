"""Pictures of a run (matplotlib, Agg backend: nothing needs a display or a network)."""

from __future__ import annotations

from pathlib import Path

from transferkit.optim import LRFinding
from transferkit.runs import write_atomically


def _figure(width: float = 6.4, height: float = 4.2):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_lr_finding(finding: LRFinding, path: Path) -> Path:
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot(finding.lrs, finding.losses, color="tab:blue")
    axes.axvline(finding.suggestion, color="tab:red", linestyle="--", label=f"suggested lr {finding.suggestion:.2g}")
    axes.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)",
             title="Learning-rate range test")
    axes.legend()
    axes.grid(alpha=0.3)
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
    return path
