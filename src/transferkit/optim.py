"""Optimisers and learning-rate schedules shared by every training mode (stepped once per batch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from transferkit.errors import DataError

OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")
PROBE_OPTIMIZERS = ("lbfgs", *OPTIMIZERS)  # lbfgs: a linear head on cached features, full batch (head.fit_linear_lbfgs)
SCHEDULES = ("constant", "step", "cosine", "onecycle")


def _check_optimizer(name: str, allowed: tuple[str, ...] = OPTIMIZERS) -> None:
    if name not in allowed:
        raise DataError(f"optimizer must be one of {', '.join(allowed)}, not {name!r}.")


def check_choices(optimizer: str, schedule: str, lr_steps: Iterable[int], epochs: int | None) -> None:
    """One-line errors for option values a user can get wrong, before any work starts."""
    _check_optimizer(optimizer, PROBE_OPTIMIZERS)
    if schedule not in SCHEDULES:
        raise DataError(f"schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}.")
    steps = list(lr_steps)
    beyond_the_end = epochs is not None and bool(steps) and steps[-1] > epochs
    if schedule == "step" and (not steps or steps != sorted(steps) or steps[0] < 1 or beyond_the_end):
        raise DataError(f"--lr-steps must be increasing epochs between 1 and {epochs or 'the last'} (e.g. 6,9) with "
                        f"--schedule step, not {','.join(map(str, steps)) or 'nothing'}.")


def make_optimizer(groups: list[dict], name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                   nesterov: bool = False) -> torch.optim.Optimizer:
    """`groups` are parameter groups; each may carry its own `lr` (e.g. a backbone at a fraction of the head's)."""
    _check_optimizer(name)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, steps_per_epoch: int,
                   warmup_epochs: float = 0.0, lr_steps: Iterable[int] = (), lr_gamma: float = 0.1):
    """A per-batch scheduler: linear warm-up over `warmup_epochs`, then the schedule.

    step: multiply by `lr_gamma` at each epoch in `lr_steps` (torchvision's reference recipe); cosine: decay to 0
    by the last epoch; onecycle: torch's OneCycleLR, warming up for `warmup_epochs` (default 30% of training).
    """
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, round(warmup_epochs * steps_per_epoch))
    if schedule == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total,
                                                   pct_start=warmup / total if warmup else 0.3)
    milestones = sorted(int(epoch) * steps_per_epoch for epoch in lr_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "step":
            return lr_gamma ** sum(step >= m for m in milestones)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class LRFinding:
    """A learning-rate range test: the smoothed loss after a step at each rate, and the suggested rate."""

    lrs: list[float]
    losses: list[float]
    suggestion: float

    def to_rows(self) -> list[dict]:
        return [{"lr": lr, "loss": loss} for lr, loss in zip(self.lrs, self.losses)]


def lr_range_test(step: Callable[[float], float], start: float = 1e-7, end: float = 10.0, steps: int = 100,
                  smoothing: float = 0.98, diverge: float = 4.0, progress: bool = False) -> LRFinding:
    """Leslie Smith's range test as fastai's lr_find runs it: one optimiser step at each of `steps` rates spaced
    geometrically from `start` to `end`, stopping once the smoothed loss exceeds `diverge` times its minimum.

    `step(lr)` trains one batch at `lr` and returns its loss. The suggestion is the rate where the smoothed loss
    falls fastest (against log lr) before its minimum, the usual "steepest point" reading of the curve.
    """
    from tqdm.auto import tqdm

    lrs, losses = [], []
    average, best = 0.0, math.inf
    for i in tqdm(range(steps), desc="Learning-rate range test", unit="step", disable=not progress):
        lr = start * (end / start) ** (i / (steps - 1))
        loss = step(lr)
        if not math.isfinite(loss):
            break
        average = smoothing * average + (1 - smoothing) * loss
        smoothed = average / (1 - smoothing ** (i + 1))
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > diverge * best and i > steps // 10:
            break
    if len(lrs) < 3:
        raise DataError("the learning-rate range test diverged at once; check the data and try a smaller --lr.")
    lowest = int(np.argmin(losses))
    skip = steps // 10  # the first smoothed values rest on a handful of batches
    if lowest - skip < 3:
        return LRFinding(lrs, losses, lrs[lowest] / 10)
    slopes = np.gradient(np.array(losses[skip:lowest + 1]), np.log(lrs[skip:lowest + 1]))
    return LRFinding(lrs, losses, lrs[skip + int(np.argmin(slopes))])
