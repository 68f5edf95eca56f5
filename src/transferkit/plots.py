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
    """Loss and accuracy per epoch, train and validation, with a line where fine-tuning started.

    A multi-label run's history has `val_map` (macro mAP) instead of `val_accuracy`; its second panel shows that
    alone, because its `train_accuracy` column means different things by trainer (mAP for the L-BFGS probe, exact
    match at 0.5 for a head trained by SGD) and would not compare with it.
    """
    figure = _figure(10, 3.8)
    epochs = [_number(row.get("epoch")) for row in history]
    started = fine_tuning_start(history)
    score = (("macro mAP", "Validation mAP", ("val_map",)) if any("val_map" in row for row in history)
             else ("accuracy", "Accuracy", ("train_accuracy", "val_accuracy")))
    for position, (quantity, title, columns) in enumerate((("loss", "Loss", ("train_loss", "val_loss")), score), 1):
        axes = figure.add_subplot(1, 2, position)
        for column in columns:
            training = column.startswith("train")
            values = [_number(row.get(column)) for row in history]
            if any(not math.isnan(v) for v in values):
                axes.plot(epochs, values, "-" if training else "--", marker="." if len(epochs) < 40 else None,
                          color="C0" if training else "C1", label="training" if training else "validation")
        if started is not None:
            axes.axvline(started - 0.5, color="tab:gray", linestyle=":", label="fine-tuning starts")
        axes.set(xlabel="epoch", ylabel=quantity, title=title)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return _save(figure, path)


GRID_GAP, GRID_CAPTION = 6, 36
"""An image grid's pixels between tiles, and the height of the caption band above each picture (two lines)."""
CAPTION_LINE = 17
"""Pixels from one caption line to the next (13 px type)."""
WORD_GAP = "  "
"""What separates the words of a caption in several colours."""


def plot_image_grid(images: list[np.ndarray], titles: list[str], path: Path, colors: list[str] | None = None,
                    columns: int = 4, tile: int = 200) -> Path:
    """uint8 HWC images in a grid, each under its (coloured) title of up to two lines."""

    def caption(draw, font, index: int, left: int, top: int) -> None:
        lines = [_fit(line, draw, font, tile) for line in titles[index].split("\n")[:2]]
        draw.multiline_text((left + tile // 2, top + GRID_CAPTION // 2), "\n".join(lines), anchor="mm",
                            align="center", font=font, fill=(colors[index] if colors else "black"))

    return _image_grid(images[:len(titles)], caption, path, columns, tile)


def plot_label_grid(images: list[np.ndarray], captions: list[list[tuple[str, str]]], path: Path, columns: int = 4,
                    tile: int = 200) -> Path:
    """uint8 HWC images in a grid, each under a caption of words in their own colours (an image's labels, coloured
    by whether they are right), wrapped onto up to two lines."""

    def caption(draw, font, index: int, left: int, top: int) -> None:
        lines = _wrap(captions[index], draw, font, tile)
        for number, line in enumerate(lines):
            x = left + (tile - _words_width(line, draw, font)) / 2
            y = top + GRID_CAPTION / 2 + (number - (len(lines) - 1) / 2) * CAPTION_LINE
            for word, colour in line:
                draw.text((x, y), word, anchor="lm", font=font, fill=colour)
                x += draw.textlength(word + WORD_GAP, font=font)

    return _image_grid(images[:len(captions)], caption, path, columns, tile)


def _words_width(words: list[tuple[str, str]], draw, font) -> float:
    return draw.textlength(WORD_GAP.join(word for word, _ in words), font=font)


def _wrap(words: list[tuple[str, str]], draw, font, width: int) -> list[list[tuple[str, str]]]:
    """Coloured words on up to two lines of `width` pixels; the first word that does not fit on the second line is
    cut with an ellipsis, which stands for it and the words after it."""
    lines: list[list[tuple[str, str]]] = [[]]
    for word, colour in words:
        line = lines[-1]
        if line and _words_width(line + [(word, colour)], draw, font) > width:
            if len(lines) == 2:
                room = width - _words_width(line + [("", colour)], draw, font)
                line.append((_fit(word, draw, font, int(room)), colour))
                break
            lines.append([])
            line = lines[-1]
        line.append((_fit(word, draw, font, width), colour))
    return lines


def _image_grid(images: list[np.ndarray], caption, path: Path, columns: int, tile: int) -> Path:
    """The pictures in a grid of `tile`-pixel squares, `caption(draw, font, index, left, top)` drawing each one's
    caption band.

    Drawn with Pillow rather than matplotlib: 16 photos take ~0.1 s instead of ~1 s, which a report written at the
    end of every training run notices.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    rows = max(1, math.ceil(len(images) / columns))
    canvas = Image.new("RGB", (columns * (tile + GRID_GAP) + GRID_GAP,
                               rows * (tile + GRID_CAPTION + GRID_GAP) + GRID_GAP), "white")
    draw = ImageDraw.Draw(canvas)
    for index, pixels in enumerate(images):
        row, column = divmod(index, columns)
        left, top = GRID_GAP + column * (tile + GRID_GAP), GRID_GAP + row * (tile + GRID_CAPTION + GRID_GAP)
        picture = Image.fromarray(pixels)
        picture.thumbnail((tile, tile), Image.Resampling.LANCZOS)
        canvas.paste(picture, (left + (tile - picture.width) // 2,
                               top + GRID_CAPTION + (tile - picture.height) // 2))
        caption(draw, font, index, left, top)
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
    return _class_heatmap(matrix, names, "share of the true class", 1.0, "{:.2f}", path, xlabel="predicted",
                          ylabel="true", title=f"Confusion matrix, normalised by true class{note}")


def _class_heatmap(matrix: np.ndarray, names: list[str], legend: str, vmax: float | None, form: str, path: Path,
                   **labels: str) -> Path:
    """A class-by-class matrix as a blue heatmap with the names on both axes, each cell's value written on it (12
    classes or fewer); `labels` are the axes' title and axis labels."""
    side = min(max(4.5, 0.32 * len(names) + 2.5), 13)
    figure = _figure(side + 1, side)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax)
    figure.colorbar(image, ax=axes, fraction=0.046, label=legend)
    _class_ticks(axes, names)
    if len(names) <= 12:
        _write_cells(axes, matrix, form, (matrix.max() if vmax is None else vmax) / 2)
    axes.set(**labels)
    return _save(figure, path)


