"""A trained classifier: backbone + head, loaded from a run, predicting top-k labels for images."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np
import safetensors.torch
import torch
from torch import nn

from transferkit.backbone import DEFAULT_BACKBONE, Backbone, Preprocessing, backbone_from_state, open_backbone
from transferkit.data import Skipped
from transferkit.errors import BackboneError, RunError
from transferkit.features import Extractor, extract_features, open_cache
from transferkit.calibration import Calibration
from transferkit.head import HeadSpec, class_probabilities
from transferkit.multilabel import stored_thresholds
from transferkit.novelty import NoveltyModel, rejection_threshold
from transferkit.runs import damaged_file, read_metrics, read_run_config
from transferkit.runtime import ImageInput, Outputs, Prediction, image_inputs, label_decisions, top_k_predictions
from transferkit.text import plural

SHOWN_CLASSES = 8
"""How many class names a repr lists before "..."."""


def class_names(classes: Sequence[str]) -> str:
    """`3 classes: ants, bees, wasps`, the first `SHOWN_CLASSES` of many followed by "..."."""
    more = ", ..." if len(classes) > SHOWN_CLASSES else ""
    return f"{plural(len(classes), 'class')}: {', '.join(classes[:SHOWN_CLASSES])}{more}"


def accuracies(metrics: dict) -> str:
    """`val accuracy 0.933 (15 images), test accuracy 0.900 (10 images)` from a run's metrics by split (multi-label
    runs: their macro mAP)."""
    def one(split: str) -> str:
        part = metrics[split]
        if part.get("multi_label"):
            return f"{split} mAP {part['map_macro'] or 0.0:.3f} ({plural(part['n'], 'image')})"
        return f"{split} accuracy {part['accuracy']:.3f} ({plural(part['n'], 'image')})"

    return ", ".join(one(split) for split in ("val", "test") if split in metrics) or "no validation or test accuracy"


class Classifier:
    """Backbone + trained head. `Classifier.load(run).predict(paths_or_images)` is the whole inference API."""

    def __init__(self, backbone: Backbone | Extractor, head: nn.Module, classes: list[str],
                 config: dict | None = None, metrics: dict | None = None, novelty: NoveltyModel | None = None,
                 source: str = "this classifier", **engine_options):
        """`backbone` is a Backbone (run with `Extractor(backbone, **engine_options)`) or a ready Extractor;
        `metrics` are the run's (metrics.json), shown by the repr; `novelty` scores how unlike the training images an
        input is (None: predictions are never unknown); `config["calibration"]` holds the temperature."""
        self.extractor = backbone if isinstance(backbone, Extractor) else Extractor(backbone, **engine_options)
        self.backbone = self.extractor.backbone
        self.head = head.eval()
        self.classes = list(classes)
        self.config = config or {}
        self.metrics = metrics or {}
        self.calibration = Calibration.from_dict(self.config.get("calibration")) if config else Calibration()
        self.novelty = novelty
        self.source = source
        self.multi_label = bool(self.config.get("head", {}).get("multi_label"))
        """One sigmoid per class: predictions are label sets decided by per-class `thresholds`."""
        self.thresholds = (stored_thresholds(self.config.get("thresholds"), self.classes) if self.multi_label
                           else None)

    def __repr__(self) -> str:
        return (f"Classifier(backbone={self.backbone.name!r}, mode={self.config.get('mode', '?')!r}, "
                f"{class_names(self.classes)}; {accuracies(self.metrics)})")

    def _repr_html_(self) -> str:
        """The same facts as a table, for notebooks."""
        rows = {"backbone": self.backbone.name, "mode": self.config.get("mode", "?"),
                "classes": class_names(self.classes), "accuracy": accuracies(self.metrics)}
        cells = "".join(f"<tr><th style='text-align:left'>{name}</th><td style='text-align:left'>{html.escape(value)}"
                        f"</td></tr>" for name, value in rows.items())
        return f"<table><caption>transferkit Classifier</caption>{cells}</table>"

    @classmethod
    def load(cls, run: str | Path, **engine_options) -> Classifier:
        """Options are `Extractor`'s: device, precision, engine, cache_dir."""
        run = Path(run)
        config = read_run_config(run)
        spec = config["backbone"]
        try:
            preprocessing = Preprocessing.from_dict(config["preprocessing"])
            head = HeadSpec(**config["head"]).build()
        except (TypeError, ValueError) as err:
            raise damaged_file(run / "config.json", err) from None
        state = safetensors.torch.load_file(str(run / "model.safetensors"))
        if spec.get("stored_in_run"):
            backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
            backbone = backbone_from_state(spec, preprocessing, backbone_state)
        else:
            backbone = open_backbone(spec["name"], spec.get("weights"), preprocessing.input_size[0],
                                     features=spec.get("features", "pre-logits"))
            if backbone.weights_id != spec["weights_id"]:
                raise RunError(f"the backbone weights of {run} changed since training ({spec['weights_id']} then, "
                               f"{backbone.weights_id} now); retrain, or restore the original weights file.")
        try:
            head.load_state_dict({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")})
        except RuntimeError as err:
            raise damaged_file(run / "model.safetensors", err) from None
        return cls(backbone, head, config["labels"], config, read_metrics(run), NoveltyModel.load(run), str(run),
                   **engine_options)

    def probabilities_from_features(self, features: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """Class probabilities, divided by the run's temperature unless `calibrated=False` (the head's own)."""
        return self.outputs_from_features(features, calibrated, scored=False)[0]

    def outputs_from_features(self, features: np.ndarray, calibrated: bool = True, scored: bool = True) -> Outputs:
        """(class probabilities, scores of how unlike the training images each is, or None without statistics)."""
        temperature = self.calibration.temperature if calibrated else 1.0
        with torch.inference_mode():
            logits = self.head(torch.as_tensor(features, dtype=torch.float32))
            probabilities = class_probabilities(logits, self.multi_label, temperature).numpy()
        scores = self.novelty.scores(features, logits.numpy()) if scored and self.novelty is not None else None
        return probabilities, scores

    def outputs_of_files(self, paths: Sequence[Path], cache_dir: str | Path | None = None, use_cache: bool = True,
                         batch_size: int | None = None, workers: int | None = None, progress: bool | None = None,
                         calibrated: bool = True) -> tuple[Outputs, np.ndarray, list[Skipped]]:
        """Calibrated class probabilities and unknown-scores of image files through the feature cache: ((probabilities,
        scores or None), kept indices, skipped)."""
        cache = open_cache(cache_dir, use_cache)
        try:
            feature_set = extract_features(self.extractor, paths, cache, batch_size, workers, progress=progress)
        finally:
            if cache is not None:
                cache.close()
        return self.outputs_from_features(feature_set.features, calibrated), feature_set.kept, feature_set.skipped

    def predict(self, inputs: Sequence[ImageInput] | ImageInput, top_k: int = 5, batch_size: int = 32,
                workers: int | None = None, progress: bool | None = False, reject: bool = True,
                accept: float | None = None, calibrated: bool = True,
                threshold: float | None = None) -> list[Prediction]:
        """Top-k classes of each input, with its `ood_score` and an `unknown` verdict for inputs unlike the training
        images. `reject=False`: never unknown; `accept`: the share of known images the threshold accepts (default
        the run's, chosen at training); `calibrated=False`: the head's own probabilities, not the temperature-scaled
        ones. `progress`: None for a bar on a terminal and plain log lines elsewhere, as training has.

        Multi-label models: each prediction's `chosen` labels are those whose probability reaches their class's
        threshold (chosen on validation; `threshold` gives one for every class), and `passed` says it for each of
        the top-k."""
        thresholds = label_decisions(self.multi_label, self.thresholds, self.classes, threshold)
        threshold_unknown = rejection_threshold(self.novelty, reject, accept, self.source)

        def to_outputs(pixels: np.ndarray) -> Outputs:
            return self.outputs_from_features(self.extractor.features(pixels), calibrated)

        return top_k_predictions(self.backbone.preprocessing, image_inputs(inputs), to_outputs, self.classes,
                                 min(top_k, len(self.classes)), batch_size, workers, progress, threshold_unknown,
                                 thresholds)


def predict_imagenet(inputs: Sequence[ImageInput], backbone: str = DEFAULT_BACKBONE, weights: str | None = None,
                     top_k: int = 5, batch_size: int = 32, image_size: int | None = None,
                     device: str = "auto") -> list[Prediction]:
    """Top-k ImageNet classes from the backbone's own classifier (Keras' decode_predictions use case)."""
    from timm.data import ImageNetInfo

    extractor = Extractor(open_backbone(backbone, weights, image_size), device, engine="torch")
    num_classes = getattr(extractor.backbone.model, "num_classes", 0)
    if num_classes != 1000:
        raise BackboneError(f"backbone {backbone} has no ImageNet-1k classifier ({num_classes} outputs).")
    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(1000)]

    def to_outputs(pixels: np.ndarray) -> Outputs:
        return torch.softmax(torch.from_numpy(extractor.logits(pixels)), dim=1).numpy(), None

    return top_k_predictions(extractor.backbone.preprocessing, image_inputs(inputs), to_outputs, names, top_k,
                             batch_size)
