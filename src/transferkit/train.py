"""`train()`: labelled images -> frozen backbone -> cached features -> trained head -> metrics -> run folder."""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import safetensors.torch

from transferkit import __version__
from transferkit.backbone import DEFAULT_BACKBONE, open_backbone
from transferkit.classifier import Classifier
from transferkit.data import DEFAULT_MAX_IMAGE_PIXELS, Skipped, load_dataset
from transferkit.errors import DataError
from transferkit.evaluate import classification_metrics, read_groups
from transferkit.features import Extractor, extract_features, open_cache
from transferkit.head import HEAD_KINDS, FitOptions, HeadSpec, fit_head
from transferkit.runs import RUN_FORMAT, StagedRun, default_run_dir

log = logging.getLogger("transferkit")


@dataclass(frozen=True)
class TrainConfig(FitOptions):
    """Every option of a training run (the head's fit options included); CLI flags map one to one onto fields."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    image_size: int | None = None
    head: str = "linear"
    dropout: float = 0.2
    hidden: int = 512
    val_percent: float = 10.0
    test_percent: float = 10.0
    cache_dir: str | None = None
    use_cache: bool = True
    extract_batch_size: int | None = None
    engine: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class TrainResult:
    run_dir: Path
    classes: list[str]
    metrics: dict
    history: list[dict]
    best_epoch: int
    images: dict[str, int]
    skipped: list[Skipped] = field(default_factory=list)
    features_computed: int = 0
    features_from_cache: int = 0
    seconds: float = 0.0

    @property
    def val_accuracy(self) -> float | None:
        return self.metrics.get("val", {}).get("accuracy")

    @property
    def test_accuracy(self) -> float | None:
        return self.metrics.get("test", {}).get("accuracy")

    def summary(self) -> dict:
        """The machine-readable summary `transferkit train --json` prints."""
        return {"run_dir": str(self.run_dir), "classes": self.classes, "images": self.images,
                "val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy,
                "best_epoch": self.best_epoch, "epochs_run": len(self.history), "skipped": len(self.skipped),
                "features_computed": self.features_computed, "features_from_cache": self.features_from_cache,
                "seconds": round(self.seconds, 2)}


def _history_csv(history: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def train(data: str | Path, *, val: str | Path | None = None, test: str | Path | None = None,
          out: str | Path | None = None, overwrite: bool = False, groups: str | Path | dict | None = None,
          config: TrainConfig | None = None, progress: bool | None = None, **options) -> TrainResult:
    """Train a classifier on DATA and write a run folder. Options are `TrainConfig` fields, e.g. ``head="mlp"``.

    Example: ``transferkit.train("photos/", epochs=50).val_accuracy``.
    """
    started = time.perf_counter()
    config = replace(config or TrainConfig(), **options)
    config.check()
    if config.head not in HEAD_KINDS:
        raise DataError(f"head must be one of {', '.join(HEAD_KINDS)}, not {config.head!r}.")
    group_map = read_groups(groups) if isinstance(groups, (str, Path)) else groups
    dataset = load_dataset(data, val, test, config.val_percent, config.test_percent)
    backbone = open_backbone(config.backbone, config.weights, config.image_size)
    extractor = Extractor(backbone, config.device, config.precision, config.engine)
    run_dir = Path(out) if out else default_run_dir()
    with StagedRun(run_dir, overwrite) as staged:
        order = [name for name in ("train", "val", "test") if name in dataset.splits]
        paths = [s.path for name in order for s in dataset.splits[name]]
        split_of = np.concatenate([np.full(len(dataset.splits[name]), k) for k, name in enumerate(order)])
        cache = open_cache(config.cache_dir, config.use_cache)
        try:
            feature_set = extract_features(extractor, paths, cache, config.extract_batch_size, config.workers,
                                           config.max_image_pixels, progress)
        finally:
            if cache is not None:
                cache.close()
        skipped = dataset.skipped + feature_set.skipped
        targets = np.concatenate([dataset.targets(name) for name in order])
        features, kept = {}, {}
        for k, name in enumerate(order):
            rows = split_of[feature_set.kept] == k
            features[name], kept[name] = feature_set.features[rows], targets[feature_set.kept[rows]]
        empty = [c for i, c in enumerate(dataset.classes) if not np.any(kept["train"] == i)]
        if empty:
            raise DataError(f"no readable training images left for class(es) {', '.join(empty[:10])}; "
                            f"see the skipped files listed above.")
        if skipped:
            log.warning("skipped %d of %d files that could not be used (listed in %s)", len(skipped),
                        len(paths) + len(dataset.skipped), run_dir / "skipped.txt")

        spec = HeadSpec(config.head, features["train"].shape[1], len(dataset.classes), config.dropout, config.hidden)
        fit = fit_head(spec, features["train"], kept["train"], features.get("val"), kept.get("val"),
                       config, progress)
        head = fit.head
        classifier = Classifier(extractor, head, dataset.classes)
        metrics = {name: classification_metrics(kept[name], classifier.probabilities_from_features(features[name]),
                                                dataset.classes, group_map)
                   for name in ("val", "test") if name in features and len(kept[name])}

        run_config = {
            "format": RUN_FORMAT, "transferkit_version": __version__, "mode": "probe",
            "backbone": backbone.to_config(), "preprocessing": backbone.preprocessing.to_dict(),
            "extractor": extractor.describe(), "labels": dataset.classes,
            "head": {k: v for k, v in asdict(spec).items()},
            "train": {k: v for k, v in asdict(config).items() if k not in ("cache_dir",)},
            "data": {"source": str(data), "val": str(val) if val else None, "test": str(test) if test else None,
                     "val_percent": config.val_percent, "test_percent": config.test_percent,
                     "images": {name: int(len(kept[name])) for name in order}},
        }
        safetensors.torch.save_file({f"head.{k}": v.contiguous() for k, v in head.state_dict().items()},
                                    str(staged.path("model.safetensors")), metadata={"format": "transferkit"})
        staged.write_json("config.json", run_config)
        staged.write_text("labels.txt", "\n".join(dataset.classes) + "\n")
        staged.write_text("history.csv", _history_csv(fit.history))
        staged.write_json("metrics.json", metrics)
        staged.write_text("skipped.txt", "".join(f"{s.path}\t{s.reason}\n" for s in skipped))
    return TrainResult(run_dir, dataset.classes, metrics, fit.history, fit.best_epoch,
                       {name: int(len(kept[name])) for name in order}, skipped, feature_set.computed,
                       feature_set.from_cache, time.perf_counter() - started)