def _class_ticks(axes, names: list[str]) -> None:
    """Class names along both axes of a class-by-class matrix."""
    font = 9 if len(names) <= 15 else 7
    axes.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=font)
    axes.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=font)


def _write_cells(axes, matrix: np.ndarray, form: str, dark_above: float) -> None:
    """Each cell's value written on it, white on the cells darker than `dark_above`."""
    for (i, j), value in np.ndenumerate(matrix):
        axes.text(j, i, form.format(value), ha="center", va="center", fontsize=8,
                  color="white" if value > dark_above else "black")


def cooccurrence_view(counts: np.ndarray, classes: list[str], limit: int = 30) -> tuple[np.ndarray, list[str], str]:
    """The label co-occurrence counts to draw and their class names: all classes up to `limit`, else the `limit`
    most frequent labels."""
    counts = np.asarray(counts)
    order = np.arange(len(classes))
    note = ""
    if len(classes) > limit:
        order = np.argsort(-np.diag(counts), kind="stable")[:limit]
        note = f" ({limit} of {len(classes)} labels: the most frequent)"
    return counts[np.ix_(order, order)], [classes[i] for i in order], note


def plot_cooccurrence(counts: np.ndarray, classes: list[str], path: Path) -> Path:
    """How many images carry each pair of labels (the diagonal: each label's images)."""
    matrix, names, note = cooccurrence_view(counts, classes)
    return _class_heatmap(matrix, names, "images", None, "{:d}", path, title=f"Images with both labels{note}")


PR_CLASSES = 24
"""At most this many classes get a precision-recall panel (those with most positives)."""


def precision_recall_points(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) when everything down to each distinct score is called positive, highest score first,
    from (0, 1); empty without positives. The area under their steps is `multilabel.average_precision`."""
    truth, scores = np.asarray(truth, dtype=bool).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    positives = truth.sum()
    if positives == 0:
        return np.empty(0), np.empty(0)
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    true_positives = np.cumsum(truth[order])[last_of_tie]
    return np.r_[0.0, true_positives / positives], np.r_[1.0, true_positives / (last_of_tie + 1)]


def plot_precision_recall(targets: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray,
                          classes: list[str], path: Path) -> Path:
    """A precision-recall curve per class (small multiples) with its AP, a dot where the class's threshold operates
    and a dotted line at chance (the class's share of the images)."""
    from transferkit.multilabel import average_precision, decide

    truth, predicted = np.asarray(targets) > 0, decide(probabilities, thresholds)
    shown = np.arange(len(classes))
    note = ""
    if len(classes) > PR_CLASSES:
        shown = np.sort(np.argsort(-truth.sum(0), kind="stable")[:PR_CLASSES])
        note = f" ({PR_CLASSES} of {len(classes)} classes: those with most positives)"
    columns = min(len(shown), 4)
    rows = math.ceil(len(shown) / columns)
    figure = _figure(2.9 * columns + 0.3, 2.6 * rows + 0.5)
    for position, k in enumerate(shown):
        axes = figure.add_subplot(rows, columns, position + 1)
        recall, precision = precision_recall_points(truth[:, k], probabilities[:, k])
        ap = average_precision(truth[:, k], probabilities[:, k])
        if len(recall):
            axes.plot(recall, precision, drawstyle="steps-pre", color="tab:blue")
            axes.axhline(truth[:, k].mean(), color="tab:gray", linestyle=":", linewidth=1)
            hits = float((predicted[:, k] & truth[:, k]).sum())
            axes.plot([hits / truth[:, k].sum()], [hits / max(predicted[:, k].sum(), 1)], "o", color="tab:red",
                      label=f"threshold {thresholds[k]:.2f}")
            axes.legend(loc="lower left", fontsize=7)
        else:
            axes.text(0.5, 0.5, "no positives here", ha="center", va="center", transform=axes.transAxes,
                      color="tab:gray")
        axes.set_title(f"{_short(classes[k])}: AP {'–' if ap is None else f'{ap:.3f}'} (n={int(truth[:, k].sum())})",
                       fontsize=9)
        axes.set(xlim=(0, 1.02), ylim=(0, 1.05))
        axes.tick_params(labelsize=7)
        if position + columns >= len(shown):  # no panel below
            axes.set_xlabel("recall", fontsize=8)
        if position % columns == 0:
            axes.set_ylabel("precision", fontsize=8)
        axes.grid(alpha=0.3)
    figure.suptitle(f"Precision-recall per class{note}; red dot: the class's threshold, dotted: chance", fontsize=10)
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
