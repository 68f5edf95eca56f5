"""`report()`: one self-contained HTML page, and its PNGs, showing what a run learned."""

from __future__ import annotations

import base64
import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.data import DEFAULT_MAX_IMAGE_PIXELS, load_dataset, make_preparer
from transferkit.errors import DataError, RunError, TransferkitError
from transferkit.evaluate import (PREDICTIONS_FILE, LabelSetPredictions, Predictions, evaluate, group_accuracy,
                                  read_groups, read_predictions)
from transferkit.multilabel import label_matrix, stored_thresholds
from transferkit.pages import render_template
from transferkit.runs import label_options, load_run_dataset, read_metrics, read_run_config, write_atomically

log = logging.getLogger("transferkit")

GRID_IMAGES = 16
TOP_LOSSES = 8
CONFUSED_PAIRS = 15
SKIPPED_SHOWN = 50
RIGHT, WRONG, MISSED = "#1a7f37", "#cf222e", "#6e7781"
VERDICT_COLOURS = {"right": RIGHT, "wrong": WRONG, "missed": MISSED}
"""A multi-label image's labels: predicted and true, predicted but not true, true but not predicted."""
HEADLINE = (("map_macro", "macro mAP"), ("map_micro", "micro mAP"), ("exact_match", "exact match"),
            ("hamming_loss", "Hamming loss (lower is better)"), ("f1_micro", "micro F1"))
"""A multi-label report's key numbers (multilabel_metrics keys) and their names on the page."""


@dataclass
class Figure:
    title: str
    file: str
    data_uri: str


@dataclass
class _Evaluation:
    split: str | None
    metrics: dict | None
    predictions: Predictions | LabelSetPredictions | None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _read_history(run: Path) -> list[dict]:
    path = run / "history.csv"
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _read_skipped(run: Path) -> list[tuple[str, str]]:
    path = run / "skipped.txt"
    if not path.is_file():
        return []
    return [tuple(line.split("\t", 1)) for line in path.read_text(encoding="utf-8").splitlines() if "\t" in line]


def _run_evaluation(run: Path, classes: list[str], groups: dict | None, split: str = "auto",
                    thresholds: np.ndarray | None = None) -> _Evaluation:
    """The run's own `split` (auto: test, else validation), as `train` measured it; `thresholds`: a multi-label
    run's (its predictions are then label sets, and groups of classes are not measured)."""
    all_metrics = read_metrics(run)
    if split == "auto":
        split = next((name for name in ("test", "val") if name in all_metrics), None)
    elif split not in all_metrics:
        measured = " and ".join(name for name in ("val", "test") if name in all_metrics) or "none"
        raise DataError(f"without data, a report shows what training measured (this run: {measured}), not the "
                        f"{split} split; give the data to evaluate the run on its {split} split.")
    predictions = read_predictions(run / PREDICTIONS_FILE, classes, thresholds).get(split)
    metrics = all_metrics.get(split)
    if metrics is not None and groups and predictions is not None and thresholds is None:
        metrics = {**metrics, "groups": group_accuracy(predictions.targets, predictions.predicted, classes, groups)}
    return _Evaluation(split, metrics, predictions, _read_skipped(run))


def _view(path: str, preprocessing) -> np.ndarray:
    """The image as the classifier sees it at evaluation (resize + centre crop); grey when it cannot be read."""
    pixels = make_preparer(preprocessing)(path).pixels
    return pixels if pixels is not None else np.full((*preprocessing.input_size, 3), 128, dtype=np.uint8)


def _thresholds(config: dict, classes: list[str]) -> np.ndarray | None:
    """A multi-label run's per-class thresholds in class order (DEFAULT_THRESHOLD where it stored none); None for a
    run with one label an image."""
    return stored_thresholds(config.get("thresholds"), classes) if config["head"].get("multi_label") else None


