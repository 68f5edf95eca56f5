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
import torch

from transferkit import __version__, distributed
from transferkit.augment import check_augment, decode_size
from transferkit.backbone import DEFAULT_BACKBONE, feature_size, open_backbone, state_digest
from transferkit.classifier import Classifier
from transferkit.data import DEFAULT_MAX_IMAGE_PIXELS, Skipped, load_dataset
from transferkit.distributed import ScratchRun
from transferkit.errors import DataError, RunError
from transferkit.evaluate import PREDICTIONS_FILE, Predictions, classification_metrics, predictions_csv, read_groups
from transferkit.features import Extractor, extract_features, open_cache, resolve_device
from transferkit.finetune import (ImageTraining, Network, check_images, evaluate_images, fit_images,
                                  lr_range_test_images, resolve_train_precision, trainable_names)
from transferkit.head import HEAD_KINDS, FitOptions, HeadSpec, fit_head, lr_range_test_features
from transferkit.optim import LRFinding
from transferkit.plots import plot_lr_finding
from transferkit.runs import (CHECKPOINT, RUN_FORMAT, StagedRun, default_run_dir, load_checkpoint, save_checkpoint,
                              staging_dir, write_atomically)

log = logging.getLogger("transferkit")


MODES = ("probe", "head", "finetune", "scratch")
# Per-mode defaults for the options left at None. Probe epochs are cheap and early stopping ends them; the image
# modes follow fastai's fit_one_cycle. Fine-tuning starts from a trained head, so it runs 10x lower (the backbone
# 100x lower, at the default --backbone-lr-mult): on hymenoptera 1e-3 fell from 0.974 to 0.934 validation accuracy
# within 10 epochs, 1e-4 stayed at 0.961-0.974.
MODE_DEFAULTS = {"probe": {"epochs": 100, "schedule": "constant", "lr": 1e-3},
                 "head": {"epochs": 15, "schedule": "onecycle", "lr": 1e-3},
                 "finetune": {"epochs": 10, "schedule": "onecycle", "lr": 1e-4},
                 "scratch": {"epochs": 30, "schedule": "onecycle", "lr": 1e-3}}


@dataclass(frozen=True)
class TrainConfig(FitOptions):
    """Every option of a training run (the head's fit options included); CLI flags map one to one onto fields.

    mode: probe (head on cached features), head (head on augmented images, frozen backbone), finetune (probe, then
    the unfrozen top of the backbone with the head on augmented images) or scratch (random weights).
    """

    mode: str = "probe"
    epochs: int | None = None
    lr: float | None = None
    schedule: str | None = None
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    image_size: int | None = None
    train_size: int | None = None
    head: str = "linear"
    dropout: float = 0.2
    hidden: int = 512
    augment: str = "light"
    unfreeze: str = "all"
    backbone_lr_mult: float = 0.1
    train_bn: bool = False
    head_epochs: int = 100
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
    tensorboard: bool = False
    compile: bool = False

    def resolved(self) -> TrainConfig:
        """The mode's defaults filled in, `balance=True` read as "weights", and every value checked."""
        if self.mode not in MODES:
            raise DataError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}.")
        defaults = {k: v for k, v in MODE_DEFAULTS[self.mode].items() if getattr(self, k) is None}
        balance = {True: "weights", False: "none"}.get(self.balance, self.balance)
        config = replace(self, **defaults, balance=balance, lr_steps=tuple(self.lr_steps))
        config.check()
        if config.head not in HEAD_KINDS:
            raise DataError(f"head must be one of {', '.join(HEAD_KINDS)}, not {config.head!r}.")
        check_augment(config.augment)
        if not (config.unfreeze == "all" or config.unfreeze.startswith(("top-blocks:", "from:"))):
            raise DataError(f"--unfreeze must be all, top-blocks:N or from:LAYER, not {config.unfreeze!r}.")
        if config.backbone_lr_mult < 0:
            raise DataError(f"--backbone-lr-mult must be 0 or more, not {config.backbone_lr_mult}.")
        return config


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
                "seconds": round(self.seconds, 2), "report": str(self.report) if self.report else None}


