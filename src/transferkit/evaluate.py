"""Metrics of a classifier on labelled images: overall, per class, per group of classes, confusion."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.calibration import expected_calibration_error
from transferkit.data import Dataset, Skipped, load_dataset
from transferkit.errors import DataError
from transferkit.multilabel import decide, label_matrix, multilabel_metrics
from transferkit.novelty import rejection_threshold
from transferkit.runs import absolute_path, stored_paths, warn_missing_images
from transferkit.text import plural

log = logging.getLogger(__name__)


def read_groups(path: str | Path) -> dict[str, list[str]]:
    """A groups file: {"group name": ["class", ...], ...}."""
    try:
        groups = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read groups file {path}: {err}") from err
    if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
        raise DataError(f'{path} must hold a JSON object of group -> list of class names, e.g. {{"cats": ["lion"]}}')
    return {str(k): [str(c) for c in v] for k, v in groups.items()}


def classification_metrics(targets: np.ndarray, probabilities: np.ndarray, classes: list[str],
                           groups: dict[str, list[str]] | None = None) -> dict:
    """Accuracy, top-5 accuracy (5+ classes), log loss, per-class P/R/F1/support, confusion matrix, group accuracy.

    Computed with numpy from the confusion matrix, with scikit-learn's definitions (zero_division=0; a test checks
    them against sklearn.metrics): importing sklearn.metrics would cost a warm `train` 0.9 s of its 5 s budget.
    """
    k, n = len(classes), len(targets)
    predictions = probabilities.argmax(1)
    confusion = np.bincount(targets * k + predictions, minlength=k * k).reshape(k, k)
    true_positives = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision = np.divide(true_positives, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    true_probability = probabilities[np.arange(n), targets] if n else np.empty(0)
    metrics = {
        "n": int(n),
        "accuracy": float(true_positives.sum() / n) if n else None,
        "loss": float(-np.mean(np.log(np.clip(true_probability, 1e-7, 1.0)))) if n else None,
        "macro_f1": float(f1.mean()),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(c)}
                      for name, p, r, f, c in zip(classes, precision, recall, f1, support)},
        "confusion_matrix": confusion.tolist(),
    }
    if k >= 5 and n:
        top5 = np.argsort(-probabilities, axis=1, kind="stable")[:, :5]
        metrics["top5_accuracy"] = float(np.mean(np.any(top5 == targets[:, None], axis=1)))
    if groups:
        metrics["groups"] = group_accuracy(targets, predictions, classes, groups)
    return metrics


PREDICTIONS_FILE = "predictions.csv"


def unknown_metrics(correct: np.ndarray, scores: np.ndarray, threshold: float, accept: float) -> dict:
    """What rejecting images that score above `threshold` does to a split: the share called unknown and the accuracy
    on the rest (against `accuracy`, over all)."""
    known = scores <= threshold
    return {"accept": accept, "threshold": threshold, "unknown_share": float(1 - known.mean()) if len(known) else None,
            "accuracy_known": float(correct[known].mean()) if known.any() else None,
            "accuracy": float(correct.mean()) if len(correct) else None}


def calibration_metrics(probabilities: np.ndarray, raw_probabilities: np.ndarray, targets: np.ndarray) -> dict:
    """Expected calibration error (15 bins) of the calibrated and of the model's own probabilities, and the log loss
    of the model's own (the metrics' "loss" is the calibrated one's)."""
    own = raw_probabilities[np.arange(len(targets)), targets] if len(targets) else np.empty(0)
    return {"ece": expected_calibration_error(probabilities, targets),
            "ece_uncalibrated": expected_calibration_error(raw_probabilities, targets),
            "loss_uncalibrated": float(-np.mean(np.log(np.clip(own, 1e-7, 1.0)))) if len(targets) else None}


@dataclass
class Predictions:
    """Per image of one split: its path, true class, predicted class and the probabilities of both; the model's own
    (uncalibrated) top probability and how unlike the training images it is, where known."""

    split: str
    paths: list[str]
    targets: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    label_probability: np.ndarray
    raw_confidence: np.ndarray | None = None
    ood_score: np.ndarray | None = None

    @classmethod
    def from_probabilities(cls, split: str, paths: list, targets: np.ndarray, probabilities: np.ndarray,
                           raw_probabilities: np.ndarray | None = None,
                           ood_score: np.ndarray | None = None) -> Predictions:
        predicted = probabilities.argmax(1) if len(targets) else np.empty(0, dtype=np.int64)
        rows = np.arange(len(targets))
        raw = None if raw_probabilities is None else raw_probabilities[rows, predicted]
        return cls(split, [str(p) for p in paths], np.asarray(targets), predicted, probabilities[rows, predicted],
                   probabilities[rows, targets], raw, ood_score)

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.targets

    def top_losses(self, count: int) -> np.ndarray:
        """Indices of the most confident mistakes: the lowest probability given to the true class first."""
        wrong = np.flatnonzero(~self.correct)
        return wrong[np.argsort(self.label_probability[wrong], kind="stable")][:count]


