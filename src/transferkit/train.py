"""`train()`: labelled images -> frozen backbone -> cached features -> trained head -> metrics -> run folder."""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from transferkit import __version__, distributed, tables
from transferkit.augment import decode_size
from transferkit.auto import (DEFAULT_BUDGET_PER_IMAGE, DEFAULT_BUDGET_SECONDS, FINETUNE_BELOW, HARD_BELOW,
                              MIN_EPOCHS, TOP_BLOCKS, FinetunePlan, final_seconds, native_size, plan_finetune,
                              probe_size_for)
from transferkit.backbone import Backbone, open_backbone, state_digest
from transferkit.budget import Clock, finish_time, format_duration
from transferkit.calibration import Calibration, fit_temperature
from transferkit.classifier import Classifier, accuracies, class_names
from transferkit.config import TrainConfig, probe_optimizer
from transferkit.data import Skipped, default_workers, load_dataset
from transferkit.distributed import ScratchRun
from transferkit.errors import DataError, RunError
from transferkit.evaluate import (PREDICTIONS_FILE, LabelSetPredictions, Predictions, calibration_metrics,
                                  classification_metrics, predictions_csv, read_groups, unknown_metrics)
from transferkit.features import (Extractor, FeatureSet, cache_root, extract_features, open_cache,
                                 resolve_device)
from transferkit.finetune import (CachedSource, ImageTraining, Network, backbone_blocks, check_images, evaluate_images,
                                  fit_images, lr_range_test_images, measure_speed, resolve_train_precision,
                                  trainable_names)
from transferkit.head import FitOptions, HeadSpec, class_probabilities, fit_head, lr_range_test_features
from transferkit.multilabel import DEFAULT_THRESHOLD, choose_thresholds, loss_and_map, multilabel_metrics
from transferkit.novelty import NOVELTY_FILE, NoveltyModel, fit_novelty
from transferkit.optim import LRFinding
from transferkit.plots import plot_lr_finding
from transferkit.runs import (CHECKPOINT, RUN_FORMAT, StagedRun, absolute_path, default_run_dir, load_checkpoint,
                              save_checkpoint, staging_dir, write_atomically)
from transferkit.text import plural
from transferkit.tracking import Trackers, run_params
from transferkit.topcache import MAX_VIEWS

log = logging.getLogger("transferkit")
SKIPPED_LISTED = 20  # skipped files listed when a class is left without training images
NO_LIMIT = 1e9  # seconds: what planning for "as long as it takes" is given
# Below this many validation images a single image moves the accuracy by more than 5 points and the standard error
# of an accuracy near 0.8 exceeds 9 points (0.4 / sqrt(n)): the epoch that early stopping keeps is then chosen by
# which few images happen to be in the split rather than by the model.
MIN_VAL_IMAGES = 20


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
    report: Path | None = None
    advice: str | None = None
    """A one-line suggestion for a better model (e.g. the fine-tuning command when the probe leaves room)."""
    choice: str | None = None
    """--mode auto: which model the run kept and why."""

    @property
    def val_accuracy(self) -> float | None:
        return self.metrics.get("val", {}).get("accuracy")

    @property
    def test_accuracy(self) -> float | None:
        return self.metrics.get("test", {}).get("accuracy")

    def __repr__(self) -> str:
        return (f"TrainResult(run_dir={str(self.run_dir)!r}, {class_names(self.classes)}; {accuracies(self.metrics)}; "
                f"best epoch {self.best_epoch} of {len(self.history)})")

    def summary(self) -> dict:
        """The machine-readable summary `transferkit train --json` prints."""
        return {"run_dir": str(self.run_dir), "classes": self.classes, "images": self.images,
                "val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy,
                "best_epoch": self.best_epoch, "epochs_run": len(self.history), "skipped": len(self.skipped),
                "features_computed": self.features_computed, "features_from_cache": self.features_from_cache,
                "seconds": round(self.seconds, 2), "report": str(self.report) if self.report else None,
                "choice": self.choice, "advice": self.advice,
                **({f"{split}_map": part.get("map_macro") for split, part in self.metrics.items()}
                   if any(part.get("multi_label") for part in self.metrics.values()) else {})}


