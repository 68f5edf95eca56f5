"""Inference without PyTorch: an exported classifier run by ONNX Runtime, with Pillow and numpy.

A production image only needs ``pip install --no-deps transferkit`` plus onnxruntime, Pillow, numpy (and typer/rich
for the CLI, fastapi/uvicorn for the server): nothing here imports torch. `Prediction` and the batched top-k loop
live here so that the PyTorch `Classifier` shares them.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from transferkit.data import Preprocessing, default_workers, iter_prepared, make_preparer
from transferkit.errors import DataError, RunError
from transferkit.multilabel import THRESHOLDS_FILE, stored_thresholds
from transferkit.novelty import NoveltyModel, rejection_threshold
from transferkit.progress import progress_bar

ImageInput = str | Path | bytes | Image.Image | np.ndarray
"""A path, an http(s) URL, an encoded image's bytes, a PIL image or a numpy array of uint8 pixels."""
EXPORT_MANIFEST = "export.json"
EXPORT_FILES = ("labels.txt", "preprocessing.json", EXPORT_MANIFEST)
Outputs = tuple[np.ndarray, "np.ndarray | None"]
"""What a model gives a batch of pixels: class probabilities, and how unlike its training images each is (or None)."""


@dataclass
class Prediction:
    """Top-k answer for one input; `error` says why an input could not be read (then the lists are empty)."""

    source: str
    labels: list[str]
    ids: list[int]
    probabilities: list[float]
    error: str | None = None
    ood_score: float | None = None
    """How unlike the model's training images the input is (`novelty`); None when the model keeps no such score."""
    unknown: bool | None = None
    """True when `ood_score` is above the model's threshold: "none of these", `label` is then only the nearest class.
    None when not judged (no score, or rejection turned off)."""
    chosen: list[str] | None = None
    """Multi-label models: the labels whose probability reaches their class's threshold, most probable first (maybe
    none). None for single-label models."""
    chosen_probabilities: list[float] | None = None
    passed: list[bool] | None = None
    """Multi-label models: for each of the top-k `labels`, whether it reached its threshold."""

    @property
    def label(self) -> str | None:
        """The most likely class (the nearest one when the input is unknown)."""
        return self.labels[0] if self.labels else None

    @property
    def multi_label(self) -> bool:
        return self.chosen is not None

    @property
    def answer(self) -> str | None:
        """"unknown" for an input unlike the training images, else the most likely class (multi-label: the label
        set, joined by "|"; "" when no label passed its threshold)."""
        if self.unknown:
            return "unknown"
        return "|".join(self.chosen) if self.chosen is not None else self.label

    @property
    def probability(self) -> float | None:
        return self.probabilities[0] if self.probabilities else None

    def __repr__(self) -> str:
        if self.error is not None:
            return f"Prediction({self.source!r}, error={self.error!r})"
        answers = ", ".join(f"{label} {probability:.3f}" for label, probability in zip(self.labels,
                                                                                    self.probabilities))
        if self.unknown:
            return f"Prediction({self.source!r}: unknown, score {self.ood_score:.3f}; nearest {answers})"
        if self.chosen is not None:
            chosen = ", ".join(f"{label} {p:.3f}" for label, p in zip(self.chosen, self.chosen_probabilities))
            return f"Prediction({self.source!r}: {{{chosen}}})"
        return f"Prediction({self.source!r}: {answers})"

    def ranked(self) -> list[tuple[int, str, int, float]]:
        """(rank from 1, label, class id, probability) for each of the top-k answers."""
        return [(rank, *answer) for rank, answer in enumerate(zip(self.labels, self.ids, self.probabilities), 1)]

    def to_dict(self) -> dict:
        ranked = [{"rank": rank, "label": label, "id": i, "probability": probability}
                  for rank, label, i, probability in self.ranked()]
        if self.chosen is None:
            return {"input": self.source, "error": self.error, "unknown": self.unknown, "ood_score": self.ood_score,
                    "predictions": ranked}
        for row, passed in zip(ranked, self.passed):
            row["passed"] = passed
        return {"input": self.source, "error": self.error, "unknown": self.unknown, "ood_score": self.ood_score,
                "labels": [{"label": label, "probability": p} for label, p in zip(self.chosen,
                                                                                  self.chosen_probabilities)],
                "predictions": ranked}


