"""Several labels per image: label sets in CSVs, one sigmoid per class, per-class thresholds, multi-label metrics.

A multi-label run's targets are an (images, classes) matrix of 0/1 instead of one class index per image; its head
gives one independent sigmoid per class and is trained with binary cross-entropy. A class is predicted when its
probability reaches the class's threshold, chosen on validation (`choose_thresholds`). numpy only at import (torch is
imported by the loss functions that need it), so the torch-free runtime can use the decisions.
"""

from __future__ import annotations

import numpy as np

LABEL_SEPARATORS = ("|", ";")
"""Separators of several labels in one CSV field, tried in this order when none is given. Not "," (a class name may
hold one: "Rosa, wild"); not a space unless the label column is named `tags` or `labels` (the Kaggle / fastai
convention): elsewhere a space is part of a class name ("golden retriever"). `--label-sep` gives any other."""
TAG_COLUMNS = frozenset({"tags", "labels", "classes", "categories"})
DEFAULT_THRESHOLD = 0.5
"""The threshold of a class validation cannot choose for (too few positives there, or no validation split)."""
THRESHOLD_FLOOR = 0.1
"""The lowest threshold validation may choose. Maximising F1 alone can pick a threshold near 0 for a rare class (the
class then fires on almost every image: with 5 % positives "always on" still scores F1 0.095); a floor keeps it
a decision."""
MIN_POSITIVES_FOR_THRESHOLD = 3
"""A class with fewer validation positives than this keeps DEFAULT_THRESHOLD: F1 over one or two images is noise."""


# ---------------------------------------------------------------------------------------------- label sets


def split_labels(field: str, separator: str | None) -> tuple[str, ...]:
    """The labels of one CSV field: pieces between separators, stripped, empty pieces and repeats dropped, in order
    (`separator` None: the whole field is one label)."""
    field = field.strip()
    if not field:
        return ()
    pieces = [field] if separator is None else (field.split() if separator == " " else field.split(separator))
    return tuple(dict.fromkeys(piece.strip() for piece in pieces if piece.strip()))


def detect_separator(fields: list[str], column_name: str | None = None) -> str | None:
    """The separator that splits these label fields into several labels, or None when every field is one label."""
    for separator in LABEL_SEPARATORS:
        if any(separator in field for field in fields):
            return separator
    if (column_name or "").strip().lower() in TAG_COLUMNS and any(len(field.split()) > 1 for field in fields):
        return " "
    return None


def unbalanced_quote(labels: tuple[str, ...]) -> str | None:
    """A label that starts or ends with a quote the other end lacks: a quoted name that the separator cut in two
    (`'rock|roll'|jazz`)."""
    for label in labels:
        for quote in "\"'":
            if label.startswith(quote) != label.endswith(quote) or label == quote:
                return label
    return None


def label_matrix(label_sets: list[tuple[str, ...]], classes: list[str]) -> np.ndarray:
    """(images, classes) float32 0/1 targets; labels not in `classes` are left out."""
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(label_sets), len(classes)), dtype=np.float32)
    for row, labels in enumerate(label_sets):
        for label in labels:
            if label in index:
                matrix[row, index[label]] = 1.0
    return matrix


def is_multilabel(targets: np.ndarray) -> bool:
    """Targets of a multi-label split: an (images, classes) matrix, not one class index per image."""
    return np.ndim(targets) == 2


def target_of(targets: np.ndarray, index: int) -> int | np.ndarray:
    """One image's target: its class index, or its row of 0/1 labels."""
    return targets[index] if is_multilabel(targets) else int(targets[index])


# ---------------------------------------------------------------------------------------------- training


def sigmoid(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)  # overflow-free logistic


def positive_weights(targets: np.ndarray) -> np.ndarray:
    """Per class: negatives / positives in the training targets (1 for a class with none), BCE's `pos_weight`."""
    positives = targets.sum(0)
    return np.where(positives > 0, (len(targets) - positives) / np.maximum(positives, 1), 1.0).astype(np.float32)


def bce_loss(logits, targets, pos_weight=None):
    """Binary cross-entropy of one sigmoid per class, summed over classes and averaged over images: the multi-label
    counterpart of cross-entropy at the same scale (a one-label image with a confident right answer costs about what
    it costs under softmax), so the same weight decays suit both."""
    import torch

    losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype),
                                                                  pos_weight=pos_weight, reduction="none")
    return losses.sum(1).mean()


def mean_bce(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """`bce_loss` computed from probabilities (numpy)."""
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-(targets * np.log(p) + (1 - targets) * np.log1p(-p)).sum(1).mean()) if len(targets) else float("nan")


# ---------------------------------------------------------------------------------------------- metrics


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float | None:
    """Average precision of one ranking (scikit-learn's definition: precision at each distinct score, weighted by the
    recall it adds); None without positives."""
    targets, scores = np.asarray(targets, dtype=np.float64).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    positives = targets.sum()
    if positives == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    scores, targets = scores[order], targets[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(targets)[last_of_tie]
    precision = true_positives / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0.0, true_positives]) / positives
    return float((recall_gain * precision).sum())