def _history_csv(history: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


@dataclass
class Prepared:
    """The images a run trains and evaluates on, unreadable ones already dropped; kept in the checkpoint."""

    classes: list[str]
    paths: dict[str, list[str]]
    targets: dict[str, list]
    """Per split: class indices, or for multi-label data rows of 0/1 per class."""
    skipped: list[Skipped]
    features_computed: int = 0
    features_from_cache: int = 0
    multi_label: bool = False

    def to_state(self) -> dict:
        return {**asdict(self), "skipped": [(s.path, s.reason) for s in self.skipped]}

    @classmethod
    def from_state(cls, state: dict) -> Prepared:
        return cls(**{**state, "skipped": [Skipped(path, reason) for path, reason in state["skipped"]]})

    def split(self, name: str) -> tuple[list[Path], np.ndarray]:
        paths = [Path(p) for p in self.paths.get(name, [])]
        if self.multi_label:
            return paths, np.array(self.targets.get(name, []), dtype=np.float32).reshape(-1, len(self.classes))
        return paths, np.array(self.targets.get(name, []), dtype=np.int64)

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(paths) for name, paths in self.paths.items()}

    @property
    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class per split."""
        if self.multi_label:
            return {name: dict(zip(self.classes, self.split(name)[1].sum(0).astype(int).tolist()))
                    for name in self.targets}
        return {name: {label: targets.count(i) for i, label in enumerate(self.classes)}
                for name, targets in self.targets.items()}


def _splits(dataset) -> list[str]:
    return [name for name in ("train", "val", "test") if name in dataset.splits]


def _warn_small_validation(count: int) -> None:
    if 0 < count < MIN_VAL_IMAGES:
        log.warning("the validation split has only %s, too few to steer early stopping or pick the best epoch (one "
                    "image moves its accuracy by %.0f points): add images, raise val_percent (--val-percent), or give "
                    "an explicit validation set (val= / --val) of %d or more",
                    plural(count, "image"), 100 / count, MIN_VAL_IMAGES)


def _check_train_classes(prepared: Prepared) -> None:
    if prepared.multi_label:
        counts = prepared.class_counts["train"]
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            log.warning("no readable training image left has the label(s) %s: they cannot be learnt (see %s)",
                        ", ".join(empty[:10]), "the skipped files")
        return
    present = set(prepared.targets["train"])
    empty = [c for i, c in enumerate(prepared.classes) if i not in present]
    if empty:
        for item in prepared.skipped[:SKIPPED_LISTED]:
            log.warning("skipped %s: %s", item.path, item.reason)
        if len(prepared.skipped) > SKIPPED_LISTED:
            log.warning("... and %d more skipped files", len(prepared.skipped) - SKIPPED_LISTED)
        raise DataError(f"no readable training images left for class(es) {', '.join(empty[:10])}; "
                        f"see the skipped files listed above.")


def _extract(dataset, extractor: Extractor, config: TrainConfig,
             progress: bool | None) -> tuple[Prepared, dict[str, np.ndarray]]:
    """Features of every split through the cache, and the images that could be read."""
    order = _splits(dataset)
    paths = [s.path for name in order for s in dataset.splits[name]]
    split_of = np.concatenate([np.full(len(dataset.splits[name]), k) for k, name in enumerate(order)])
    cache = open_cache(config.cache_dir, config.use_cache)
    ranks = distributed.current()
    try:
        # Under torchrun each rank extracts its share through its own cache (its machine's: nothing is shared
        # between machines), then the ranks exchange features through the process group.
        share = ranks.shard(paths) if ranks.distributed else paths
        feature_set = extract_features(extractor, share, cache, config.extract_batch_size, config.workers,
                                       config.max_image_pixels, progress)
    finally:
        if cache is not None:
            cache.close()
    if ranks.distributed:
        positions = np.asarray(ranks.shard(list(range(len(paths)))), dtype=np.int64)  # share row -> paths row
        kept, matrix, skipped = distributed.gather_rows(positions[feature_set.kept], feature_set.features,
                                                        feature_set.skipped)
        place = {str(path): i for i, path in enumerate(paths)}
        skipped.sort(key=lambda item: place.get(str(item.path), len(paths)))
        computed, from_cache = distributed.sum_over_ranks(feature_set.computed, feature_set.from_cache)
        feature_set = FeatureSet(matrix, kept, skipped, int(computed), int(from_cache))
    targets = np.concatenate([dataset.targets(name) for name in order])
    features, kept_paths, kept_targets = {}, {}, {}
    for k, name in enumerate(order):
        rows = split_of[feature_set.kept] == k
        indices = feature_set.kept[rows]
        features[name] = feature_set.features[rows]
        kept_paths[name] = [str(paths[i]) for i in indices]
        kept_targets[name] = targets[indices].tolist()
    prepared = Prepared(dataset.classes, kept_paths, kept_targets, dataset.skipped + feature_set.skipped,
                        feature_set.computed, feature_set.from_cache, dataset.multi_label)
    return prepared, features


def _check_readable(dataset, backbone, config: TrainConfig, progress: bool | None) -> Prepared:
    """For the modes that never cache features: decode every image once, up front, to report the bad ones."""
    order = _splits(dataset)
    samples = [s for name in order for s in dataset.splits[name]]
    kept, failures = check_images([s.path for s in samples], config.max_image_pixels,
                                  decode_size(config.augment, backbone.train_size), config.workers, progress)
    kept_set = set(kept.tolist())
    all_targets = np.concatenate([dataset.targets(name) for name in order])
    paths, targets, offset = {}, {}, 0
    for name in order:
        rows = [i for i in range(offset, offset + len(dataset.splits[name])) if i in kept_set]
        paths[name] = [str(samples[i].path) for i in rows]
        targets[name] = all_targets[rows].tolist()
        offset += len(dataset.splits[name])
    skipped = dataset.skipped + [Skipped(str(samples[i].path), reason) for i, reason in failures]
    return Prepared(dataset.classes, paths, targets, skipped, multi_label=dataset.multi_label)


def _probe_options(config: TrainConfig) -> FitOptions:
    """Fine-tuning's first stage: the probe's own defaults, with the options that describe the data and goal."""
    return FitOptions(epochs=config.head_epochs, batch_size=config.batch_size, weight_decay=config.weight_decay,
                      label_smoothing=config.label_smoothing, patience=config.patience, balance=config.balance,
                      seed=config.seed, monitor=config.monitor, optimizer=probe_optimizer(config.head))


def _fit_probe(prepared: Prepared, features: dict[str, np.ndarray], spec: HeadSpec, options: FitOptions,
               progress: bool | None, backbone: Backbone, initial: dict | None = None):
    _, train_targets = prepared.split("train")
    _, val_targets = prepared.split("val")
    last_block = backbone.block_widths[-1] if backbone.feature_kind == "blocks" else None
    fit = fit_head(spec, features["train"], train_targets, features.get("val"), val_targets, options, progress,
                   initial, last_block)
    if fit.chosen:
        log.info("probe: %s features, weight decay %g (chosen on validation among %d fits)",
                 "every block's" if fit.chosen["features"] == "blocks" else "the last block's",
                 fit.chosen["weight_decay"], len(fit.history))
    return fit


@dataclass
class _Judged:
    """A finished model's probabilities made honest: calibrated on validation, each image scored for how unlike the
    training images it is."""

    calibration: Calibration
    novelty: NoveltyModel | None
    raw: dict[str, np.ndarray]
    probabilities: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    thresholds: np.ndarray | None = None
    """Multi-label: each class's decision threshold (None for single-label runs)."""
    thresholds_from: str | None = None


def _thresholds(prepared: Prepared, raw: dict[str, np.ndarray], fixed: float | None) -> tuple[np.ndarray, str]:
    """A multi-label run's per-class thresholds and where they come from: `fixed` for every class when given, else
    each class's F1-best on validation (multilabel.choose_thresholds), else DEFAULT_THRESHOLD."""
    _, val_targets = prepared.split("val")
    classes = len(prepared.classes)
    if fixed is not None:
        return np.full(classes, fixed, dtype=np.float32), f"given: {fixed:g} for every class"
    if "val" not in raw or not len(val_targets):
        log.warning("multi-label thresholds: no validation split to choose them on; every class decides at %g",
                    DEFAULT_THRESHOLD)
        return np.full(classes, DEFAULT_THRESHOLD, dtype=np.float32), "default (no validation split)"
    thresholds = choose_thresholds(raw["val"], val_targets)
    log.info("multi-label thresholds: each class's F1-best on validation (%s), from %.2f to %.2f; --threshold "
             "overrides", plural(len(val_targets), "image"), thresholds.min(), thresholds.max())
    return thresholds, f"validation F1 ({len(val_targets)} images)"


