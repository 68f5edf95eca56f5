"""`--mode auto` and `--time-limit`: how much fine-tuning the time left buys, planned from the data and from the
network's throughput measured on this machine.

The rules, and what they rest on (measured on the 2-core CPUs this project is built on; see docs/time-limits.md
and docs/numbers.md):
- Fine-tuning is tried only when the probe leaves room: validation accuracy below `FINETUNE_BELOW` (0.97). On
  ImageNet-like photos the probe on cached features is as good as fine-tuning (hymenoptera: probe 0.974, fine-tuned
  0.961) at a fortieth of the cost; on data unlike ImageNet it is not (flowers100 thumbnails: probe 0.78).
- Resolution from the images' native size: training at the median short side rounded up to a multiple of 32, at
  least `MIN_TRAIN_SIZE` and at most the backbone's training resolution. Upsampling a 100-px photo to 224 px costs
  ~4x the time of 128 px (36.7 against 9.1 img/s forward+backward for lite0 in fp32) and adds no detail.
  Evaluation at ~1.15x the training size (random-resized crops show objects larger than a centre crop does), but
  not beyond the images' own size: a network fine-tuned at 128 px on 128-px photos scored 0.804 / 0.797 / 0.786
  validation accuracy evaluated at 128 / 160 / 192 px (flowers100), and 160 costs 1.6x the time of 128.
- Images smaller than the backbone's training resolution are not upsampled to its test resolution for the probe
  (in every mode that probes: probe, auto): their features are taken at about twice their size (`probe_size_for`,
  `PROBE_UPSCALE`), which measured as good as any larger size and is cheaper.
- Data far from ImageNet (probe validation accuracy under `HARD_BELOW`) trains the whole network at lr 1e-3, the
  backbone at 0.3x (flowers100 at 128 px, epoch 4 of 5: 0.806 validation accuracy, against 0.774 for the backbone
  at 1x with BatchNorm statistics updating at 96 px); closer data keep the gentle defaults (1e-4, the backbone x0.1),
  which protect features that already fit. BatchNorm statistics stay frozen in both (unless --train-bn).
- Epochs: as many as fit in the time left after the final evaluation and the report, at the measured speed with a
  safety margin, at most `MAX_EPOCHS`; the one-cycle schedule is fitted to exactly those epochs. With fewer than
  `MIN_EPOCHS` for the whole network, a smaller resolution, then only the top blocks, are tried; with fewer than 1,
  no fine-tuning.
"""

from __future__ import annotations

import io
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from transferkit.budget import finish_time, format_duration

FINETUNE_BELOW = 0.97
HARD_BELOW = 0.90
MIN_TRAIN_SIZE = 96
# The probe upsamples images smaller than the backbone's training resolution about twice (BiT's HyperRule trains
# images under 96 px at 128-160 px). Measured with every block's features (lite0, logistic regression, validation /
# test): flowers100 (~100 px) at 128 / 160 / 224 / 288 px 0.800 / 0.760, 0.813 / 0.799, 0.790 / 0.804, 0.790 / 0.790;
# the same photos at 32 px, at 96 / 128 / 160 / 224 px 0.789 / 0.782, 0.793 / 0.799, 0.768 / 0.782, 0.789 / 0.780.
# So 2x (224 px for 100-px photos, 96 for 32-px ones): as good as any larger size and up to 9x cheaper than 288.
PROBE_UPSCALE = 2
MIN_EPOCHS = 4
MAX_EPOCHS = 30  # more buys nothing measurable on small sets; the run then ends before its limit
EPOCH_OVERHEAD_SECONDS = 2.0  # per epoch: checkpoint, best weights kept, loaders restarted
STARTUP_SECONDS = 5.0  # once: data-loader workers, first steps
EVAL_SCALE = 1.15
SPEED_MARGIN = 0.8  # the training loop against the network's own limit: 0.81 at 128 px, 0.97 at 224 (measured)
REPORT_SECONDS = 8.0  # writing the run folder and report.html (1-3 s measured), with room to spare
TOP_BLOCKS = 6
SIZE_SAMPLE = 200
# --mode auto without --time-limit: a budget proportional to the data (about 8 epochs of fine-tuning at 32 img/s)
DEFAULT_BUDGET_SECONDS = 60.0
DEFAULT_BUDGET_PER_IMAGE = 0.25


@dataclass(frozen=True)
class FinetunePlan:
    """What the fine-tuning stage of an auto run does, and why."""

    train_size: int
    eval_size: int
    unfreeze: str
    epochs: int
    lr: float
    backbone_lr_mult: float
    images_per_second: float
    eval_images_per_second: float
    seconds: float
    cache_bottom: bool = False
    """The top blocks train on cached activations of the frozen bottom (`topcache`); `seconds` includes caching."""

    def describe(self) -> str:
        what = "the whole network" if self.unfreeze == "all" else f"the top {self.unfreeze.split(':')[1]} blocks"
        what += " on cached activations of the frozen bottom" if self.cache_bottom else ""
        return (f"fine-tuning {what} at {self.train_size} px (evaluated at {self.eval_size} px), {self.epochs} "
                f"epoch{'s' if self.epochs != 1 else ''} "
                f"at ~{self.images_per_second:.0f} img/s, lr {self.lr:g} (backbone x{self.backbone_lr_mult:g}), "
                f"~{format_duration(self.seconds)}, until {finish_time(self.seconds)}")

    def to_dict(self) -> dict:
        return asdict(self)