@dataclass
class LabelSetPredictions:
    """A multi-label split's per-image answers: each image's true labels (0/1 per class), every class's probability,
    and the per-class thresholds that turn them into label sets."""

    split: str
    paths: list[str]
    targets: np.ndarray
    probabilities: np.ndarray
    thresholds: np.ndarray
    ood_score: np.ndarray | None = None

    @property
    def predicted(self) -> np.ndarray:
        """(images, classes) bool: the labels each image is given."""
        return decide(self.probabilities, self.thresholds)

    @property
    def correct(self) -> np.ndarray:
        """Images whose every label is right."""
        return (self.predicted == (self.targets > 0)).all(1)

    def losses(self) -> np.ndarray:
        """Each image's binary cross-entropy, summed over classes."""
        p = np.clip(self.probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
        return -(self.targets * np.log(p) + (1 - self.targets) * np.log1p(-p)).sum(1)

    def top_losses(self, count: int) -> np.ndarray:
        """Indices of the worst images by loss, worst first."""
        return np.argsort(-self.losses(), kind="stable")[:count]


LABEL_JOIN = "|"
"""How predictions.csv writes a set of labels in one field."""
PROBABILITY_PREFIX = "probability:"
"""A multi-label predictions.csv has a column of probabilities per class, named with this prefix."""


def _label_set_rows(part: LabelSetPredictions, classes: list[str]) -> list[list]:
    rows = []
    blank = [None] * len(part.paths)
    for path, truth, predicted, probabilities, score in zip(part.paths, part.targets, part.predicted,
                                                            part.probabilities,
                                                            blank if part.ood_score is None else part.ood_score):
        rows.append([part.split, absolute_path(path), LABEL_JOIN.join(c for c, t in zip(classes, truth) if t > 0),
                     LABEL_JOIN.join(c for c, chosen in zip(classes, predicted) if chosen),
                     *(f"{p:.6g}" for p in probabilities), "" if score is None else f"{score:.6g}"])
    return rows


def predictions_csv(predictions: list[Predictions | LabelSetPredictions], classes: list[str]) -> str:
    if any(isinstance(part, LabelSetPredictions) for part in predictions):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["split", "path", "labels", "predicted", *(PROBABILITY_PREFIX + c for c in classes),
                         "ood_score"])
        for part in predictions:
            writer.writerows(_label_set_rows(part, classes))
        return buffer.getvalue()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["split", "path", "label", "predicted", "probability", "label_probability", "raw_probability",
                     "ood_score"])
    for part in predictions:
        blank = [None] * len(part.paths)
        for path, target, predicted, confidence, label_probability, raw, score in zip(
                part.paths, part.targets, part.predicted, part.confidence, part.label_probability,
                blank if part.raw_confidence is None else part.raw_confidence,
                blank if part.ood_score is None else part.ood_score):
            writer.writerow([part.split, absolute_path(path), classes[target], classes[predicted],
                             f"{confidence:.6g}", f"{label_probability:.6g}", "" if raw is None else f"{raw:.6g}",
                             "" if score is None else f"{score:.6g}"])
    return buffer.getvalue()