def _judge(outcome: _Outcome, accept: float | None, seed: int, fixed_threshold: float | None = None) -> _Judged:
    _, val_targets = outcome.prepared.split("val")
    raw = outcome.probabilities
    thresholds, thresholds_from = None, None
    if outcome.prepared.multi_label:
        calibration = Calibration(note="multi-label: one sigmoid per class, decided by per-class thresholds; the "
                                       "probabilities are the model's own")
        thresholds, thresholds_from = _thresholds(outcome.prepared, raw, fixed_threshold)
    else:
        calibration = (fit_temperature(raw["val"], val_targets) if "val" in raw and len(val_targets) else
                       Calibration(note="not calibrated: no validation split; the probabilities are the model's own"))
        if calibration.fitted_on:
            log.info("calibration: the probabilities are divided by a temperature of %.3f (fitted on %s)",
                     calibration.temperature, calibration.fitted_on)
        else:
            log.warning("%s", calibration.note)
    novelty, features = None, outcome.features
    logits = _logits(outcome.head, features)
    if len(features.get("train", [])):
        novelty = fit_novelty(features["train"], logits["train"], features.get("val"), logits.get("val"), accept,
                              outcome.final_width, seed)
        (log.warning if novelty.accept is None else log.info)("unknown images: %s", novelty.describe())
    scores = {name: novelty.scores(features[name], logits[name]) for name in raw
              if novelty is not None and name in features}
    return _Judged(calibration, novelty, raw, {name: calibration.apply(p) for name, p in raw.items()}, scores,
                   thresholds, thresholds_from)