def native_size(paths: Sequence[Path]) -> int:
    """The median short side of (a sample of) the images, read from their headers alone."""
    from PIL import Image

    from transferkit.data import ImageDecodeError, is_remote, read_item

    step = max(1, len(paths) // SIZE_SAMPLE)
    sides = []
    for path in list(paths)[::step]:
        try:
            with Image.open(io.BytesIO(read_item(path)) if is_remote(str(path)) else path) as image:
                sides.append(min(image.size))
        except (OSError, ImageDecodeError):
            continue
    return int(statistics.median(sides)) if sides else 0


def train_size_for(native: int, backbone_train_size: int) -> int:
    """The training resolution for images whose short side is `native` pixels."""
    size = 32 * math.ceil(max(native, 1) / 32)
    return max(MIN_TRAIN_SIZE, min(size, backbone_train_size))


def eval_size_for(train_size: int, native: int) -> int:
    """Evaluation at ~`EVAL_SCALE` x the training size (FixRes), but not beyond the images' own detail."""
    return max(train_size, min(32 * round(train_size * EVAL_SCALE / 32), 32 * math.ceil(native / 32)))


def probe_size_for(native: int, backbone_train_size: int) -> int | None:
    """The probe's resolution for images whose short side is `native` pixels: None (the backbone's own test
    resolution) unless they are smaller than what the backbone trained at; then `PROBE_UPSCALE` times their size
    (rounded up to a multiple of 32), at least `MIN_TRAIN_SIZE` and at most the training resolution."""
    if not native or native >= backbone_train_size:
        return None
    return max(MIN_TRAIN_SIZE, min(backbone_train_size, 32 * math.ceil(PROBE_UPSCALE * native / 32)))


def epoch_seconds(train_images: int, val_images: int, train_rate: float, eval_rate: float) -> float:
    """One epoch of the whole loop: training plus the validation pass, at the measured limits with a margin."""
    return (train_images / train_rate + val_images / eval_rate) / SPEED_MARGIN + EPOCH_OVERHEAD_SECONDS


def final_seconds(eval_images: int, eval_rate: float) -> float:
    """After training: the final pass over every image (training features are what unknown images are compared
    with; validation and test are evaluated), the run folder and the report."""
    return eval_images / (eval_rate * SPEED_MARGIN) + REPORT_SECONDS + STARTUP_SECONDS


def rates_for(probe_val_accuracy: float) -> tuple[float, float]:
    """(lr, backbone_lr_mult) for data the probe fits this well."""
    return (1e-3, 0.3) if probe_val_accuracy < HARD_BELOW else (1e-4, 0.1)


def plan_finetune(seconds_left: float, train_images: int, val_images: int, eval_images: int, native: int,
                  backbone_train_size: int, probe_val_accuracy: float, measure, train_size: int | None = None,
                  eval_size: int | None = None, lr: float | None = None, top_blocks: int = TOP_BLOCKS,
                  cached_views: int = 0) -> tuple[FinetunePlan | None, str]:
    """The fine-tuning that fits in `seconds_left`, or None and why not.

    `measure(unfreeze, train_size, eval_size, cached)` returns the network's (training, evaluation) images per
    second, and for `cached` (the top blocks on cached activations) also the frozen bottom's, which caching runs at
    (else None). `train_size`, `eval_size` and `lr`, when given, are the user's and are kept. With `cached_views`
    (how many views caching keeps, at most), the last resort is the top blocks on cached activations, else on images.
    """
    rate_lr, backbone_lr_mult = rates_for(probe_val_accuracy)
    size = train_size or train_size_for(native, backbone_train_size)
    sizes = [size] if train_size or size - 32 < MIN_TRAIN_SIZE else [size, size - 32]
    candidates = [("all", s) for s in sizes] + [(f"top-blocks:{top_blocks}", size)]
    best = None
    for unfreeze, candidate_size in candidates:
        cached = unfreeze != "all" and cached_views > 0
        evaluated_at = eval_size or eval_size_for(candidate_size, native)
        train_rate, eval_rate, bottom_rate = measure(unfreeze, candidate_size, evaluated_at, cached)
        per_epoch = epoch_seconds(train_images, val_images, train_rate, eval_rate)
        left = seconds_left - final_seconds(eval_images, eval_rate)
        epochs = min(MAX_EPOCHS, math.floor(left / per_epoch))
        caching = 0.0
        if cached:  # one bottom pass per view (a view per epoch, up to cached_views) and for the validation crops

            def caching_for(count: int) -> float:
                return (min(cached_views, count) * train_images + val_images) / (bottom_rate * SPEED_MARGIN)

            epochs = next((e for e in range(MAX_EPOCHS, 0, -1) if e * per_epoch + caching_for(e) <= left), 0)
            caching = caching_for(max(1, epochs))
        plan = FinetunePlan(candidate_size, evaluated_at, unfreeze, epochs, lr or rate_lr, backbone_lr_mult,
                            train_rate * SPEED_MARGIN, eval_rate, epochs * per_epoch + caching, cached)
        if epochs >= MIN_EPOCHS:
            return plan, ""
        if best is None or plan.epochs > best.epochs:
            best = plan
    if best is not None and best.epochs >= 1:
        return best, ""
    return None, (f"one epoch of fine-tuning needs ~{format_duration(per_epoch)} and only "
                  f"{format_duration(max(0.0, seconds_left))} are left")
