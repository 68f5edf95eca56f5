"""Training on images rather than cached features: the head on augmented images over a frozen backbone, the top of
the backbone fine-tuned, or the whole network from scratch. Checkpointed every epoch; a resumed run replays exactly.

Every random choice is a function of (seed, epoch, sample): the order of an epoch, each image's augmentation and
the dropout masks. So an epoch interrupted half-way is simply run again from its start and gives the same numbers,
whichever worker processes decoded which images.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from transferkit.augment import AugmentedImages, Unreadable, mix_seed, train_transform
from transferkit.budget import Clock, finish_time, format_duration
from transferkit.backbone import Backbone, PixelFeatures
from transferkit.data import ImageDecodeError, decode_image, read_item
from transferkit.errors import DataError
from transferkit import distributed
from transferkit.data import default_workers, iter_prepared, make_preparer
from transferkit.distributed import Ranks
from transferkit.features import check_precision, cpu_has_fast_bf16
from transferkit.head import class_probabilities, count_right, rank, val_score_key
from transferkit.multilabel import is_multilabel, loss_and_map
from transferkit.optim import make_optimizer, make_scheduler
from transferkit.progress import progress_bar
from transferkit.recipe import Recipe, WeightAverage, mix_batch, set_drop_path
from transferkit.topcache import Bottom, first_trained_unit, top_forward
from transferkit.tracking import Trackers

if TYPE_CHECKING:
    from transferkit.config import TrainConfig

TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
log = logging.getLogger(__name__)


class Network(nn.Module):
    """uint8 NHWC pixels -> backbone features -> head logits: the model every image-training mode trains.

    With `cached_from` set (`--cache-bottom`), it is called with the cached output of the frozen bottom instead: the
    activation entering that block and the pooled features of the blocks before it (`topcache`)."""

    def __init__(self, backbone_model: nn.Module, backbone: Backbone, head: nn.Module, multi_label: bool = False):
        super().__init__()
        self.features = PixelFeatures(backbone_model, backbone.preprocessing, backbone.feature_kind)
        self.head = head
        self.cached_from: int | None = None
        self.multi_label = multi_label
        """One sigmoid per class: evaluation gives sigmoid probabilities, not a softmax."""

    @property
    def backbone(self) -> nn.Module:
        return self.features.model

    def forward(self, pixels: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        if pooled is not None:
            return self.head(top_forward(self.backbone, self.cached_from, pixels, pooled))
        return self.head(self.features(pixels))


# ---------------------------------------------------------------------------------------------- what trains


def backbone_blocks(model: nn.Module) -> list[list[str]]:
    """The backbone's parameter names grouped into blocks, input to output, by timm's own `group_matcher`
    (stem, then each residual/MBConv/transformer block; the last block carries the final conv or norm)."""
    from timm.models import group_parameters

    try:
        groups = group_parameters(model, model.group_matcher(coarse=False))
    except (AttributeError, NotImplementedError):
        groups = {}
        for name, _ in model.named_parameters():
            groups.setdefault(name.split(".")[0], []).append(name)
    return [names for names in groups.values() if names]


def trainable_names(model: nn.Module, unfreeze: str) -> list[str]:
    """Backbone parameter names that `unfreeze` selects: all, top-blocks:N, or from:NAME_OR_INDEX.

    from:NAME unfreezes the parameter (or module) NAME and everything after it; from:INDEX counts blocks as
    `backbone_blocks` gives them (negative counts from the top).
    """
    names = [name for name, _ in model.named_parameters()]
    blocks = backbone_blocks(model)
    if unfreeze == "all":
        return names
    kind, _, value = unfreeze.partition(":")
    if kind == "top-blocks":
        try:
            count = int(value)
        except ValueError:
            count = 0
        if not 1 <= count <= len(blocks):
            raise DataError(f"--unfreeze top-blocks:N needs N between 1 and {len(blocks)} for this backbone, "
                            f"not {value!r}.")
        return [name for block in blocks[-count:] for name in block]
    if kind == "from":
        try:
            index = int(value)
        except ValueError:
            index = None
        if index is not None:
            if not -len(blocks) <= index < len(blocks):
                raise DataError(f"--unfreeze-from {index} is out of range: this backbone has {len(blocks)} blocks "
                                f"(0 to {len(blocks) - 1}, or negative from the top).")
            return [name for block in blocks[index:] for name in block]
        first = next((i for i, name in enumerate(names) if name == value or name.startswith(value + ".")), None)
        if first is None:
            modules = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in names))
            examples = ", ".join(modules[-4:])
            raise DataError(f"--unfreeze-from {value!r} names no layer of this backbone; give a block index "
                            f"(0 to {len(blocks) - 1}) or a module name such as {examples}.")
        return names[first:]
    raise DataError(f"--unfreeze must be all, top-blocks:N or from:LAYER, not {unfreeze!r}.")


def set_train_mode(net: Network, mode: str, train_bn: bool) -> None:
    """Train mode where weights learn; frozen layers, and BatchNorm unless `train_bn`, run as at inference.

    Fine-tuning a few hundred images with BatchNorm statistics updating ruins what the backbone learned (the
    Keras transfer-learning guide's warning), so they stay frozen by default.
    """
    net.train()
    if mode == "head":
        net.backbone.eval()
    elif mode == "finetune":
        for module in net.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                trainable = any(p.requires_grad for p in module.parameters(recurse=False))
                if not (train_bn and trainable):
                    module.eval()


# ---------------------------------------------------------------------------------------------- images in


class EpochSampler(Sampler):
    """(epoch, index) pairs in a shuffled order fixed by (seed, epoch); weighted draws with replacement when
    `weights` are given (the class-balancing sampler)."""

    def __init__(self, size: int, seed: int, weights: np.ndarray | None = None, ranks: Ranks = Ranks()):
        self.size, self.seed, self.epoch, self.ranks = size, seed, 1, ranks
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Under DDP each rank takes every world_size-th image of the shared order, all ranks the same number
        (like DistributedSampler with drop_last), so that they step together."""
        return self.size // self.ranks.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 1))
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        return iter([(self.epoch, int(i)) for i in order[self.ranks.rank::self.ranks.world_size][:len(self)]])


class Batch(NamedTuple):
    pixels: torch.Tensor | tuple[torch.Tensor, ...] | None  # None when no image of the batch could be read
    targets: torch.Tensor | None
    unreadable: list[Unreadable]


def collate(items: list) -> Batch:
    """A batch of pixels, or of tuples of inputs (cached activations and pooled features) stacked element-wise."""
    unreadable = [item for item in items if isinstance(item, Unreadable)]
    items = [item for item in items if not isinstance(item, Unreadable)]
    if not items:
        return Batch(None, None, unreadable)
    inputs = [x for x, _ in items]
    stacked = (tuple(torch.stack(parts) for parts in zip(*inputs)) if isinstance(inputs[0], tuple)
               else torch.stack(inputs))
    return Batch(stacked, torch.as_tensor(np.array([target for _, target in items])), unreadable)


def check_images(paths: Sequence[Path], max_pixels: int, decode_side: int, workers: int | None = None,
                 progress: bool | None = None) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Indices of the images that decode, and (index, reason) for those that do not: checked once, up front."""
    from concurrent.futures import ThreadPoolExecutor

    def check(path: Path) -> str | None:
        try:
            decode_image(read_item(path), max_pixels, (decode_side, decode_side))
            return None
        except ImageDecodeError as err:
            return str(err)

    bar = progress_bar(len(paths), "Checking images", "img", progress)
    errors = []
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        for error in pool.map(check, paths):
            errors.append(error)
            bar.update()
    bar.close()
    kept = np.array([i for i, error in enumerate(errors) if error is None], dtype=np.int64)
    return kept, [(i, error) for i, error in enumerate(errors) if error is not None]


def _quiet(progress: bool | None) -> bool:
    return progress is False or (progress is None and not sys.stderr.isatty())


# ---------------------------------------------------------------------------------------------- precision


def resolve_train_precision(precision: str, device: torch.device, cached_top: bool = False) -> str:
    """auto: bf16 autocast on CPUs with native bf16 and on GPUs that have it, fp16 (with loss scaling) on older
    GPUs, fp32 elsewhere. On a CPU the top blocks on cached activations (`cached_top`) train in fp32: their small
    maps ran slower under bf16 autocast here (lite0, top 6 blocks: 165 against 247 img/s at 128 px, 81 against 114
    at 224), where the whole network ran faster (61 against 44 img/s at 128 px)."""
    if precision not in TRAIN_PRECISIONS:
        raise DataError(f"precision must be one of {', '.join(TRAIN_PRECISIONS)}, not {precision!r}.")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() and not cached_top else "fp32"
    check_precision(precision, device)
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class ImageFitResult:
    history: list[dict]
    best_epoch: int
    unreadable: dict[int, str] = field(default_factory=dict)
    """Training images (by index) that could not be read in some epoch, with the reason."""


@dataclass
class CachedSource:
    """What training on cached activations reads instead of images (`topcache`): the training views, and a function
    that scores the validation split."""

    dataset: Dataset
    evaluate: Callable[[nn.Module], tuple[np.ndarray, np.ndarray]]


@dataclass
class ImageTraining:
    """One image-training stage, with everything needed to checkpoint and resume it."""

    net: Network
    mode: str
    options: TrainConfig
    backbone: Backbone
    device: torch.device
    precision: str
    source: CachedSource | None = None
    recipe: Recipe = Recipe()


def parameter_groups(net: Network, mode: str, unfreeze: str, lr: float, backbone_lr_mult: float) -> list[dict]:
    """Sets requires_grad for the mode and returns optimiser groups: the head at `lr`, the backbone at
    `lr * backbone_lr_mult` when fine-tuning, everything at `lr` from scratch."""
    net.backbone.requires_grad_(False)
    head = {"params": list(net.head.parameters()), "lr": lr}
    if mode == "head":
        return [head]
    if mode == "scratch":
        net.backbone.requires_grad_(True)
        return [{"params": list(net.parameters()), "lr": lr}]
    selected = set(trainable_names(net.backbone, unfreeze))
    params = [p for name, p in net.backbone.named_parameters() if name in selected]
    for p in params:
        p.requires_grad_(True)
    return [head, {"params": params, "lr": lr * backbone_lr_mult}]


def measure_speed(net: Network, mode: str, unfreeze: str, train_bn: bool, train_size: int, eval_size: int,
                  device: torch.device, precision: str, batch_size: int = 32,
                  cached: bool = False) -> tuple[float, float, float | None]:
    """Images per second of a training step (forward, backward through what trains, optimiser) at `train_size` and
    of evaluation at `eval_size`, on random pixels, once warm: the network's own limit, on which a plan
    for a time limit is built. `cached`: the trained top on cached activations of the frozen bottom (`topcache`),
    and then also the bottom's own rate (what caching runs at; else None). Runs on a copy; `net` is left as it
    was."""
    trial = copy.deepcopy(net).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for group in parameter_groups(trial, mode, unfreeze, 0.0, 0.0)
                                 for p in group["params"]], lr=0.0)
    targets = torch.zeros(batch_size, dtype=torch.long, device=device)
    bottom = None
    if cached:
        trial.cached_from = first_trained_unit(trial.backbone, set(trainable_names(trial.backbone, unfreeze)))
        bottom = Bottom(trial.features, trial.cached_from)

    def inputs(size: int) -> tuple[torch.Tensor, ...]:
        pixels = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, device=device)
        if bottom is None:
            return (pixels,)
        with torch.inference_mode():
            activation, pooled = bottom(pixels)
        return activation.clone().contiguous(memory_format=torch.channels_last), pooled.clone()

    pixels = inputs(train_size)

    def train_step() -> None:
        with autocast(device, precision):
            loss = nn.functional.cross_entropy(trial(*pixels).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def eval_step() -> None:
        with torch.inference_mode(), autocast(device, precision):
            trial(*eval_pixels)

    def bottom_step() -> None:
        with torch.inference_mode():
            bottom(raw)

    def seconds(step: Callable[[], None], warm_up: int = 2, timed: int = 3) -> float:
        """Seconds per step once warm: the first calls pay for kernel selection and allocation (one warm-up step
        and one timed step read 30% slow here)."""
        for _ in range(warm_up):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(timed):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - started) / timed

    set_train_mode(trial, mode, train_bn)
    train_rate = batch_size / seconds(train_step)
    trial.eval()
    eval_pixels = inputs(eval_size)
    eval_rate = batch_size / seconds(eval_step)
    if bottom is None:
        return train_rate, eval_rate, None
    raw = torch.randint(0, 256, (batch_size, train_size, train_size, 3), dtype=torch.uint8, device=device)
    return train_rate, eval_rate, batch_size / seconds(bottom_step)


def evaluate_images(net: Network, backbone: Backbone, paths: Sequence[Path], device: torch.device, precision: str,
                    batch_size: int, workers: int | None, max_pixels: int, desc: str = "Evaluating",
                    progress: bool | None = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class probabilities (the head's own) and the backbone features the head saw, at the evaluation preprocessing:
    (probabilities, features, indices of the readable images). `progress` as for `progress_bar` (off by default:
    validation after each epoch has the epoch's own line)."""
    net.eval()
    probabilities, features, kept = [], [], []
    prepare = make_preparer(backbone.preprocessing, max_pixels)
    bar = progress_bar(len(paths), desc, "img", progress)
    with torch.inference_mode(), autocast(device, precision):
        for batch in iter_prepared(paths, prepare, batch_size, workers or default_workers()):
            bar.update(len(batch))
            good = [(i, p.pixels) for i, p in batch if p.pixels is not None]
            if not good:
                continue
            pixels = torch.from_numpy(np.stack([x for _, x in good])).to(device)
            seen = net.features(pixels)
            probabilities.append(class_probabilities(net.head(seen).float(), net.multi_label).cpu().numpy())
            features.append(seen.float().cpu().numpy())
            kept += [i for i, _ in good]
    bar.close()
    classes = net.head[-1].out_features
    return (np.concatenate(probabilities) if probabilities else np.empty((0, classes), np.float32),
            np.concatenate(features) if features else np.empty((0, 0), np.float32), np.array(kept, dtype=np.int64))


def _loss_and_accuracy(probabilities: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(log loss, accuracy); for multi-label targets (binary cross-entropy, macro mAP)."""
    if is_multilabel(targets):
        return loss_and_map(probabilities, targets)
    picked = probabilities[np.arange(len(targets)), targets]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean()), float((probabilities.argmax(1) == targets).mean())


class _Stage:
    """The moving parts of one image-training stage: data loader, loss, optimiser, loss scaler, one step."""

    def __init__(self, training: ImageTraining, paths: Sequence[Path], targets: np.ndarray, schedule: str):
        from transferkit.augment import decode_size
        from transferkit.head import class_weights, make_criterion, sampling_weights

        self.training = training
        net, options, device = training.net, training.options, training.device
        groups = parameter_groups(net, training.mode, options.unfreeze, options.lr, options.backbone_lr_mult)
        set_drop_path(net.backbone, training.recipe.drop_path)
        net.to(device, memory_format=torch.channels_last)
        self.average = WeightAverage(net, training.recipe.ema) if training.recipe.ema else None
        self.mixing = np.random.default_rng(0)  # set_epoch seeds it anew for every epoch
        size, preprocessing = training.backbone.train_size, training.backbone.preprocessing
        if training.source is not None:
            dataset = training.source.dataset
        else:
            dataset = AugmentedImages(paths, targets, train_transform(options.augment, size, preprocessing),
                                      decode_size(options.augment, size), options.max_image_pixels, options.seed)
        num_classes = net.head[-1].out_features
        weights = class_weights(targets, num_classes)
        ranks = distributed.current()
        sample_weights = sampling_weights(targets, weights, options.balance)
        self.sampler = EpochSampler(len(dataset), options.seed,
                                    None if sample_weights is None else sample_weights.numpy(), ranks)
        # DDP averages gradients over ranks: each step is one of batch_size x world_size images.
        gpu = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else None
        self.model = nn.parallel.DistributedDataParallel(net, device_ids=gpu) if ranks.distributed else net
        if options.compile:
            self.model = torch.compile(self.model)
        workers = default_workers() if options.workers is None else options.workers
        if training.source is not None:
            workers = 0  # memory-mapped activations: reading them is cheaper than passing them between processes
        # its own generator: starting workers must not draw from the global RNG the dropout masks come from
        self.loader = DataLoader(dataset, batch_size=options.batch_size, sampler=self.sampler, num_workers=workers,
                                 collate_fn=collate, persistent_workers=workers > 0,
                                 pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
                                 generator=torch.Generator().manual_seed(options.seed))
        self.criterion = make_criterion(targets, weights.to(device) if options.balance == "weights" else None,
                                        options.label_smoothing)
        self.optimizer = make_optimizer(groups, options.optimizer, options.lr, options.decay,
                                        options.momentum, options.nesterov)
        self.steps_per_epoch = math.ceil(len(self.sampler) / options.batch_size)
        self.scheduler = make_scheduler(self.optimizer, schedule, options.epochs, self.steps_per_epoch,
                                        options.warmup_epochs, options.lr_steps, options.lr_gamma)
        self.scaler = torch.amp.GradScaler(device.type, enabled=training.precision == "fp16")

    def step(self, batch: Batch) -> tuple[float, int]:
        """One optimiser step on a batch: (mean loss, number right)."""
        net, device, options = self.training.net, self.training.device, self.training.options
        inputs = batch.pixels if isinstance(batch.pixels, tuple) else (batch.pixels,)
        inputs = [x.to(device, non_blocking=True) for x in inputs]
        if len(inputs) > 1:  # cached activations, NCHW: channels_last as the network runs
            inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
        targets = batch.targets.to(device, non_blocking=True)
        mixup = self.training.recipe.mixup
        if mixup:
            inputs, partner, weight = mix_batch(inputs, mixup, self.mixing)
        with autocast(device, self.training.precision):
            logits = self.model(*inputs)
        loss = self.criterion(logits.float(), targets)
        if mixup:
            loss = weight * loss + (1 - weight) * self.criterion(logits.float(), targets[partner])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if options.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), options.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.average is not None:
            self.average.update(net)
        if mixup and weight < 0.5:  # right means the larger share of the mix
            targets = targets[partner]
        return loss.item(), count_right(logits.detach().float(), targets)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.mixing = np.random.default_rng(mix_seed(self.training.options.seed, epoch, 4))

    @property
    def evaluated(self) -> nn.Module:
        """What is evaluated and kept: the weight average when the recipe keeps one, else the network itself."""
        return self.training.net if self.average is None else self.average.module

    def state_dict(self) -> dict:
        state = {"model": self.training.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
        return state if self.average is None else {**state, "average": self.average.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.training.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])


def fit_images(training: ImageTraining, train_paths: Sequence[Path], train_targets: np.ndarray,
               val_paths: Sequence[Path], val_targets: np.ndarray, *, first_epoch_number: int = 1,
               history: list[dict] | None = None, resume_state: dict | None = None,
               save_checkpoint: Callable[[dict], None] | None = None, tracker: Trackers | None = None,
               progress: bool | None = None, clock: Clock | None = None,
               reserve_seconds: float = 0.0) -> ImageFitResult:
    """Train `training.net` for `options.epochs` epochs; checkpoint after each one; early-stop on the monitor and
    keep the best epoch's weights. `first_epoch_number` numbers this stage's epochs after an earlier stage's, so
    the history is one table. With a `clock` that has a limit, no epoch starts that would end less than
    `reserve_seconds` before it (judged by the last epoch's length): a safety net under a plan whose schedule was
    fitted to the time.
    """
    net, options, device, precision = training.net, training.options, training.device, training.precision
    stage = _Stage(training, train_paths, train_targets, options.schedule)
    history = list(history or [])
    best = {"score": (math.inf,), "epoch": 0, "model": copy.deepcopy(net.state_dict())}
    start = 1
    if resume_state is not None:
        stage.load_state_dict(resume_state)
        best, history, start = resume_state["best"], resume_state["history"], resume_state["epoch"] + 1
        best["score"] = tuple(best["score"])
    has_val = len(val_paths) > 0
    unreadable: dict[int, str] = {}
    eval_batch = 256 if device.type == "cuda" else 32
    bar = progress_bar((options.epochs - start + 1) * stage.steps_per_epoch, training.mode, "batch", progress)
    last_epoch_seconds = 0.0
    try:
        for epoch in range(start, options.epochs + 1):
            if has_val and epoch - 1 - best["epoch"] >= options.patience:
                break
            if clock is not None and last_epoch_seconds and clock.left() - reserve_seconds < last_epoch_seconds:
                log.warning("stopping after epoch %d of %d: another epoch (%s) would end after the time limit",
                            epoch - 1, options.epochs, format_duration(last_epoch_seconds))
                break
            epoch_started = time.perf_counter()
            bar.set_description(f"{training.mode} epoch {epoch}/{options.epochs}")
            stage.set_epoch(epoch)
            torch.manual_seed(mix_seed(options.seed, epoch, 3))  # dropout masks
            set_train_mode(net, training.mode, options.train_bn)
            started, seen, total_loss, correct = time.perf_counter(), 0, 0.0, 0
            lr_of_last_batch = stage.optimizer.param_groups[0]["lr"]
            for batch in stage.loader:
                for index, reason in batch.unreadable:
                    if index not in unreadable:
                        log.warning("%s cannot be read any more (%s); training goes on without it",
                                    train_paths[index], reason)
                    unreadable[index] = reason
                if batch.pixels is not None:
                    lr_of_last_batch = stage.optimizer.param_groups[0]["lr"]
                    loss, right = stage.step(batch)
                    stage.scheduler.step()
                    seen += len(batch.targets)
                    total_loss += loss * len(batch.targets)
                    correct += right
                bar.update()
                bar.set_postfix(loss=f"{total_loss / max(seen, 1):.3f}", acc=f"{correct / max(seen, 1):.3f}",
                                lr=f"{lr_of_last_batch:.2g}")
            seconds = time.perf_counter() - started
            total_loss, correct, seen = distributed.sum_over_ranks(total_loss, correct, seen)
            row = {"stage": training.mode, "epoch": first_epoch_number + epoch - 1,
                   "train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                   "lr": lr_of_last_batch, "seconds": round(seconds, 3),
                   "images_per_second": round(seen / seconds, 2)}
            if has_val:
                if training.source is not None:
                    probabilities, kept = training.source.evaluate(stage.evaluated)
                else:
                    probabilities, _, kept = evaluate_images(stage.evaluated, training.backbone, val_paths, device,
                                                             precision, eval_batch, options.workers,
                                                             options.max_image_pixels)
                multi = is_multilabel(val_targets)
                row["val_loss"], row[val_score_key(multi)] = _loss_and_accuracy(probabilities, val_targets[kept])
                score = rank(row, options.monitor, options.monitored, multi)
                if score < best["score"]:
                    best = {"score": score, "epoch": epoch, "model": copy.deepcopy(stage.evaluated.state_dict())}
            else:
                best = {"score": (0.0,), "epoch": epoch,
                        "model": None if stage.average is None else copy.deepcopy(stage.evaluated.state_dict())}
            history.append(row)
            if tracker is not None:
                tracker.epoch(row)
            if save_checkpoint is not None:
                save_checkpoint({**stage.state_dict(), "epoch": epoch, "best": best, "history": history})
            last_epoch_seconds = time.perf_counter() - epoch_started
            if progress is not False:
                left = (options.epochs - epoch) * last_epoch_seconds
                bar.write(_epoch_line(row, epoch, options.epochs, left), file=sys.stderr)
    finally:
        bar.close()
    if best["model"] is not None:
        net.load_state_dict(best["model"])
    net.eval()
    return ImageFitResult(history, first_epoch_number + best["epoch"] - 1, unreadable)


def lr_range_test_images(training: ImageTraining, paths: Sequence[Path], targets: np.ndarray,
                         progress: bool | None = None):
    """The learning-rate range test on augmented images (the model is trained in place: use a throwaway one)."""
    from transferkit.optim import lr_range_test

    stage = _Stage(training, paths, targets, "constant")
    batches = batches_forever(stage.loader, stage.sampler)
    ratios = [group["lr"] / training.options.lr for group in stage.optimizer.param_groups]
    set_train_mode(training.net, training.mode, training.options.train_bn)

    def step(lr: float) -> float:
        for group, ratio in zip(stage.optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        return stage.step(next(batches))[0]

    return lr_range_test(step, progress=not _quiet(progress))


def _epoch_line(row: dict, epoch: int, epochs: int, seconds_left: float) -> str:
    score = "val mAP" if "val_map" in row else "val accuracy"
    val = (f", val loss {row['val_loss']:.4f}, {score} {row.get('val_map', row.get('val_accuracy')):.4f}"
           if "val_loss" in row else "")
    left = f"; ~{format_duration(seconds_left)} left (until {finish_time(seconds_left)})" if seconds_left else ""
    return (f"{row['stage']} epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f}, accuracy "
            f"{row['train_accuracy']:.4f}{val}, {row['images_per_second']} img/s{left}")


def batches_forever(loader: DataLoader, sampler: EpochSampler) -> Iterator[Batch]:
    epoch = 1
    while True:
        sampler.set_epoch(epoch)
        yield from (batch for batch in loader if batch.pixels is not None)
        epoch += 1