def _logits(head: nn.Module | None, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The kept head's logits of each split's features (computed on a CPU copy: the features are on the CPU)."""
    if head is None or not features:
        return {}
    head = copy.deepcopy(head).cpu().float().eval()
    with torch.inference_mode():
        return {name: head(torch.as_tensor(values, dtype=torch.float32)).numpy() for name, values in features.items()}


def _evaluated(prepared: Prepared, judged: _Judged,
               group_map: dict | None) -> tuple[dict, list[Predictions | LabelSetPredictions]]:
    """Metrics (calibration and unknown images included) and per-image predictions of the validation and test
    splits."""
    metrics, predictions = {}, []
    threshold = judged.novelty.threshold() if judged.novelty is not None else None
    for name in ("val", "test"):
        if name in judged.probabilities and len(judged.probabilities[name]):
            paths, targets = prepared.split(name)
            probabilities, scores = judged.probabilities[name], judged.scores.get(name)
            if prepared.multi_label:
                metrics[name] = multilabel_metrics(targets, probabilities, judged.thresholds, prepared.classes)
                part = LabelSetPredictions(name, [str(p) for p in paths], targets, probabilities, judged.thresholds,
                                           scores)
            else:
                metrics[name] = {**classification_metrics(targets, probabilities, prepared.classes, group_map),
                                 **calibration_metrics(probabilities, judged.raw[name], targets)}
                part = Predictions.from_probabilities(name, paths, targets, probabilities, judged.raw[name], scores)
            predictions.append(part)
            if scores is not None and threshold is not None:
                metrics[name]["unknown"] = unknown_metrics(part.correct, scores, threshold, judged.novelty.accept)
    return metrics, predictions


def _log_judgement(metrics: dict) -> None:
    """One line on how honest the probabilities are, on the test split (else validation)."""
    split = "test" if "test" in metrics else "val" if "val" in metrics else None
    if split is None:
        return
    part = metrics[split]
    if part.get("multi_label"):
        log.info("%s: macro mAP %.3f, micro mAP %.3f, exact match %.3f, Hamming loss %.3f at the chosen thresholds",
                 split, part["map_macro"] or 0.0, part["map_micro"] or 0.0, part["exact_match"], part["hamming_loss"])
        return
    unknown = part.get("unknown")
    rejected = (f"; {unknown['unknown_share']:.1%} called unknown, accuracy on the rest {unknown['accuracy_known']:.3f}"
                f" (all: {part['accuracy']:.3f})" if unknown and unknown["accuracy_known"] is not None else "")
    log.info("%s: expected calibration error %.3f (uncalibrated %.3f)%s", split, part["ece"],
             part["ece_uncalibrated"], rejected)


@dataclass
class _Outcome:
    prepared: Prepared
    probabilities: dict[str, np.ndarray]
    history: list[dict]
    best_epoch: int
    tensors: dict[str, torch.Tensor]
    spec: HeadSpec
    backbone_config: dict
    preprocessing: dict
    engine: dict
    mode: str = "probe"
    choice: str | None = None
    advice: str | None = None
    probe_fit: dict = field(default_factory=dict)
    """What validation chose for the probe (features, weight decay), when L-BFGS fitted it."""
    recipe: dict = field(default_factory=dict)
    """The regularisation an image stage trained with (recipe.Recipe)."""
    features: dict[str, np.ndarray] = field(default_factory=dict)
    """The kept model's features of each split (train, val, test): what unknown images are told apart by."""
    final_width: int | None = None
    """How many of the features' last columns are the final block's (novelty's part); None: all of them."""
    head: nn.Module | None = None
    """The kept head, which turns `features` into logits."""


def _run_probe(dataset, backbone, config: TrainConfig, options: FitOptions, progress, tracker: Trackers,
               start: Classifier | None = None) -> _Outcome:
    extractor = Extractor(backbone, config.device, config.precision, config.engine, config.cache_dir)
    prepared, features = _extract(dataset, extractor, config, progress)
    _check_train_classes(prepared)
    spec = HeadSpec(config.head, features["train"].shape[1], len(prepared.classes), config.dropout, config.hidden,
                    prepared.multi_label)
    fit = _fit_probe(prepared, features, spec, options, progress, backbone, start.head.state_dict() if start else None)
    for row in fit.history:
        row["stage"] = "probe"
        tracker.epoch(row)
    logits = _logits(fit.head, {name: features[name] for name in ("val", "test") if name in features})
    probabilities = {name: class_probabilities(torch.from_numpy(values), spec.multi_label).numpy()
                     for name, values in logits.items()}
    tensors = {f"head.{k}": v.contiguous() for k, v in fit.head.state_dict().items()}
    backbone_config = backbone.to_config()
    if _trained_backbone(start):  # the run's backbone goes with the new head: it is not the pretrained one
        tensors.update({f"backbone.{k}": v.contiguous() for k, v in backbone.model.state_dict().items()})
        backbone_config.update(stored_in_run=True, started_from=start.config["backbone"]["started_from"])
    return _Outcome(prepared, probabilities, fit.history, fit.best_epoch, tensors, spec, backbone_config,
                    backbone.preprocessing.to_dict(), extractor.describe(), probe_fit=fit.chosen,
                    features=features, final_width=_final_width(backbone), head=fit.head)


def _final_width(backbone: Backbone) -> int | None:
    return backbone.block_widths[-1] if backbone.feature_kind == "blocks" else None


def _prepare_images(dataset, backbone, config: TrainConfig, progress,
                    start: Classifier | None = None) -> tuple[Prepared, dict | None]:
    """The readable images, and for fine-tuning the first stage: a head probed on cached features (or the head of
    the run this one starts from)."""
    if config.mode != "finetune" or start is not None:
        prepared = _check_readable(dataset, backbone, config, progress)
        _check_train_classes(prepared)
        return prepared, {"history": [], "head": start.head.state_dict()} if start else None
    extractor = Extractor(backbone, config.device, "auto", config.engine, config.cache_dir)
    prepared, features = _extract(dataset, extractor, config, progress)
    _check_train_classes(prepared)
    spec = HeadSpec(config.head, features["train"].shape[1], len(prepared.classes), config.dropout, config.hidden,
                    prepared.multi_label)
    fit = _fit_probe(prepared, features, spec, _probe_options(config), progress, backbone)
    for row in fit.history:
        row["stage"] = "head"
    return prepared, {"history": fit.history, "head": fit.head.state_dict()}


def _network(backbone, config: TrainConfig, num_classes: int, multi_label: bool = False) -> tuple[Network, HeadSpec]:
    """The backbone (a trainable copy; random weights from scratch) and a new head, initialised from the seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = backbone.trainable_copy()
        spec = HeadSpec(config.head, backbone.feature_width, num_classes, config.dropout, config.hidden, multi_label)
        return Network(model, backbone, spec.build(), multi_label), spec


def _run_images(dataset, backbone, config: TrainConfig, progress, tracker: Trackers, staged: StagedRun,
                checkpoint: dict, clock: Clock, reserve_seconds: float = 0.0,
                start: Classifier | None = None) -> _Outcome:
    device = resolve_device(config.device)
    precision = resolve_train_precision(config.precision, device, config.cache_bottom)
    if config.compile and device.type == "cpu" and precision == "bf16":
        # Inductor's CPU kernels for this network under bf16 autocast crash the process (torch 2.14, seen here).
        log.warning("--compile on a CPU trains in fp32: torch.compile with bf16 autocast crashes there")
        precision = "fp32"
    net, spec = _network(backbone, config, len(dataset.classes), dataset.multi_label)
    if config.mode == "finetune":
        trainable_names(net.backbone, config.unfreeze)  # a bad --unfreeze fails here, before any work
    if "prepared" in checkpoint:
        prepared, first_stage = Prepared.from_state(checkpoint["prepared"]), checkpoint["first_stage"]
    else:
        prepared, first_stage = _prepare_images(dataset, backbone, config, progress, start)
        for row in (first_stage or {}).get("history", []):
            tracker.epoch(row)
        checkpoint = {**checkpoint, "prepared": prepared.to_state(), "first_stage": first_stage}
        _save(staged, checkpoint, clock)
    if first_stage:
        net.head.load_state_dict(first_stage["head"])
    earlier = first_stage["history"] if first_stage else []
    source = _bottom_source(net, backbone, config, prepared, progress) if config.cache_bottom else None
    recipe = config.recipe(prepared.sizes["train"])
    log.info("recipe: %s", recipe.describe())
    training = ImageTraining(net, config.mode, config, backbone, device, precision, source, recipe)
    fit = fit_images(training, *prepared.split("train"), *prepared.split("val"), first_epoch_number=len(earlier) + 1,
                     history=earlier, resume_state=checkpoint.get("stage"),
                     save_checkpoint=(lambda state: _save(staged, {**checkpoint, "stage": state}, clock))
                     if distributed.current().is_main else None,
                     tracker=tracker, progress=progress, clock=clock if clock.limit else None,
                     reserve_seconds=reserve_seconds)
    train_paths = prepared.paths["train"]
    prepared.skipped += [Skipped(train_paths[i], f"became unreadable during training: {reason}")
                         for i, reason in sorted(fit.unreadable.items())]
    probabilities, features = {}, {}
    for name in ("train", "val", "test"):  # the training images' features: what unknown images are compared with
        paths, targets = prepared.split(name)
        if paths:
            probabilities[name], features[name], kept = evaluate_images(
                net, backbone, paths, device, precision, 32, config.workers, config.max_image_pixels,
                f"Final pass ({name})", progress)
            if len(kept) != len(paths) and name != "train":  # unreadable training images are reported by fit
                log.warning("%d %s images became unreadable during training; they are left out of the metrics",
                            len(paths) - len(kept), name)
                lost = sorted(set(range(len(paths))) - set(kept.tolist()))
                prepared.skipped += [Skipped(str(paths[i]), "became unreadable during training") for i in lost]
                prepared.paths[name] = [str(paths[i]) for i in kept]
                prepared.targets[name] = targets[kept].tolist()
    probabilities.pop("train", None)
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in net.head.state_dict().items()}
    backbone_config = backbone.to_config()
    if config.mode != "head" or _trained_backbone(start):
        backbone_state = {k: v.detach().cpu().contiguous() for k, v in net.backbone.state_dict().items()}
        tensors.update({f"backbone.{k}": v for k, v in backbone_state.items()})
        backbone_config.update(stored_in_run=True, started_from=backbone.weights_id,
                               weights_id=f"{config.mode}:{state_digest(backbone_state)}")
    return _Outcome(prepared, probabilities, fit.history, fit.best_epoch, tensors, spec, backbone_config,
                    backbone.preprocessing.to_dict(),
                    {"engine": "torch", "precision": precision, "device": str(device)}, mode=config.mode,
                    recipe=asdict(recipe), features=features, final_width=_final_width(backbone), head=net.head)


def _bottom_source(net: Network, backbone: Backbone, config: TrainConfig, prepared: Prepared,
                   progress: bool | None) -> CachedSource | None:
    """`--cache-bottom`: the training views and validation crops as cached activations of the frozen bottom (None
    when the disk has no room for them: training then reads images)."""
    from transferkit.topcache import CachedViews, cache_bottom, evaluate_cached, first_trained_unit

    if distributed.current().distributed:
        raise DataError("--cache-bottom runs in one process; run it without torchrun or --nproc.")
    first = first_trained_unit(net.backbone, set(trainable_names(net.backbone, config.unfreeze)))
    train_paths, train_targets = prepared.split("train")
    val_paths, _ = prepared.split("val")
    cached = cache_bottom(net.backbone, backbone, first, train_paths, train_targets, {"val": val_paths},
                          min(config.epochs, MAX_VIEWS), config.augment, config.seed, cache_root(config.cache_dir),
                          config.max_image_pixels, default_workers() if config.workers is None else config.workers,
                          progress)
    if cached is None:
        return None
    net.cached_from = first
    validation = cached.evaluation.get("val")
    return CachedSource(CachedViews(cached.views, train_targets, config.seed),
                        lambda model: evaluate_cached(model, validation))


def _trained_backbone(start: Classifier | None) -> bool:
    """Whether the run a new run starts from trained its backbone (which then goes on from those weights)."""
    return start is not None and bool(start.config["backbone"].get("stored_in_run"))


def _starting_backbone(start: Classifier, run: str, config: TrainConfig, classes: list[str],
                       dataset_multi_label: bool = False) -> Backbone:
    """The backbone of a run that starts from the finished run `start`: its weights (pretrained, or as that run
    trained them) at its image size unless `config` gives another; anything that would not fit is refused."""
    if config.mode not in ("probe", "head", "finetune"):
        raise DataError(f"from_run (--from) goes on from {run}'s weights with mode probe, head or finetune, not "
                        f"{config.mode}: choose one of those modes, or drop from_run to train from scratch.")
    if classes != start.classes:
        raise DataError(f"{run} was trained on the classes {', '.join(start.classes)}; this data has "
                        f"{', '.join(classes)}: a run that starts from it needs the same classes.")
    head = HeadSpec(**start.config["head"])
    if head.multi_label != dataset_multi_label:
        kinds = {True: "multi-label (one sigmoid per class)", False: "single-label (one class an image)"}
        raise DataError(f"{run} is {kinds[head.multi_label]} and this data is {kinds[dataset_multi_label]}: a run "
                        "that starts from it needs data of the same kind.")
    if config.head != head.kind or (head.kind == "mlp" and config.hidden != head.hidden):
        raise DataError(f"{run} has a {head.kind} head{f' of {head.hidden}' if head.kind == 'mlp' else ''}; give "
                        f"the same head (head / --head, hidden / --hidden) to start from it.")
    spec = start.config["backbone"]
    fresh = open_backbone(config.backbone, config.weights, config.image_size,
                          features=spec.get("features", "pre-logits"))
    if fresh.name != spec["name"] or (not spec.get("stored_in_run") and fresh.weights_id != spec["weights_id"]):
        raise DataError(f"{run} was trained on the backbone {spec['name']}, not {fresh.name} ({fresh.weights_id}); "
                        f"give the same backbone (backbone / --backbone, weights / --weights) to start from it.")
    backbone = start.backbone if spec.get("stored_in_run") else fresh
    if config.image_size is None:  # the run's own sizes
        backbone.preprocessing = start.backbone.preprocessing
        backbone.train_size = spec.get("train_size") or backbone.preprocessing.input_size[0]
    else:
        backbone.preprocessing, backbone.train_size = fresh.preprocessing, fresh.train_size
    return backbone


def train(data: str | Path, *, val: str | Path | None = None, test: str | Path | None = None,
          out: str | Path | None = None, overwrite: bool = False, groups: str | Path | dict | None = None,
          config: TrainConfig | None = None, progress: bool | None = None, report: bool = True,
          doctor: bool = True, from_run: str | Path | None = None, image_column: str | None = None,
          label_column: str | None = None, split_column: str | None = None, **options) -> TrainResult:
    """Train a classifier on DATA and write a run folder (with report.html unless `report=False`); first log the
    doctor's one-paragraph count of data problems (unless `doctor=False`). Options are `TrainConfig` fields, e.g.
    ``head="mlp"``, ``mode="finetune"``.

    `from_run`: a finished run to train further, as a new run: it starts from that run's head (and its backbone,
    if that run trained it) instead of fresh weights; the data must have the same classes.

    DATA may also be a pandas DataFrame or a Hugging Face `datasets.Dataset` (an image column of paths, URLs, bytes
    or a `datasets.Image` feature, a label column, optionally a split column; found by name unless `image_column`,
    `label_column`, `split_column` say).

    Example: ``transferkit.train("photos/", epochs=50).val_accuracy``.
    """
    config = replace(config or TrainConfig(), **options).resolved()
    if tables.is_table(data):
        data = tables.register(data, image_column, label_column, split_column)
    elif image_column or label_column or split_column:
        raise DataError("image_column, label_column and split_column name the columns of a DataFrame or datasets "
                        "table; DATA is not one.")
    # absolute, so that the run (and resuming it) works from any folder
    arguments = {"data": absolute_path(data), "val": absolute_path(val), "test": absolute_path(test),
                 "groups": absolute_path(groups) if isinstance(groups, (str, Path)) else groups,
                 "config": asdict(config), "from_run": absolute_path(from_run), "report": report}
    return _train(arguments, config, Path(out) if out else None, overwrite, progress, None, report,
                  doctor)


def resume(run: str | Path, *, progress: bool | None = None, report: bool | None = None) -> TrainResult:
    """Continue the interrupted run that was being written to `run`, with its own options, from its last
    checkpoint (the end of the last finished epoch). `report`: write report.html; None: as the run was started."""
    run = Path(run)
    checkpoint = load_checkpoint(staging_dir(run))
    if checkpoint is None:
        if (run / "config.json").is_file():
            raise RunError(f"{run} finished; there is nothing to resume.")
        raise RunError(f"there is no interrupted run at {run} to resume (no {staging_dir(run) / CHECKPOINT}).")
    arguments = checkpoint["arguments"]
    config = TrainConfig(**arguments["config"]).resolved()
    return _train(arguments, config, run, False, progress, checkpoint,
                  arguments.get("report", True) if report is None else report)


def _save(staged: StagedRun, checkpoint: dict, clock: Clock) -> None:
    """The checkpoint, with the seconds the run has spent so far: a resumed run goes on within what is left."""
    save_checkpoint(staged.staging, {**checkpoint, "elapsed": clock.elapsed()})


def _measure(outcome: _Outcome) -> str:
    """What `_val_accuracy` measures, in words."""
    return "mAP" if outcome.prepared.multi_label else "accuracy"


def _val_accuracy(outcome: _Outcome) -> float | None:
    """The validation score auto compares models by: accuracy, or for multi-label the macro mAP."""
    _, targets = outcome.prepared.split("val")
    probabilities = outcome.probabilities.get("val")
    if probabilities is None or not len(targets):
        return None
    if outcome.prepared.multi_label:
        return loss_and_map(probabilities, targets)[1]
    return float((probabilities.argmax(1) == targets).mean())


def _finetune_planner(backbone, config: TrainConfig, prepared: Prepared, probe_val: float):
    """`plan(seconds_left)`: the fine-tuning plan for this data and machine (auto.plan_finetune with the speed
    measured here), or (None, why)."""
    device = resolve_device(config.device)
    net, _ = _network(backbone, config, len(prepared.classes), prepared.multi_label)
    sizes = prepared.sizes
    native = native_size([Path(p) for p in prepared.paths["train"]])
    top_blocks = min(TOP_BLOCKS, len(backbone_blocks(net.backbone)) - 1)

    def measure(unfreeze: str, train_size: int, eval_size: int, cached: bool) -> tuple[float, float, float | None]:
        return measure_speed(net, "finetune", unfreeze, config.train_bn, train_size, eval_size, device,
                             resolve_train_precision(config.precision, device, cached), config.batch_size, cached)

    def plan(seconds_left: float):
        return plan_finetune(seconds_left, sizes["train"], sizes.get("val", 0),
                             sum(sizes.values()), native, backbone.train_size, probe_val,
                             measure, config.train_size, config.image_size, config.lr, top_blocks,
                             MAX_VIEWS if config.use_cache else 0)

    return plan


def _run_auto(dataset, backbone, config: TrainConfig, progress, tracker: Trackers, staged: StagedRun, checkpoint: dict,
              clock: Clock) -> _Outcome:
    """The probe on cached features; then, if the time left buys fine-tuning and the probe leaves room, fine-tuning
    fitted to that time; the better of the two on validation is kept."""
    log.info("auto: the probe on cached features first, then fine-tuning if it pays, within %s (until %s)",
             format_duration(clock.left()), finish_time(clock.left()))
    probe = _run_probe(dataset, backbone, config, _probe_options(config), progress, tracker)
    probe_val = _val_accuracy(probe)
    if probe_val is None:
        probe.choice = ("kept the probe: auto chooses between the probe and fine-tuning on validation images, and "
                        "there are none (give --val or a --val-percent above 0)")
        log.warning("%s", probe.choice)
        return probe
    measure = _measure(probe)
    log.info("probe: validation %s %.3f after %s", measure, probe_val, format_duration(clock.elapsed()))
    if "auto_plan" in checkpoint:
        plan = FinetunePlan(**checkpoint["auto_plan"]) if checkpoint["auto_plan"] else None
        why = "(as planned before the run was interrupted)"
    elif clock.left() <= 0:
        plan, why = None, (f"the time limit ({format_duration(clock.limit)}) is shorter than extracting the features "
                           f"and fitting the probe once ({format_duration(clock.elapsed())}); a second run reads the "
                           f"features from the cache")
    elif probe_val >= FINETUNE_BELOW:
        plan, why = None, (f"its validation {measure} {probe_val:.3f} leaves little room: on data this close to "
                           f"ImageNet, fine-tuning measured no better than the probe")
    else:
        plan, why = _finetune_planner(backbone, config, probe.prepared, probe_val)(clock.left())
        first_stage = {"history": probe.history,
                       "head": {k.removeprefix("head."): v for k, v in probe.tensors.items()}}
        checkpoint.update(auto_plan=plan.to_dict() if plan else None, prepared=probe.prepared.to_state(),
                          first_stage=first_stage)
        _save(staged, checkpoint, clock)
    if plan is None:
        probe.choice = f"kept the probe: {why}"
        (log.warning if clock.left() <= 0 else log.info)("%s", probe.choice)
        return probe
    log.info("plan: %s", plan.describe())
    finetune_backbone = open_backbone(config.backbone, config.weights, plan.eval_size)
    finetune_backbone.train_size = plan.train_size
    finetune_config = replace(config, mode="finetune", epochs=plan.epochs, lr=plan.lr, unfreeze=plan.unfreeze,
                              backbone_lr_mult=plan.backbone_lr_mult, train_size=plan.train_size,
                              image_size=plan.eval_size, cache_bottom=plan.cache_bottom)
    eval_images = sum(probe.prepared.sizes.values())  # after training: train features (novelty), val and test
    finetuned = _run_images(dataset, finetune_backbone, finetune_config, progress, tracker, staged, checkpoint,
                            clock, final_seconds(eval_images, plan.eval_images_per_second))
    finetuned_val = _val_accuracy(finetuned)
    if finetuned_val is not None and finetuned_val > probe_val:
        finetuned.choice = (f"kept the fine-tuned model: validation {measure} {finetuned_val:.3f} against the "
                            f"probe's {probe_val:.3f}")
        log.info("%s", finetuned.choice)
        return finetuned
    probe.choice = (f"kept the probe: validation {measure} {probe_val:.3f} against fine-tuning's "
                    f"{finetuned_val or 0:.3f} (ties go to the probe, which is cheaper to run)")
    log.info("%s", probe.choice)
    probe.history = finetuned.history
    return probe


def _finetune_advice(arguments: dict, config: TrainConfig, backbone, probe: _Outcome, clock: Clock) -> str | None:
    """For a probe whose validation accuracy leaves room: the `--time-limit` command that would fine-tune, and the
    time it would take on this machine for `MIN_EPOCHS` x 2 epochs."""
    probe_val = _val_accuracy(probe)
    if probe_val is None or probe_val >= HARD_BELOW or distributed.current().distributed:
        return None
    plan, _ = _finetune_planner(backbone, config, probe.prepared, probe_val)(NO_LIMIT)
    per_epoch = plan.seconds / plan.epochs  # the plan's own epoch length, not derived again from its speeds
    eval_images = sum(probe.prepared.sizes.values())
    seconds = clock.elapsed() + 2 * MIN_EPOCHS * per_epoch + final_seconds(eval_images, plan.eval_images_per_second)
    minutes = math.ceil(seconds / 60)
    return (f"fine-tuning would likely pay here (the probe's validation {_measure(probe)} is {probe_val:.3f}): "
            f"transferkit train {arguments['data']} --time-limit {minutes}m (~{2 * MIN_EPOCHS} epochs at "
            f"{plan.train_size} px on this machine)")


def _train(arguments: dict, config: TrainConfig, run_dir: Path | None, overwrite: bool, progress: bool | None,
           checkpoint: dict | None, report: bool, doctor: bool = True) -> TrainResult:
    clock = Clock(config.time_limit, spent_before=(checkpoint or {}).get("elapsed", 0.0))
    ranks = distributed.setup(config.device)
    if ranks.distributed and config.mode == "auto":
        raise DataError("--mode auto / --time-limit plans training from one process's measured speed; under torchrun "
                        "give --mode finetune with --epochs (run --time-limit once without torchrun to see its plan).")
    if not ranks.is_main:  # rank 0 speaks for the job
        progress = False
        log.setLevel(logging.ERROR)
    groups = arguments["groups"]
    group_map = read_groups(groups) if isinstance(groups, str) else groups
    dataset = load_dataset(arguments["data"], arguments["val"], arguments["test"], config.val_percent,
                           config.test_percent, config.multi_label, config.label_sep)
    start = Classifier.load(arguments["from_run"]) if arguments.get("from_run") else None
    if start is None:
        backbone = open_backbone(config.backbone, config.weights, config.image_size,
                                 pretrained=config.mode != "scratch")
    else:
        backbone = _starting_backbone(start, arguments["from_run"], config, dataset.classes, dataset.multi_label)
    _warn_small_validation(len(dataset.splits.get("val", [])))
    if config.train_size:
        backbone.train_size = config.train_size
    if config.mode in ("probe", "auto") and config.image_size is None and start is None:
        probe_size = probe_size_for(native_size([s.path for s in dataset.splits["train"]]), backbone.train_size)
        if probe_size:
            log.info("the images are smaller than %s's %d px: the probe's features at %d px, not %d",
                     backbone.name, backbone.train_size, probe_size, backbone.preprocessing.input_size[0])
            backbone = open_backbone(config.backbone, config.weights, probe_size)
    if config.mode == "auto" and clock.limit is None:
        clock.limit = DEFAULT_BUDGET_SECONDS + DEFAULT_BUDGET_PER_IMAGE * len(dataset.splits["train"])
        log.info("--mode auto without --time-limit: a budget of %s for %d training images (%g s + %g s an image); "
                 "give --time-limit to choose", format_duration(clock.limit), len(dataset.splits["train"]),
                 DEFAULT_BUDGET_SECONDS, DEFAULT_BUDGET_PER_IMAGE)
    checked = 0
    unique, run_dir = run_dir is None, run_dir or default_run_dir()
    run_folder = (StagedRun(run_dir, overwrite, resume=checkpoint is not None, unique=unique) if ranks.is_main
                  else ScratchRun())
    with ExitStack() as closing, run_folder as staged:  # opened first: an unwritable --out fails before any work
        run_dir = staged.out if ranks.is_main else run_dir  # a default name taken by another run moves on (-2...)
        if checkpoint is None:  # saved before the data check: a run stopped during it can be resumed
            checkpoint = {"arguments": arguments}
            _save(staged, checkpoint, clock)
            if doctor and ranks.is_main:
                checked = _doctor_summary(arguments, config, backbone.preprocessing.input_size[0],
                                          ranks.distributed, progress)
        if config.mode != "probe":
            log.info("writing %s; if this run is interrupted, continue it with: transferkit train --resume %s",
                     run_dir, run_dir)
        tracker = closing.enter_context(_open_trackers(config, arguments, staged, run_dir, checkpoint, clock)
                                        if ranks.is_main else Trackers())
        if config.mode == "probe":
            outcome = _run_probe(dataset, backbone, config, config, progress, tracker, start)
            outcome.advice = _finetune_advice(arguments, config, backbone, outcome, clock)
        elif config.mode == "auto":
            outcome = _run_auto(dataset, backbone, config, progress, tracker, staged, checkpoint, clock)
        else:
            outcome = _run_images(dataset, backbone, config, progress, tracker, staged, checkpoint, clock,
                                  start=start)
        prepared = outcome.prepared
        judged = _judge(outcome, config.accept, config.seed, config.threshold)
        metrics, predictions = _evaluated(prepared, judged, group_map)
        _log_judgement(metrics)
        if prepared.skipped:
            log.warning("skipped %d of %d files that could not be used (listed in %s)", len(prepared.skipped),
                        sum(prepared.sizes.values()) + len(prepared.skipped), run_dir / "skipped.txt")
        run_config = {
            "format": RUN_FORMAT, "transferkit_version": __version__, "mode": outcome.mode,
            "from_run": arguments.get("from_run"),
            "backbone": outcome.backbone_config, "preprocessing": outcome.preprocessing,
            "extractor": outcome.engine, "labels": prepared.classes, "head": asdict(outcome.spec),
            "probe_fit": outcome.probe_fit, "recipe": outcome.recipe,
            "calibration": judged.calibration.to_dict(),
            "thresholds": (None if judged.thresholds is None else
                           {"per_class": dict(zip(prepared.classes, judged.thresholds.astype(float).tolist())),
                            "chosen_by": judged.thresholds_from}),
            "unknown": ({"accept": judged.novelty.accept, "threshold": judged.novelty.threshold(),
                         "scored_on": judged.novelty.scored_on, "references": len(judged.novelty.references),
                         "neighbours": judged.novelty.neighbours} if judged.novelty is not None else None),
            "train": {k: v for k, v in asdict(config).items() if k != "cache_dir"},
            "data": {"source": arguments["data"], "val": arguments["val"], "test": arguments["test"],
                     "val_percent": config.val_percent, "test_percent": config.test_percent,
                     "multi_label": prepared.multi_label, "label_sep": dataset.label_sep,
                     "images": prepared.sizes, "class_counts": prepared.class_counts},
        }
        staged.write_bytes("model.safetensors", safetensors.torch.save(outcome.tensors,
                                                                       metadata={"format": "transferkit"}))
        staged.write_json("config.json", run_config)
        if judged.novelty is not None:
            staged.write_bytes(NOVELTY_FILE, judged.novelty.to_bytes())
        staged.write_text("labels.txt", "\n".join(prepared.classes) + "\n")
        staged.write_text("history.csv", _history_csv(outcome.history))
        staged.write_json("metrics.json", metrics)
        staged.write_text(PREDICTIONS_FILE, predictions_csv(predictions, prepared.classes))
        staged.write_text("skipped.txt", "".join(f"{s.path}\t{s.reason}\n" for s in prepared.skipped))
        tracker.finish(metrics)
    report_path = _write_report(run_dir, group_map) if report and ranks.is_main else None
    tracker.log_run(run_dir)
    tracker.close()
    return TrainResult(run_dir, prepared.classes, metrics, outcome.history, outcome.best_epoch,
                       prepared.sizes, prepared.skipped, prepared.features_computed + checked,
                       max(0, prepared.features_from_cache - checked),
                       clock.elapsed(), report_path, outcome.advice, outcome.choice)


def _open_trackers(config: TrainConfig, arguments: dict, staged: StagedRun, run_dir: Path, checkpoint: dict,
                   clock: Clock) -> Trackers:
    """The run's trackers (none unless --track), continuing their runs when this run is resumed; their run ids go
    into the checkpoint for that."""
    if not config.track:
        return Trackers()
    tracker = Trackers.open(config.track, staged.staging, run_dir, run_params(arguments, config),
                            config.experiment, checkpoint.get("trackers"))
    checkpoint["trackers"] = tracker.ids
    _save(staged, checkpoint, clock)
    return tracker


def _doctor_summary(arguments: dict, config: TrainConfig, image_size: int, distributed_run: bool,
                    progress: bool | None) -> int:
    """`transferkit doctor`'s one-paragraph count of problems; returns how many features it computed. The feature
    checks run where training extracts the same features anyway (probe, finetune; one process): on a first run
    they compute them for training, later they cost a cache read."""
    from transferkit.doctor import diagnose

    use_features = config.mode in ("probe", "auto", "finetune") and config.use_cache and not distributed_run
    engine = {"device": config.device, "engine": config.engine,
              "precision": config.precision if config.mode in ("probe", "auto") else "auto"}
    try:
        report = diagnose(arguments["data"], arguments["val"], arguments["test"], config.val_percent,
                          config.test_percent, config.backbone, config.weights, image_size,
                          cache_dir=config.cache_dir, use_cache=config.use_cache, use_features=use_features,
                          seed=config.seed, multi_label=config.multi_label, label_sep=config.label_sep,
                          progress=progress, **engine)
    except Exception as err:  # noqa: BLE001 - the check advises; a failure in it must not stop training
        log.warning("the data check failed (%s: %s); training goes on", type(err).__name__, err)
        return 0
    log.info("%s%s", report.summary(), f" Details: transferkit doctor {arguments['data']}" if report.findings else "")
    return report.features_computed


def _write_report(run_dir: Path, group_map: dict | None) -> Path | None:
    """The finished run's report; a failure here is reported and never costs the run itself."""
    from transferkit.report import report

    try:
        return report(run_dir, groups=group_map)
    except Exception as err:  # noqa: BLE001 - the run is complete and saved whatever goes wrong with its pictures
        log.warning("could not write the report (%s: %s); the run is complete. Retry with: transferkit report %s",
                    type(err).__name__, err, run_dir)
        return None