def _history_csv(history: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def _tensorboard(folder: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DataError("--tensorboard needs TensorBoard: pip install 'transferkit[tensorboard]'.") from None
    log.info("TensorBoard logs: tensorboard --logdir %s", folder / "tensorboard")
    return SummaryWriter(str(folder / "tensorboard"))


@dataclass
class Prepared:
    """The images a run trains and evaluates on, unreadable ones already dropped; kept in the checkpoint."""

    classes: list[str]
    paths: dict[str, list[str]]
    targets: dict[str, list[int]]
    skipped: list[Skipped]
    features_computed: int = 0
    features_from_cache: int = 0

    def to_state(self) -> dict:
        return {**asdict(self), "skipped": [(s.path, s.reason) for s in self.skipped]}

    @classmethod
    def from_state(cls, state: dict) -> Prepared:
        return cls(**{**state, "skipped": [Skipped(path, reason) for path, reason in state["skipped"]]})

    def split(self, name: str) -> tuple[list[Path], np.ndarray]:
        return [Path(p) for p in self.paths.get(name, [])], np.array(self.targets.get(name, []), dtype=np.int64)

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(paths) for name, paths in self.paths.items()}

    @property
    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class per split."""
        return {name: {label: targets.count(i) for i, label in enumerate(self.classes)}
                for name, targets in self.targets.items()}


def _splits(dataset) -> list[str]:
    return [name for name in ("train", "val", "test") if name in dataset.splits]


def _check_train_classes(prepared: Prepared) -> None:
    present = set(prepared.targets["train"])
    empty = [c for i, c in enumerate(prepared.classes) if i not in present]
    if empty:
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
        computed = 0
        if ranks.distributed:
            # Each rank extracts its share into the shared cache; then every rank reads all features from it.
            computed = extract_features(extractor, ranks.shard(paths), cache, config.extract_batch_size,
                                        config.workers, config.max_image_pixels, progress).computed
            distributed.barrier()
        feature_set = extract_features(extractor, paths, cache, config.extract_batch_size, config.workers,
                                       config.max_image_pixels, progress)
        if ranks.distributed:
            computed, = distributed.sum_over_ranks(computed + feature_set.computed)
            feature_set.from_cache, feature_set.computed = len(feature_set.kept) - int(computed), int(computed)
    finally:
        if cache is not None:
            cache.close()
    targets = np.concatenate([dataset.targets(name) for name in order])
    features, kept_paths, kept_targets = {}, {}, {}
    for k, name in enumerate(order):
        rows = split_of[feature_set.kept] == k
        indices = feature_set.kept[rows]
        features[name] = feature_set.features[rows]
        kept_paths[name] = [str(paths[i]) for i in indices]
        kept_targets[name] = targets[indices].tolist()
    prepared = Prepared(dataset.classes, kept_paths, kept_targets, dataset.skipped + feature_set.skipped,
                        feature_set.computed, feature_set.from_cache)
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
    return Prepared(dataset.classes, paths, targets, skipped)


def _probe_options(config: TrainConfig) -> FitOptions:
    """Fine-tuning's first stage: the probe's own defaults, with the options that describe the data and goal."""
    return FitOptions(epochs=config.head_epochs, batch_size=config.batch_size, weight_decay=config.weight_decay,
                      label_smoothing=config.label_smoothing, patience=config.patience, balance=config.balance,
                      seed=config.seed, monitor=config.monitor)


def _fit_probe(prepared: Prepared, features: dict[str, np.ndarray], spec: HeadSpec, options: FitOptions,
               progress: bool | None):
    _, train_targets = prepared.split("train")
    _, val_targets = prepared.split("val")
    return fit_head(spec, features["train"], train_targets, features.get("val"), val_targets, options, progress)


def _evaluated(prepared: Prepared, probabilities: dict[str, np.ndarray],
               group_map: dict | None) -> tuple[dict, list[Predictions]]:
    """Metrics and per-image predictions of the validation and test splits."""
    metrics, predictions = {}, []
    for name in ("val", "test"):
        if name in probabilities and len(probabilities[name]):
            paths, targets = prepared.split(name)
            metrics[name] = classification_metrics(targets, probabilities[name], prepared.classes, group_map)
            predictions.append(Predictions.from_probabilities(name, paths, targets, probabilities[name]))
    return metrics, predictions


@dataclass
class _Outcome:
    prepared: Prepared
    probabilities: dict[str, np.ndarray]
    history: list[dict]
    best_epoch: int
    tensors: dict[str, torch.Tensor]
    spec: HeadSpec
    backbone_config: dict
    engine: dict


def _run_probe(dataset, backbone, config: TrainConfig, progress, tensorboard) -> _Outcome:
    extractor = Extractor(backbone, config.device, config.precision, config.engine)
    prepared, features = _extract(dataset, extractor, config, progress)
    _check_train_classes(prepared)
    spec = HeadSpec(config.head, features["train"].shape[1], len(prepared.classes), config.dropout, config.hidden)
    fit = _fit_probe(prepared, features, spec, config, progress)
    for row in fit.history:
        row["stage"] = "probe"
        if tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    tensorboard.add_scalar(key, value, row["epoch"])
    classifier = Classifier(extractor, fit.head, prepared.classes)
    probabilities = {name: classifier.probabilities_from_features(features[name]) for name in ("val", "test")
                     if name in features}
    tensors = {f"head.{k}": v.contiguous() for k, v in fit.head.state_dict().items()}
    return _Outcome(prepared, probabilities, fit.history, fit.best_epoch, tensors, spec, backbone.to_config(),
                    extractor.describe())


def _prepare_images(dataset, backbone, config: TrainConfig, progress) -> tuple[Prepared, dict | None]:
    """The readable images, and for fine-tuning the first stage: a head probed on cached features."""
    if config.mode != "finetune":
        prepared = _check_readable(dataset, backbone, config, progress)
        _check_train_classes(prepared)
        return prepared, None
    extractor = Extractor(backbone, config.device, "auto", config.engine)
    prepared, features = _extract(dataset, extractor, config, progress)
    _check_train_classes(prepared)
    spec = HeadSpec(config.head, features["train"].shape[1], len(prepared.classes), config.dropout, config.hidden)
    fit = _fit_probe(prepared, features, spec, _probe_options(config), progress)
    for row in fit.history:
        row["stage"] = "head"
    return prepared, {"history": fit.history, "head": fit.head.state_dict()}


def _network(backbone, config: TrainConfig, num_classes: int) -> tuple[Network, HeadSpec]:
    """The backbone (a trainable copy; random weights from scratch) and a new head, initialised from the seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = backbone.trainable_copy()
        spec = HeadSpec(config.head, feature_size(model), num_classes, config.dropout, config.hidden)
        return Network(model, backbone, spec.build()), spec


def _run_images(dataset, backbone, config: TrainConfig, progress, tensorboard, staged: StagedRun,
                checkpoint: dict) -> _Outcome:
    device = resolve_device(config.device)
    precision = resolve_train_precision(config.precision, device)
    if config.compile and device.type == "cpu" and precision == "bf16":
        # Inductor's CPU kernels for this network under bf16 autocast crash the process (torch 2.14, seen here).
        log.warning("--compile on a CPU trains in fp32: torch.compile with bf16 autocast crashes there")
        precision = "fp32"
    net, spec = _network(backbone, config, len(dataset.classes))
    if config.mode == "finetune":
        trainable_names(net.backbone, config.unfreeze)  # a bad --unfreeze fails here, before any work
    if "prepared" in checkpoint:
        prepared, first_stage = Prepared.from_state(checkpoint["prepared"]), checkpoint["first_stage"]
    else:
        prepared, first_stage = _prepare_images(dataset, backbone, config, progress)
        checkpoint = {**checkpoint, "prepared": prepared.to_state(), "first_stage": first_stage}
        save_checkpoint(staged.staging, checkpoint)
    if first_stage:
        net.head.load_state_dict(first_stage["head"])
    earlier = first_stage["history"] if first_stage else []
    training = ImageTraining(net, config.mode, config, backbone, device, precision)
    fit = fit_images(training, *prepared.split("train"), *prepared.split("val"), first_epoch_number=len(earlier) + 1,
                     history=earlier, resume_state=checkpoint.get("stage"),
                     save_checkpoint=(lambda state: save_checkpoint(staged.staging, {**checkpoint, "stage": state}))
                     if distributed.current().is_main else None,
                     tensorboard=tensorboard, progress=progress)
    train_paths = prepared.paths["train"]
    prepared.skipped += [Skipped(train_paths[i], f"became unreadable during training: {reason}")
                         for i, reason in sorted(fit.unreadable.items())]
    probabilities = {}
    for name in ("val", "test"):
        paths, targets = prepared.split(name)
        if paths:
            probabilities[name], kept = evaluate_images(net, backbone, paths, device, precision, 32, config.workers,
                                                        config.max_image_pixels)
            if len(kept) != len(paths):
                log.warning("%d %s images became unreadable during training; they are left out of the metrics",
                            len(paths) - len(kept), name)
                lost = sorted(set(range(len(paths))) - set(kept.tolist()))
                prepared.skipped += [Skipped(str(paths[i]), "became unreadable during training") for i in lost]
                prepared.paths[name] = [str(paths[i]) for i in kept]
                prepared.targets[name] = targets[kept].tolist()
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in net.head.state_dict().items()}
    backbone_config = backbone.to_config()
    if config.mode != "head":
        backbone_state = {k: v.detach().cpu().contiguous() for k, v in net.backbone.state_dict().items()}
        tensors.update({f"backbone.{k}": v for k, v in backbone_state.items()})
        backbone_config.update(stored_in_run=True, started_from=backbone.weights_id,
                               weights_id=f"{config.mode}:{state_digest(backbone_state)}")
    return _Outcome(prepared, probabilities, fit.history, fit.best_epoch, tensors, spec, backbone_config,
                    {"engine": "torch", "precision": precision, "device": str(device)})