def choose_thresholds(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per class, the threshold that maximises its F1 on these (validation) images, at least THRESHOLD_FLOOR;
    DEFAULT_THRESHOLD for a class with fewer than MIN_POSITIVES_FOR_THRESHOLD positives. A chosen threshold sits
    halfway between the lowest probability it accepts and the next lower one, so it does not ride on one image."""
    classes = targets.shape[1]
    thresholds = np.full(classes, DEFAULT_THRESHOLD, dtype=np.float64)
    for k in range(classes):
        truth = targets[:, k] > 0
        if truth.sum() < MIN_POSITIVES_FOR_THRESHOLD:
            continue
        order = np.argsort(-probabilities[:, k], kind="stable")
        ranked, hits = probabilities[order, k].astype(np.float64), truth[order]
        true_positives = np.cumsum(hits)
        f1 = 2 * true_positives / (np.arange(1, len(ranked) + 1) + truth.sum())
        usable = (np.r_[ranked[1:] < ranked[:-1], True]) & (ranked >= THRESHOLD_FLOOR)  # ends of ties only
        if not usable.any():
            thresholds[k] = THRESHOLD_FLOOR
            continue
        best = int(np.flatnonzero(usable)[np.argmax(f1[usable])])
        below = ranked[best + 1] if best + 1 < len(ranked) else 0.0
        thresholds[k] = max(THRESHOLD_FLOOR, (ranked[best] + below) / 2)
    return thresholds.astype(np.float32)


def decide(probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(images, classes) bool: which labels each image is given."""
    return probabilities >= np.asarray(thresholds)[None, :]


def multilabel_metrics(targets: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray,
                       classes: list[str]) -> dict:
    """mAP (macro over the classes with positives, and micro), per class AP / precision / recall / F1 / support at the
    thresholds, micro and macro F1, the exact-match ratio (every label right) and the Hamming loss (the share of
    wrong image-label pairs); "loss" is the binary cross-entropy, "accuracy" the exact-match ratio."""
    targets = np.asarray(targets, dtype=np.float32)
    n = len(targets)
    predicted = decide(probabilities, thresholds)
    truth = targets > 0
    true_positives = (predicted & truth).sum(0).astype(np.float64)
    predicted_count, support = predicted.sum(0), truth.sum(0)
    precision = np.divide(true_positives, predicted_count, out=np.zeros(len(classes)), where=predicted_count > 0)
    recall = np.divide(true_positives, support, out=np.zeros(len(classes)), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(classes)),
                   where=precision + recall > 0)
    ap = [average_precision(truth[:, k], probabilities[:, k]) for k in range(len(classes))]
    scored = [a for a in ap if a is not None]
    micro_p = true_positives.sum() / max(predicted_count.sum(), 1)
    micro_r = true_positives.sum() / max(support.sum(), 1)
    exact = float((predicted == truth).all(1).mean()) if n else None
    return {
        "n": int(n), "multi_label": True,
        "map_macro": float(np.mean(scored)) if scored else None,
        "map_micro": average_precision(truth, probabilities) if n else None,
        "exact_match": exact, "accuracy": exact,
        "hamming_loss": float((predicted != truth).mean()) if n else None,
        "f1_micro": float(2 * micro_p * micro_r / (micro_p + micro_r)) if micro_p + micro_r > 0 else 0.0,
        "macro_f1": float(f1[support > 0].mean()) if (support > 0).any() else 0.0,
        "labels_per_image": float(truth.sum(1).mean()) if n else None,
        "loss": mean_bce(probabilities, targets) if n else None,
        "per_class": {name: {"ap": a, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(c),
                             "threshold": float(t)}
                      for name, a, p, r, f, c, t in zip(classes, ap, precision, recall, f1, support, thresholds)},
    }


def loss_and_map(probabilities: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(binary cross-entropy, macro mAP): what picks a multi-label run's best epoch (mAP needs no thresholds)."""
    aps = [average_precision(targets[:, k], probabilities[:, k]) for k in range(targets.shape[1])]
    scored = [a for a in aps if a is not None]
    return mean_bce(probabilities, targets), float(np.mean(scored)) if scored else 0.0


THRESHOLDS_FILE = "thresholds.json"
"""A multi-label export's per-class thresholds (the run keeps them in config.json as "thresholds")."""


def stored_thresholds(stored: dict | None, classes: list[str], override: float | None = None) -> np.ndarray:
    """A multi-label model's thresholds in class order, from what its run or export stored ({"per_class": {class:
    threshold}}; DEFAULT_THRESHOLD for a class it does not name); `override` for every class when given."""
    if override is not None:
        if not 0 < override < 1:
            from transferkit.errors import DataError

            raise DataError(f"--threshold must be between 0 and 1, not {override}.")
        return np.full(len(classes), override, dtype=np.float32)
    per_class = (stored or {}).get("per_class", {})
    return np.array([per_class.get(name, DEFAULT_THRESHOLD) for name in classes], dtype=np.float32)
