"""Pictures of a run (matplotlib, Agg backend: nothing needs a display or a network)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

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
    return _save(figure, path)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def fine_tuning_start(history: list[dict]) -> int | None:
    """The first epoch of the fine-tuning stage, if the run had one."""
    return next((int(_number(row["epoch"])) for row in history if row.get("stage") == "finetune"), None)


def plot_learning_curves(history: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, train and validation, with a line where fine-tuning started."""
    figure = _figure(10, 3.8)
    epochs = [_number(row.get("epoch")) for row in history]
    started = fine_tuning_start(history)
    for position, quantity in enumerate(("loss", "accuracy"), 1):
        axes = figure.add_subplot(1, 2, position)
        for split, style in (("train", "-"), ("val", "--")):
            values = [_number(row.get(f"{split}_{quantity}")) for row in history]
            if any(not math.isnan(v) for v in values):
                axes.plot(epochs, values, style, marker="." if len(epochs) < 40 else None,
                          label="training" if split == "train" else "validation")
        if started is not None:
            axes.axvline(started - 0.5, color="tab:gray", linestyle=":", label="fine-tuning starts")
        axes.set(xlabel="epoch", ylabel=quantity, title=quantity.capitalize())
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return _save(figure, path)


def plot_image_grid(images: list[np.ndarray], titles: list[str], path: Path, colors: list[str] | None = None,
                    columns: int = 4, tile: int = 200) -> Path:
    """uint8 HWC images in a grid, each under its (coloured) title of up to two lines.

    Drawn with Pillow rather than matplotlib: 16 photos take ~0.1 s instead of ~1 s, which a report written at the
    end of every training run notices.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    caption, gap = 36, 6
    rows = max(1, math.ceil(len(images) / columns))
    canvas = Image.new("RGB", (columns * (tile + gap) + gap, rows * (tile + caption + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (pixels, title) in enumerate(zip(images, titles)):
        row, column = divmod(index, columns)
        left, top = gap + column * (tile + gap), gap + row * (tile + caption + gap)
        picture = Image.fromarray(pixels)
        picture.thumbnail((tile, tile), Image.Resampling.LANCZOS)
        canvas.paste(picture, (left + (tile - picture.width) // 2, top + caption + (tile - picture.height) // 2))
        lines = [_fit(line, draw, font, tile) for line in title.split("\n")[:2]]
        draw.multiline_text((left + tile // 2, top + caption // 2), "\n".join(lines), anchor="mm", align="center",
                            font=font, fill=(colors[index] if colors else "black"))
    # Photos barely compress further at higher levels; level 1 encodes several times faster.
    write_atomically(path, lambda temporary: canvas.save(temporary, format="PNG", compress_level=1))
    return path


def _fit(text: str, draw, font, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def confusion_view(confusion: np.ndarray, classes: list[str], limit: int = 30) -> tuple[np.ndarray, list[str], str]:
    """The row-normalised matrix to draw and its class names: all classes up to `limit`, else the `limit` classes
    involved in most mistakes, ordered by how many."""
    confusion = np.asarray(confusion, dtype=np.float64)
    order = np.arange(len(classes))
    note = ""
    if len(classes) > limit:
        mistakes = confusion.sum(0) + confusion.sum(1) - 2 * np.diag(confusion)
        order = np.argsort(-mistakes, kind="stable")[:limit]
        note = f" ({limit} of {len(classes)} classes: those in most mistakes)"
    support = confusion.sum(1, keepdims=True)
    normalised = np.divide(confusion, support, out=np.zeros_like(confusion), where=support > 0)
    return normalised[np.ix_(order, order)], [classes[i] for i in order], note


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> Path:
    matrix, names, note = confusion_view(confusion, classes)
    side = min(max(4.5, 0.32 * len(names) + 2.5), 13)
    figure = _figure(side + 1, side)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    font = 9 if len(names) <= 15 else 7
    axes.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=font)
    axes.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=font)
    if len(names) <= 12:
        for (i, j), value in np.ndenumerate(matrix):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="white" if value > 0.5 else "black")
    axes.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix, normalised by true class{note}")
    return _save(figure, path)


def plot_group_accuracy(groups: dict[str, dict], path: Path) -> Path:
    names = list(groups)
    values = [groups[name]["accuracy"] or 0.0 for name in names]
    figure = _figure(7, min(max(2.2, 0.35 * len(names) + 1.2), 14))
    axes = figure.add_subplot()
    bars = axes.barh(range(len(names)), values, color="tab:blue")
    axes.set_yticks(range(len(names)), [f"{_short(n)} (n={groups[n]['n']})" for n in names], fontsize=8)
    axes.bar_label(bars, [f"{v:.3f}" for v in values], fontsize=8, padding=2)
    axes.set(xlim=(0, 1.1), xlabel="accuracy", title="Accuracy per group of classes")
    axes.invert_yaxis()
    return _save(figure, path)


def plot_reliability(raw_confidence: np.ndarray, confidence: np.ndarray, correct: np.ndarray, path: Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin of the top probability, for the model's own and the
    calibrated probabilities; a calibrated model follows the diagonal."""
    from transferkit.calibration import ECE_BINS, binned_error, reliability

    figure = _figure(6.4, 4.6)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="tab:gray", linestyle=":", label="perfect calibration")
    for values, name, style in ((raw_confidence, "the model's own", "o--"), (confidence, "calibrated", "s-")):
        table = reliability(values, correct, ECE_BINS)
        used = table["count"] > 0
        axes.plot(table["confidence"][used], table["accuracy"][used], style,
                  label=f"{name} (ECE {binned_error(table):.3f})")
    axes.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="confidence (top probability, mean per bin)",
             ylabel="accuracy in the bin", title="Reliability: is the confidence what it claims?")
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def coverage_curve(ranking: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share answered, accuracy on the answered) when images are answered in `ranking`'s order, most trusted
    first."""
    ordered = np.asarray(correct, dtype=np.float64)[ranking]
    answered = np.arange(1, len(ordered) + 1)
    return answered / len(ordered), np.cumsum(ordered) / answered


def plot_risk_coverage(correct: np.ndarray, ood_score: np.ndarray, confidence: np.ndarray, threshold: float | None,
                       path: Path) -> Path:
    """Accuracy against the share of images answered, abstaining on the most unfamiliar images first (the unknown
    score) or on the least confident (top probability); a dot marks the run's threshold."""
    figure = _figure(6.4, 4.4)
    axes = figure.add_subplot()
    for ranking, name, style in ((np.argsort(ood_score, kind="stable"), "unknown score", "-"),
                                 (np.argsort(-confidence, kind="stable"), "top probability", "--")):
        coverage, accuracy = coverage_curve(ranking, correct)
        axes.plot(coverage, accuracy, style, label=f"abstain by {name}")
    if threshold is not None:
        known = ood_score <= threshold
        if known.any():
            axes.plot([known.mean()], [np.mean(np.asarray(correct)[known])], "o", color="tab:red",
                      label=f"the run's threshold ({known.mean():.0%} answered)")
    axes.axhline(np.mean(correct), color="tab:gray", linestyle=":", label=f"answer all ({np.mean(correct):.3f})")
    axes.set(xlim=(0, 1.02), xlabel="share of images answered (coverage)", ylabel="accuracy on the answered",
             title="Risk-coverage: what abstaining buys")
    axes.legend(loc="lower left")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"


def _save(figure, path: Path) -> Path:
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
    return path