def train(data: str | Path, *, val: str | Path | None = None, test: str | Path | None = None,
          out: str | Path | None = None, overwrite: bool = False, groups: str | Path | dict | None = None,
          config: TrainConfig | None = None, progress: bool | None = None, report: bool = True,
          doctor: bool = True, **options) -> TrainResult:
    """Train a classifier on DATA and write a run folder (with report.html unless `report=False`); first log the
    doctor's one-paragraph count of data problems (unless `doctor=False`). Options are `TrainConfig` fields, e.g.
    ``head="mlp"``, ``mode="finetune"``.

    Example: ``transferkit.train("photos/", epochs=50).val_accuracy``.
    """
    config = replace(config or TrainConfig(), **options).resolved()
    arguments = {"data": str(data), "val": str(val) if val else None, "test": str(test) if test else None,
                 "groups": str(groups) if isinstance(groups, (str, Path)) else groups, "config": asdict(config)}
    return _train(arguments, config, Path(out) if out else default_run_dir(), overwrite, progress, None, report,
                  doctor)


def resume(run: str | Path, *, progress: bool | None = None, report: bool = True) -> TrainResult:
    """Continue the interrupted run that was being written to `run`, with its own options, from its last
    checkpoint (the end of the last finished epoch)."""
    run = Path(run)
    checkpoint = load_checkpoint(staging_dir(run))
    if checkpoint is None:
        if (run / "config.json").is_file():
            raise RunError(f"{run} finished; there is nothing to resume.")
        raise RunError(f"there is no interrupted run at {run} to resume (no {staging_dir(run) / CHECKPOINT}).")
    arguments = checkpoint["arguments"]
    config = TrainConfig(**arguments["config"]).resolved()
    return _train(arguments, config, run, False, progress, checkpoint, report)