def find_lr(data: str | Path, *, val: str | Path | None = None, test: str | Path | None = None,
            out: str | Path | None = None, config: TrainConfig | None = None, progress: bool | None = None,
            **options) -> tuple[LRFinding, Path]:
    """The learning-rate range test for the training a `train` call with the same options would run (for
    fine-tuning: the second stage, after the head is probed). Writes lr_find.png and lr_find.csv into `out`."""
    requested = options.get("optimizer", config.optimizer if config else None)
    config = replace(config or TrainConfig(), **options).resolved()
    if distributed.launched_by_torchrun():
        raise DataError("--lr-find runs in one process; run it without torchrun or --nproc.")
    if config.mode == "auto":
        raise DataError("--mode auto picks its learning rates itself; use --lr-find with --mode probe or finetune.")
    if config.optimizer == "lbfgs":
        if requested == "lbfgs":
            raise DataError("the lbfgs optimizer has no learning rate to find; use --lr-find with --optimizer adamw, "
                            "adam, sgd or rmsprop.")
        log.info("the probe is fitted by L-BFGS, which needs no learning rate; this range test is for "
                 "--optimizer adamw")
        config = replace(config, optimizer="adamw")
    dataset = load_dataset(data, val, test, config.val_percent, config.test_percent, config.multi_label,
                           config.label_sep)
    backbone = open_backbone(config.backbone, config.weights, config.image_size, pretrained=config.mode != "scratch")
    if config.train_size:
        backbone.train_size = config.train_size
    folder = Path(out) if out else default_run_dir(Path("runs") / "lr-find")
    if config.mode == "probe":
        extractor = Extractor(backbone, config.device, config.precision, config.engine, config.cache_dir)
        prepared, features = _extract(dataset, extractor, config, progress)
        _check_train_classes(prepared)
        spec = HeadSpec(config.head, features["train"].shape[1], len(prepared.classes), config.dropout,
                        config.hidden, prepared.multi_label)
        finding = lr_range_test_features(spec, features["train"], prepared.split("train")[1], config,
                                         progress is not False)
    else:
        device = resolve_device(config.device)
        prepared, first_stage = _prepare_images(dataset, backbone, config, progress)
        net, _ = _network(backbone, config, len(prepared.classes), prepared.multi_label)
        if first_stage:
            net.head.load_state_dict(first_stage["head"])
        training = ImageTraining(net, config.mode, config, backbone, device,
                                 resolve_train_precision(config.precision, device))
        finding = lr_range_test_images(training, *prepared.split("train"), progress)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"cannot create {folder}: {err.strerror or err}; choose a writable --out.") from err
    write_atomically(folder / "lr_find.csv",
                     lambda temporary: temporary.write_text(_history_csv(finding.to_rows()), encoding="utf-8"))
    return finding, plot_lr_finding(finding, folder / "lr_find.png")