def ranked_prediction(source: str, probabilities: np.ndarray, labels: Sequence[str], top_k: int,
                      ood_score: float | None = None, threshold: float | None = None,
                      thresholds: np.ndarray | None = None) -> Prediction:
    """The top-k answer; `unknown` when the score is above `threshold` (not judged when either is None).
    `thresholds` (multi-label models): each class's decision threshold; the answer is then every label that reaches
    its own, and each top-k entry says whether it passed."""
    ranking = np.argsort(-probabilities, kind="stable")
    order = ranking[:top_k]
    score = None if ood_score is None else float(ood_score)
    unknown = None if score is None or threshold is None else bool(score > threshold)
    prediction = Prediction(source, [labels[j] for j in order], order.tolist(),
                            probabilities[order].astype(float).tolist(), ood_score=score, unknown=unknown)
    if thresholds is not None:
        passing = probabilities >= thresholds
        chosen = ranking[passing[ranking]]
        prediction.chosen = [labels[j] for j in chosen]
        prediction.chosen_probabilities = probabilities[chosen].astype(float).tolist()
        prediction.passed = [bool(passing[j]) for j in order]
    return prediction


def label_decisions(multi_label: bool, thresholds: np.ndarray | None, classes: list[str],
                    override: float | None) -> np.ndarray | None:
    """The per-class thresholds a prediction uses: a multi-label model's own, or `override` for every class; None
    for a single-label model (which refuses an override in one line)."""
    if not multi_label:
        if override is not None:
            raise DataError("--threshold decides the labels of a multi-label model; this model gives one class an "
                            "image (drop --threshold).")
        return None
    return stored_thresholds(None, classes, override) if override is not None else thresholds


def top_k_predictions(preprocessing: Preprocessing, inputs: Sequence[ImageInput],
                      to_outputs: Callable[[np.ndarray], Outputs], labels: Sequence[str], top_k: int,
                      batch_size: int = 32, workers: int | None = None, progress: bool | None = False,
                      threshold: float | None = None, thresholds: np.ndarray | None = None) -> list[Prediction]:
    """Batched top-k over paths or PIL images; unreadable inputs come back with `error` set, never raise.
    `threshold`: scores above it are unknown. `progress` as for `progress_bar` (off by default: a server predicts a
    few images at a time)."""
    results: list[Prediction | None] = [None] * len(inputs)
    bar = progress_bar(len(inputs), "Predicting", "img", progress)
    for batch in iter_prepared(inputs, make_preparer(preprocessing), batch_size, workers or default_workers()):
        good = [(i, p) for i, p in batch if p.pixels is not None]
        for i, p in batch:
            if p.pixels is None:
                results[i] = Prediction(_source_name(inputs[i], i), [], [], [], p.error)
        if good:
            probabilities, scores = to_outputs(np.stack([p.pixels for _, p in good]))
            for position, ((i, _), row) in enumerate(zip(good, probabilities)):
                results[i] = ranked_prediction(_source_name(inputs[i], i), row, labels, top_k,
                                               None if scores is None else scores[position], threshold, thresholds)
        bar.update(len(batch))
    bar.close()
    return results


def image_inputs(inputs: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    """One input or a sequence of them, as a list; numpy arrays (HxW grey, HxWx3 RGB or HxWx4 RGBA uint8 pixels, as
    `np.asarray(pil_image)` gives them) become PIL images. A 4-dimensional array is a batch of images."""
    if isinstance(inputs, (str, Path, bytes, Image.Image)) or (isinstance(inputs, np.ndarray) and inputs.ndim < 4):
        inputs = [inputs]
    return [_array_image(item) if isinstance(item, np.ndarray) else item for item in inputs]


def _array_image(pixels: np.ndarray) -> Image.Image:
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))):
        raise DataError(f"an image array must hold HxW (grey) or HxWx3 (RGB) uint8 pixels, not {pixels.shape} "
                        f"{pixels.dtype}; convert floats in [0, 1] with (array * 255).round().astype(np.uint8).")
    return Image.fromarray(pixels)