def _training_samples(config: dict, samples: list, count: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """`count` of the training `samples` as the model saw them in its first epoch: augmented for the image modes,
    the evaluation crop for a probe; each titled with its label(s)."""
    from transferkit.augment import AugmentedImages, Unreadable, decode_size, train_transform
    from transferkit.backbone import Preprocessing

    chosen = np.random.default_rng(seed).permutation(len(samples))[:count]
    preprocessing = Preprocessing.from_dict(config["preprocessing"])
    options = config.get("train", {})
    if config.get("mode", "probe") == "probe":
        return ([_view(str(samples[i].path), preprocessing) for i in chosen],
                [", ".join(samples[i].labels) for i in chosen])
    size = config["backbone"].get("train_size") or preprocessing.input_size[0]
    augment = options.get("augment", "light")
    # Indexed as in training (by position in the train split), so each picture is the crop epoch 1 drew.
    images = AugmentedImages([s.path for s in samples], np.zeros(len(samples)),
                             train_transform(augment, size, preprocessing), decode_size(augment, size),
                             DEFAULT_MAX_IMAGE_PIXELS, options.get("seed", 0))
    pixels, titles = [], []
    for i in chosen:
        item = images[(1, int(i))]
        if not isinstance(item, Unreadable):
            pixels.append(item[0].numpy())
            titles.append(", ".join(samples[i].labels))
    return pixels, titles


def confused_pairs(confusion: list[list[int]], classes: list[str], count: int = CONFUSED_PAIRS) -> list[dict]:
    """The (true, predicted) pairs with the most mistakes."""
    matrix = np.asarray(confusion)
    off_diagonal = matrix * (1 - np.eye(len(classes), dtype=matrix.dtype))
    order = np.argsort(-off_diagonal, axis=None, kind="stable")[:count]
    support = matrix.sum(1)
    pairs = []
    for flat in order:
        true, predicted = divmod(int(flat), len(classes))
        if off_diagonal[true, predicted] == 0:
            break
        pairs.append({"true": classes[true], "predicted": classes[predicted], "count": int(matrix[true, predicted]),
                      "share": float(matrix[true, predicted] / support[true])})
    return pairs


def _directory_bytes(folder: Path, exclude: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and exclude not in p.parents and p.suffix != ".html")


def _backbone_weights_bytes(config: dict) -> int | None:
    from transferkit.backbone import EMBEDDED_BACKBONES, _embedded_file

    spec = config["backbone"]
    if spec.get("weights") and Path(spec["weights"]).is_file():
        return Path(spec["weights"]).stat().st_size
    embedded = EMBEDDED_BACKBONES.get(spec["name"])
    return _embedded_file(embedded).stat().st_size if embedded else None


class _Pictures:
    """Writes each figure as a PNG in the assets folder and keeps it for embedding in the page."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.figures: dict[str, Figure] = {}

    def add(self, key: str, title: str, draw) -> None:
        path = draw(self.folder / f"{key}.png")
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        self.figures[key] = Figure(title, f"{self.folder.name}/{path.name}", f"data:image/png;base64,{encoded}")


def report(run: str | Path, data: str | Path | None = None, out: str | Path | None = None,
           groups: str | Path | dict | None = None, split: str = "auto", seed: int = 0,
           cache_dir: str | Path | None = None, progress: bool | None = None, **engine_options) -> Path:
    """Write RUN's report: `out` (default RUN/report.html), one self-contained page, plus its PNGs in a folder
    beside it (`report_files/`). Without `data` it shows the run's own test (else validation) split as training
    measured it (`split` "val" or "test" picks one of them); with `data` it evaluates the run on DATA's `split`
    first. Returns the page's path."""
    from transferkit import plots
    from transferkit.backbone import Preprocessing

    run = Path(run)
    config = read_run_config(run)
    classes = config["labels"]
    thresholds = _thresholds(config, classes)
    out = Path(out) if out else run / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise DataError(f"--out must name an .html file, not {out}.")
    assets = out.parent / f"{out.stem}_files"
    try:
        assets.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"cannot create {assets}: {err.strerror or err}; choose a writable --out.") from err
    group_map = read_groups(groups) if isinstance(groups, (str, Path)) else groups
    if data is not None:
        evaluation = evaluate(run, data, split, group_map, cache_dir=cache_dir, progress=progress, **engine_options)
        chosen = _Evaluation(evaluation.split, evaluation.metrics, evaluation.predictions,
                             [(s.path, s.reason) for s in evaluation.skipped])
        counts = load_dataset(data, val_percent=config["data"].get("val_percent", 10.0),
                              test_percent=config["data"].get("test_percent", 10.0), **label_options(config)).counts()
    else:
        chosen = _run_evaluation(run, classes, group_map, split, thresholds)
        counts = config["data"].get("class_counts", {})
    preprocessing = Preprocessing.from_dict(config["preprocessing"])
    pictures = _Pictures(assets)
    notes = [f"Scored {evaluation.scored}."] if data is not None else []

    history = _read_history(run)
    if history:
        pictures.add("curves", "Learning curves", lambda path: plots.plot_learning_curves(history, path))
    source = data if data is not None else config["data"].get("source")
    training = None
    try:
        training = load_run_dataset(config, source).splits.get("train", [])
        images, titles = _training_samples(config, training, GRID_IMAGES, seed)
        pictures.add("samples", "Training images as the model sees them",
                     lambda path: plots.plot_image_grid(images, titles, path))
    except (TransferkitError, OSError) as err:
        notes.append(f"Training samples not shown: {err} Pass --data to point at the images.")
    top_losses, metrics, label_sets = [], chosen.metrics, None
    if thresholds is None:
        top_losses = _add_predictions(pictures, chosen, classes, preprocessing, seed, notes)
    else:
        metrics = None  # report.html's single-label sections stay out; label_sets has the run's own
        label_sets = {**_add_label_sets(pictures, chosen, training, classes, preprocessing, seed, notes),
                      "headline": HEADLINE, "colours": VERDICT_COLOURS,
                      "chosen_by": (config.get("thresholds") or {}).get("chosen_by") or "default"}
    page = render_template("report.html", run=run, config=config, classes=classes, split=chosen.split,
                           finetune_start=plots.fine_tuning_start(history), figures=pictures.figures, notes=notes,
                           counts=counts, skipped=chosen.skipped[:SKIPPED_SHOWN], skipped_total=len(chosen.skipped),
                           metrics=metrics, top_losses=top_losses, label_sets=label_sets,
                           pairs=confused_pairs(metrics["confusion_matrix"], classes) if metrics else [],
                           model=_model_summary(run, config, assets, cache_dir))
    write_atomically(out, lambda temporary: temporary.write_text(page, encoding="utf-8"))
    return out