def _train(arguments: dict, config: TrainConfig, run_dir: Path, overwrite: bool, progress: bool | None,
           checkpoint: dict | None, report: bool, doctor: bool = True) -> TrainResult:
    started = time.perf_counter()
    ranks = distributed.setup(config.device)
    if ranks.distributed and not config.use_cache:
        raise DataError("under torchrun the ranks share features through the cache; drop --no-cache.")
    if not ranks.is_main:  # rank 0 speaks for the job
        progress = False
        log.setLevel(logging.ERROR)
    groups = arguments["groups"]
    group_map = read_groups(groups) if isinstance(groups, str) else groups
    dataset = load_dataset(arguments["data"], arguments["val"], arguments["test"], config.val_percent,
                           config.test_percent)
    backbone = open_backbone(config.backbone, config.weights, config.image_size, pretrained=config.mode != "scratch")
    if config.train_size:
        backbone.train_size = config.train_size
    checked = 0
    run_folder = StagedRun(run_dir, overwrite, resume=checkpoint is not None) if ranks.is_main else ScratchRun()
    with run_folder as staged:  # opened first: an unwritable --out fails before any work
        if doctor and checkpoint is None and ranks.is_main:
            checked = _doctor_summary(arguments, config, ranks.distributed, progress)
        if checkpoint is None:
            checkpoint = {"arguments": arguments}
            save_checkpoint(staged.staging, checkpoint)
        if config.mode != "probe":
            log.info("writing %s; if this run is interrupted, continue it with: transferkit train --resume %s",
                     run_dir, run_dir)
        tensorboard = _tensorboard(staged.staging, config.tensorboard)
        try:
            if config.mode == "probe":
                outcome = _run_probe(dataset, backbone, config, progress, tensorboard)
            else:
                outcome = _run_images(dataset, backbone, config, progress, tensorboard, staged, checkpoint)
        finally:
            if tensorboard is not None:
                tensorboard.close()
        prepared = outcome.prepared
        metrics, predictions = _evaluated(prepared, outcome.probabilities, group_map)
        if prepared.skipped:
            log.warning("skipped %d of %d files that could not be used (listed in %s)", len(prepared.skipped),
                        sum(prepared.sizes.values()) + len(prepared.skipped), run_dir / "skipped.txt")
        run_config = {
            "format": RUN_FORMAT, "transferkit_version": __version__, "mode": config.mode,
            "backbone": outcome.backbone_config, "preprocessing": backbone.preprocessing.to_dict(),
            "extractor": outcome.engine, "labels": prepared.classes, "head": asdict(outcome.spec),
            "train": {k: v for k, v in asdict(config).items() if k != "cache_dir"},
            "data": {"source": arguments["data"], "val": arguments["val"], "test": arguments["test"],
                     "val_percent": config.val_percent, "test_percent": config.test_percent,
                     "images": prepared.sizes, "class_counts": prepared.class_counts},
        }
        staged.write_bytes("model.safetensors", safetensors.torch.save(outcome.tensors,
                                                                       metadata={"format": "transferkit"}))
        staged.write_json("config.json", run_config)
        staged.write_text("labels.txt", "\n".join(prepared.classes) + "\n")
        staged.write_text("history.csv", _history_csv(outcome.history))
        staged.write_json("metrics.json", metrics)
        staged.write_text(PREDICTIONS_FILE, predictions_csv(predictions, prepared.classes))
        staged.write_text("skipped.txt", "".join(f"{s.path}\t{s.reason}\n" for s in prepared.skipped))
    return TrainResult(run_dir, prepared.classes, metrics, outcome.history, outcome.best_epoch,
                       prepared.sizes, prepared.skipped, prepared.features_computed + checked,
                       max(0, prepared.features_from_cache - checked),
                       time.perf_counter() - started,
                       _write_report(run_dir, group_map) if report and ranks.is_main else None)