def _source_name(item: ImageInput, position: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"<image {position}>"


@functools.lru_cache(maxsize=8)
def onnx_session(path: str, provider: str = "CPUExecutionProvider", threads: int | None = None):
    """An ONNX Runtime session, cached per (file, provider, threads) in a process."""
    try:
        import onnxruntime
    except ImportError:
        raise RunError("running an exported model needs ONNX Runtime: pip install onnxruntime") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.log_severity_level = 3
    # Spinning idle pool threads would take CPU from the decoding threads that feed the next batch.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(path, options, providers=[provider])


def is_export(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / EXPORT_MANIFEST).is_file() and (folder / "preprocessing.json").is_file()


class ExportedClassifier:
    """A classifier written by `transferkit export --format onnx`: uint8 NHWC pixels in, calibrated class
    probabilities out, and (from exports that keep novelty.npz) the features and logits that score how unlike the
    training images an input is."""

    def __init__(self, folder: str | Path, model_file: str | None = None, threads: int | None = None):
        folder = Path(folder)
        missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
        if missing:
            raise RunError(f"{folder} is not a transferkit export (missing {', '.join(missing)}); make one with "
                           f"`transferkit export RUN --format onnx`.")
        self.folder = folder
        self.manifest = json.loads((folder / EXPORT_MANIFEST).read_text(encoding="utf-8"))
        if self.manifest.get("format") != "onnx":
            raise RunError(f"{folder} holds a {self.manifest.get('format')} export; the light runtime runs ONNX "
                           f"exports (`transferkit export RUN --format onnx`).")
        self.classes = (folder / "labels.txt").read_text(encoding="utf-8").splitlines()
        self.preprocessing = Preprocessing.from_dict(
            json.loads((folder / "preprocessing.json").read_text(encoding="utf-8")))
        self.model_path = folder / (model_file or self.manifest["model"])
        self.session = onnx_session(str(self.model_path), threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        outputs = {output.name for output in self.session.get_outputs()}
        self.novelty = NoveltyModel.load(folder) if {"features", "logits"} <= outputs else None
        self.multi_label = bool(self.manifest.get("multi_label"))
        """One sigmoid per class (the graph's probabilities are sigmoids); labels decided by `thresholds`."""
        self.thresholds = (stored_thresholds(json.loads((folder / THRESHOLDS_FILE).read_text(encoding="utf-8")),
                                             self.classes) if self.multi_label else None)

    @classmethod
    def load(cls, folder: str | Path, **options) -> ExportedClassifier:
        return cls(folder, **options)

    def outputs(self, pixels: np.ndarray) -> Outputs:
        """uint8 (N, H, W, 3) pixels, as `Preprocessing.pixels` makes them -> float32 (N, classes) calibrated
        probabilities, and (N,) scores of how unlike the training images each is (None without novelty.npz)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if self.novelty is None:
            return self.session.run(["probabilities"], {self.input_name: pixels})[0], None
        probabilities, features, logits = self.session.run(["probabilities", "features", "logits"],
                                                           {self.input_name: pixels})
        return probabilities, self.novelty.scores(features, logits)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return self.outputs(pixels)[0]

    def predict(self, inputs: Sequence[ImageInput] | ImageInput, top_k: int = 5, batch_size: int = 32,
                workers: int | None = None, progress: bool | None = False, reject: bool = True,
                accept: float | None = None, threshold: float | None = None) -> list[Prediction]:
        """As `Classifier.predict`: `reject=False` never says unknown; `accept` overrides the share of known images
        the threshold accepts; `threshold` (multi-label) decides every class at one threshold."""
        thresholds = label_decisions(self.multi_label, self.thresholds, self.classes, threshold)
        threshold_unknown = rejection_threshold(self.novelty, reject, accept, str(self.folder))
        return top_k_predictions(self.preprocessing, image_inputs(inputs), self.outputs, self.classes,
                                 min(top_k, len(self.classes)), batch_size, workers, progress, threshold_unknown,
                                 thresholds)

    def describe(self) -> dict:
        return {"labels": self.classes, "backbone": self.manifest.get("backbone"),
                "metrics": self.manifest.get("metrics"), "format": "onnx", "model": self.model_path.name,
                "preprocessing": self.preprocessing.to_dict(), "calibration": self.manifest.get("calibration"),
                "unknown": self.novelty.describe() if self.novelty else None, "multi_label": self.multi_label,
                "thresholds": (dict(zip(self.classes, self.thresholds.astype(float).tolist()))
                               if self.thresholds is not None else None)}