def read_predictions(path: Path, classes: list[str],
                     thresholds: np.ndarray | None = None) -> dict[str, Predictions | LabelSetPredictions]:
    """A run's predictions.csv by split; empty when the run has none (runs from before it was written). Its images
    are re-read from their paths: a warning says when some are gone. `thresholds`: a multi-label run's."""
    if not path.is_file():
        return {}
    if thresholds is not None:
        return _read_label_sets(path, classes, thresholds)
    index = {name: i for i, name in enumerate(classes)}
    columns: dict[str, dict[str, list]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            part = columns.setdefault(row["split"], {k: [] for k in ("paths", "targets", "predicted", "confidence",
                                                                      "label_probability", "raw", "score")})
            part["paths"].append(row["path"])
            part["targets"].append(index[row["label"]])
            part["predicted"].append(index[row["predicted"]])
            part["confidence"].append(float(row["probability"]))
            part["label_probability"].append(float(row["label_probability"]))
            part["raw"].append(float(row.get("raw_probability") or "nan"))  # blank or absent in older runs
            part["score"].append(float(row.get("ood_score") or "nan"))
    for part in columns.values():
        part["paths"] = stored_paths(path.parent, part["paths"])
    warn_missing_images(path.parent, [p for part in columns.values() for p in part["paths"]])
    return {split: Predictions(split, part["paths"], np.array(part["targets"], dtype=np.int64),
                               np.array(part["predicted"], dtype=np.int64), np.array(part["confidence"]),
                               np.array(part["label_probability"]), _column(part["raw"]), _column(part["score"]))
            for split, part in columns.items()}


def _read_label_sets(path: Path, classes: list[str], thresholds: np.ndarray) -> dict[str, LabelSetPredictions]:
    parts: dict[str, dict[str, list]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            part = parts.setdefault(row["split"], {"paths": [], "targets": [], "probabilities": [], "score": []})
            labels = set(filter(None, row["labels"].split(LABEL_JOIN)))
            part["paths"].append(row["path"])
            part["targets"].append([float(c in labels) for c in classes])
            part["probabilities"].append([float(row[PROBABILITY_PREFIX + c]) for c in classes])
            part["score"].append(float(row.get("ood_score") or "nan"))
    for part in parts.values():
        part["paths"] = stored_paths(path.parent, part["paths"])
    warn_missing_images(path.parent, [p for part in parts.values() for p in part["paths"]])
    width = len(classes)
    return {split: LabelSetPredictions(split, part["paths"], np.array(part["targets"], np.float32).reshape(-1, width),
                                       np.array(part["probabilities"], np.float32).reshape(-1, width),
                                       np.asarray(thresholds, np.float32), _column(part["score"]))
            for split, part in parts.items()}


def _column(values: list[float]) -> np.ndarray | None:
    """A column of numbers, or None when the run did not write it."""
    array = np.array(values)
    return None if not len(array) or np.isnan(array).all() else array


def group_accuracy(targets: np.ndarray, predicted: np.ndarray, classes: list[str],
                   groups: dict[str, list[str]]) -> dict[str, dict]:
    """Accuracy over the images whose true class belongs to each group."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({c for members in groups.values() for c in members} - set(index))
    if unknown:
        raise DataError(f"groups name classes the model does not know: {', '.join(unknown[:10])}")
    result = {}
    for group, members in groups.items():
        mask = np.isin(targets, [index[c] for c in members])
        result[group] = {"n": int(mask.sum()),
                         "accuracy": float(np.mean(predicted[mask] == targets[mask])) if mask.any() else None}
    return result


@dataclass
class EvaluationReport:
    run: Path
    split: str
    metrics: dict
    skipped: list[Skipped] = field(default_factory=list)
    predictions: Predictions | LabelSetPredictions | None = None
    scored: str = ""
    """Which images were scored, in words: "all 30 images of DATA (not the run's training data)"."""

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]

    def __repr__(self) -> str:
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        return (f"EvaluationReport(run={str(self.run)!r}, split={self.split!r}: accuracy {self.accuracy:.3f} on "
                f"{plural(self.metrics['n'], 'image')}{skipped})")


def split_samples(classifier, data: str | Path, split: str) -> tuple[Dataset, list, str, bool]:
    """DATA as `classifier`'s run split its own (the same percentages and kind of labels), the samples of `split`,
    that split's name ("auto" decided) and whether DATA is the run's own training data. "auto": data the run was
    not trained on whole, the run's own data on its test split (else validation, else every image)."""
    data_config = classifier.config.get("data", {})
    dataset = load_dataset(data, val_percent=data_config.get("val_percent", 10.0),
                           test_percent=data_config.get("test_percent", 10.0),
                           multi_label=True if classifier.multi_label else None,
                           label_sep=data_config.get("label_sep") if classifier.multi_label else None)
    own = _is_training_data(data, data_config.get("source"))
    if split == "auto":
        split = next((s for s in ("test", "val") if s in dataset.splits and own), "all")
    if split == "all":
        samples = [s for part in dataset.splits.values() for s in part]
    elif split in dataset.splits:
        samples = dataset.splits[split]
    else:
        raise DataError(f"{data} has no {split} split (it has: {', '.join(dataset.splits)}); pick another --split.")
    return dataset, samples, split, own


def evaluate(run: str | Path, data: str | Path, split: str = "auto", groups: str | Path | dict | None = None,
             cache_dir: str | Path | None = None, use_cache: bool = True, batch_size: int | None = None,
             workers: int | None = None, progress: bool | None = None, reject: bool = True,
             accept: float | None = None, **engine_options) -> EvaluationReport:
    """Evaluate a trained run on labelled DATA: accuracy and the rest with calibrated probabilities, the expected
    calibration error before and after calibration, and (`reject`) what calling unknown images unknown costs and
    buys (`metrics["unknown"]`: the share rejected, the accuracy on the rest), at the run's share (or `accept`).

    split: "auto" scores data the run was not trained on whole, and the run's own training data on its test split
    (else validation, else every image); or name one of train / val / test / all. A folder without its own splits is
    split as the run was (same percentages). `engine_options` go to `Extractor` (engine, device, precision).
    """
    from transferkit.classifier import Classifier

    classifier = Classifier.load(run, cache_dir=cache_dir, **engine_options)
    dataset, samples, split, own = split_samples(classifier, data, split)
    unknown = sorted({label for s in samples for label in s.labels} - set(classifier.classes))
    if unknown and classifier.multi_label:
        log.warning("%s has labels the model was not trained on; they are left out of the metrics: %s", data,
                    ", ".join(unknown[:10]))
    elif unknown:
        raise DataError(f"{data} has classes the model was not trained on: {', '.join(unknown[:10])}.")
    paths = [s.path for s in samples]
    (raw, scores), kept, skipped = classifier.outputs_of_files(paths, cache_dir=cache_dir, use_cache=use_cache,
                                                               batch_size=batch_size, workers=workers,
                                                               progress=progress, calibrated=False)
    probabilities = classifier.calibration.apply(raw)
    threshold = rejection_threshold(classifier.novelty, reject, accept, str(run))
    if classifier.multi_label:
        return _evaluate_label_sets(classifier, run, data, split, samples, paths, kept, probabilities, scores,
                                    threshold, accept, dataset.skipped + skipped, own)
    index = {name: i for i, name in enumerate(classifier.classes)}
    targets = np.array([index[samples[i].label] for i in kept], dtype=np.int64)
    group_map = read_groups(groups) if isinstance(groups, (str, Path)) else groups
    metrics = {**classification_metrics(targets, probabilities, classifier.classes, group_map),
               **calibration_metrics(probabilities, raw, targets)}
    if scores is not None and threshold is not None:
        metrics["unknown"] = unknown_metrics(probabilities.argmax(1) == targets, scores, threshold,
                                             classifier.novelty.accept if accept is None else accept)
    predictions = Predictions.from_probabilities(split, [paths[i] for i in kept], targets, probabilities, raw, scores)
    return EvaluationReport(Path(run), split, metrics, dataset.skipped + skipped, predictions,
                            _scored(data, split, len(samples), own))


def _evaluate_label_sets(classifier, run, data, split: str, samples: list, paths: list, kept: np.ndarray,
                         probabilities: np.ndarray, scores: np.ndarray | None, threshold: float | None,
                         accept: float | None, skipped: list[Skipped], own: bool) -> EvaluationReport:
    """`evaluate` of a multi-label run: mAP, per-class AP / P / R / F1 at the run's thresholds, exact match, Hamming
    loss (and, as for one label an image, what rejecting unknown images does)."""
    targets = label_matrix([samples[i].labels for i in kept], classifier.classes)
    metrics = multilabel_metrics(targets, probabilities, classifier.thresholds, classifier.classes)
    predictions = LabelSetPredictions(split, [str(paths[i]) for i in kept], targets, probabilities,
                                      classifier.thresholds, scores)
    if scores is not None and threshold is not None:
        metrics["unknown"] = unknown_metrics(predictions.correct, scores, threshold,
                                             classifier.novelty.accept if accept is None else accept)
    return EvaluationReport(Path(run), split, metrics, skipped, predictions, _scored(data, split, len(samples), own))


def _is_training_data(data: str | Path, source: str | None) -> bool:
    """Whether DATA is the folder or CSV the run was trained on (the same file, however it is named)."""
    if source is not None and str(data) == source:  # a URL or table is its own name
        return True
    try:
        return source is not None and os.path.samefile(Path(data).expanduser(), Path(source).expanduser())
    except OSError:
        return False


def _scored(data: str | Path, split: str, count: int, own: bool) -> str:
    """Which images were scored, in words."""
    if split == "all":
        whose = "the run's own data, training images included" if own else "not the run's training data"
        return f"all {plural(count, 'image')} of {data} ({whose})"
    if own:
        return f"the run's {split} split of {data} ({plural(count, 'image')})"
    return f"the {split} split of {data} ({plural(count, 'image')}; not the run's training data)"