def _doctor_summary(arguments: dict, config: TrainConfig, distributed_run: bool, progress: bool | None) -> int:
    """`transferkit doctor`'s one-paragraph count of problems; returns how many features it computed. The feature
    checks run where training extracts the same features anyway (probe, finetune; one process): on a first run
    they compute them for training, later they cost a cache read."""
    from transferkit.doctor import diagnose

    use_features = config.mode in ("probe", "finetune") and config.use_cache and not distributed_run
    engine = {"device": config.device, "engine": config.engine,
              "precision": config.precision if config.mode == "probe" else "auto"}
    try:
        report = diagnose(arguments["data"], arguments["val"], arguments["test"], config.val_percent,
                          config.test_percent, config.backbone, config.weights, config.image_size,
                          cache_dir=config.cache_dir, use_cache=config.use_cache, use_features=use_features,
                          seed=config.seed,
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
    config = replace(config or TrainConfig(), **options).resolved()
    if distributed.launched_by_torchrun():
        raise DataError("--lr-find runs in one process; run it without torchrun or --nproc.")
    dataset = load_dataset(data, val, test, config.val_percent, config.test_percent)
    backbone = open_backbone(config.backbone, config.weights, config.image_size, pretrained=config.mode != "scratch")
    if config.train_size:
        backbone.train_size = config.train_size
    folder = Path(out) if out else default_run_dir(Path("runs") / "lr-find")
    if config.mode == "probe":
        extractor = Extractor(backbone, config.device, config.precision, config.engine)
        prepared, features = _extract(dataset, extractor, config, progress)
        _check_train_classes(prepared)
        spec = HeadSpec(config.head, features["train"].shape[1], len(prepared.classes), config.dropout,
                        config.hidden)
        finding = lr_range_test_features(spec, features["train"], prepared.split("train")[1], config,
                                         progress is not False)
    else:
        device = resolve_device(config.device)
        prepared, first_stage = _prepare_images(dataset, backbone, config, progress)
        net, _ = _network(backbone, config, len(prepared.classes))
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