def _add_predictions(pictures: _Pictures, chosen: _Evaluation, classes: list[str], preprocessing, seed: int,
                     notes: list[str]) -> list[dict]:
    """A single-label split's pictures: predictions, top losses, the honesty figures, the confusion matrix (and
    accuracy per group); returns the top losses' table rows."""
    from transferkit import plots

    predictions = chosen.predictions
    top_losses = []
    if predictions is not None and len(predictions.paths):
        shown = np.random.default_rng(seed).permutation(len(predictions.paths))[:GRID_IMAGES]
        pictures.add("predictions", f"Predictions on the {chosen.split} split", lambda path: plots.plot_image_grid(
            [_view(predictions.paths[i], preprocessing) for i in shown],
            [_prediction_title(predictions, i, classes) for i in shown], path,
            [RIGHT if predictions.correct[i] else WRONG for i in shown]))
        worst = predictions.top_losses(TOP_LOSSES)
        top_losses = [{"path": predictions.paths[i], "predicted": classes[predictions.predicted[i]],
                       "true": classes[predictions.targets[i]], "probability": float(predictions.confidence[i]),
                       "label_probability": float(predictions.label_probability[i])} for i in worst]
        if len(worst):
            pictures.add("top_losses", "Top losses: the most confident mistakes", lambda path: plots.plot_image_grid(
                [_view(predictions.paths[i], preprocessing) for i in worst],
                [f"{classes[predictions.predicted[i]]} {predictions.confidence[i]:.2f}\n"
                 f"(true: {classes[predictions.targets[i]]})" for i in worst], path, [WRONG] * len(worst)))
        _add_honesty(pictures, predictions, chosen.metrics, preprocessing, classes, notes)
    elif chosen.split is not None:
        notes.append(NO_PREDICTIONS)
    metrics = chosen.metrics
    if metrics is not None:
        pictures.add("confusion", "Confusion matrix",
                     lambda path: plots.plot_confusion(np.array(metrics["confusion_matrix"]), classes, path))
        if metrics.get("groups"):
            pictures.add("groups", "Accuracy per group of classes",
                         lambda path: plots.plot_group_accuracy(metrics["groups"], path))
    else:
        notes.append(NO_METRICS)
    return top_losses


NO_PREDICTIONS = ("This run has no per-image predictions (trained before predictions.csv was written); pass --data "
                  "to evaluate it afresh.")
NO_METRICS = "The run has no validation or test split to measure; pass --data with labelled images."


def _add_honesty(pictures: _Pictures, predictions: Predictions, metrics: dict | None, preprocessing,
                 classes: list[str], notes: list[str]) -> None:
    """The reliability diagram, the risk-coverage curve and the most unfamiliar images of the split, where the run
    kept what they need (runs from before calibration and unknown scores did not: a note says so)."""
    from transferkit import plots

    if predictions.raw_confidence is not None:
        pictures.add("reliability", "Reliability before and after calibration", lambda path: plots.plot_reliability(
            predictions.raw_confidence, predictions.confidence, predictions.correct, path))
    if predictions.ood_score is None:
        notes.append("This run keeps no unknown scores (trained before transferkit scored unknown images): no "
                     "risk-coverage curve. Retrain it to get one.")
        return
    unknown = (metrics or {}).get("unknown") or {}
    pictures.add("risk_coverage", "Risk-coverage: accuracy against the share answered",
                 lambda path: plots.plot_risk_coverage(predictions.correct, predictions.ood_score,
                                                       predictions.confidence, unknown.get("threshold"), path))
    strangest = np.argsort(-predictions.ood_score, kind="stable")[:TOP_LOSSES]
    pictures.add("unknown", "The most unfamiliar images of the split", lambda path: plots.plot_image_grid(
        [_view(predictions.paths[i], preprocessing) for i in strangest],
        [f"score {predictions.ood_score[i]:.2f}\n{_prediction_title(predictions, i, classes)}" for i in strangest],
        path, [WRONG if unknown.get("threshold") is not None and predictions.ood_score[i] > unknown["threshold"]
               else RIGHT for i in strangest]))


def _prediction_title(predictions: Predictions, i: int, classes: list[str]) -> str:
    title = f"{classes[predictions.predicted[i]]} {predictions.confidence[i]:.2f}"
    return title if predictions.correct[i] else f"{title}\n({classes[predictions.targets[i]]})"


def _model_summary(run: Path, config: dict, assets: Path, cache_dir: str | Path | None) -> dict:
    from transferkit.summary import summarize_run

    summary = summarize_run(run, cache_dir).to_dict()
    summary["run_bytes"] = _directory_bytes(run, assets)
    summary["backbone_weights_bytes"] = _backbone_weights_bytes(config)
    return summary


# ---------------------------------------------------------------------------------------------- multi-label runs


@dataclass
class LabelVerdict:
    """One label of a multi-label image as the report shows it."""

    label: str
    verdict: str
    """"right" (predicted and true), "wrong" (predicted, not true) or "missed" (true, not predicted)."""
    probability: float

    @property
    def colour(self) -> str:
        return VERDICT_COLOURS[self.verdict]

    @property
    def text(self) -> str:
        """The label as a caption writes it: a missed one in parentheses, as a single-label caption writes the true
        class it missed (a cue that needs no colour)."""
        return f"({self.label})" if self.verdict == "missed" else self.label


def label_verdicts(truth: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray,
                   classes: list[str]) -> list[LabelVerdict]:
    """One image's predicted and true labels, in class order, from its rows of targets, decisions and
    probabilities."""
    verdicts = []
    for name, true, given, probability in zip(classes, truth > 0, predicted, probabilities):
        if true or given:
            verdicts.append(LabelVerdict(name, "right" if true and given else "wrong" if given else "missed",
                                         float(probability)))
    return verdicts


def label_cooccurrence(label_sets: list[tuple[str, ...]], classes: list[str]) -> np.ndarray:
    """(classes, classes) int: how many images carry both labels; the diagonal counts each label's images."""
    matrix = label_matrix(label_sets, classes).astype(np.int64)
    return matrix.T @ matrix


def _caption(verdicts: list[LabelVerdict]) -> list[tuple[str, str]]:
    return [(v.text, v.colour) for v in verdicts] or [("no labels", RIGHT)]


def _add_label_sets(pictures: _Pictures, chosen: _Evaluation, training: list | None, classes: list[str],
                    preprocessing, seed: int, notes: list[str]) -> dict:
    """A multi-label run's pictures: precision-recall curves, predictions and top losses captioned label by label,
    and the labels' co-occurrence in the training split; returns what the page's multi-label sections show."""
    from transferkit import plots

    predictions, split = chosen.predictions, chosen.split
    sections: dict = {"metrics": chosen.metrics, "shown": [], "worst": [], "cooccurrence": None}
    if predictions is not None and len(predictions.paths):
        pictures.add("pr_curves", f"Precision-recall per class ({split})", lambda path: plots.plot_precision_recall(
            predictions.targets, predictions.probabilities, predictions.thresholds, classes, path))
        predicted, losses = predictions.predicted, predictions.losses()

        def rows(indices: np.ndarray) -> list[dict]:
            return [{"path": predictions.paths[i], "loss": float(losses[i]),
                     "labels": label_verdicts(predictions.targets[i], predicted[i], predictions.probabilities[i],
                                              classes)} for i in indices]

        shown = rows(np.random.default_rng(seed).permutation(len(predictions.paths))[:GRID_IMAGES])
        worst = rows(predictions.top_losses(TOP_LOSSES))
        for key, title, chosen_rows in (("label_predictions", f"Predictions on the {split} split", shown),
                                        ("label_top_losses", "Top losses: the images whose labels are most wrong",
                                         worst)):
            pictures.add(key, title, lambda path, chosen_rows=chosen_rows: plots.plot_label_grid(
                [_view(row["path"], preprocessing) for row in chosen_rows],
                [_caption(row["labels"]) for row in chosen_rows], path))
        sections.update(shown=shown, worst=worst)
    elif split is not None:
        notes.append(NO_PREDICTIONS)
    if chosen.metrics is None:
        notes.append(NO_METRICS)
    if training:
        counts = label_cooccurrence([sample.labels for sample in training], classes)
        pictures.add("cooccurrence", f"Labels together: co-occurrence in the {len(training)} training images",
                     lambda path: plots.plot_cooccurrence(counts, classes, path))
        matrix, names, _ = plots.cooccurrence_view(counts, classes)
        sections["cooccurrence"] = {"names": names, "counts": matrix.tolist()}
    return sections

