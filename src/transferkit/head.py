"""The new classification head, trained on cached backbone features in seconds."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from transferkit import distributed
from transferkit.errors import DataError
from transferkit.multilabel import bce_loss, is_multilabel, loss_and_map, positive_weights, sigmoid
from transferkit.progress import progress_bar
from transferkit.optim import LRFinding, check_choices, lr_range_test, make_optimizer, make_scheduler

HEAD_KINDS = ("linear", "mlp")
MONITORS = ("val_loss", "val_accuracy")
BALANCES = ("none", "weights", "sampler")
# The probe's default fit: a linear head by L-BFGS on the whole training set (a convex problem: a few hundred
# full-batch steps, no learning rate, schedule or epoch count to get right), for each weight decay below from the
# strongest to the weakest (each fit starting from the one before), on every block's features and on the last
# block's alone; validation picks the pair. On flowers100 (lite0, 224 px) the chosen decay was 1e-4 with every block
# (validation 0.790, test 0.804) and 3e-5 for the last block alone (0.749 / 0.764); on hymenoptera (288 px) 3e-4 for
# the last block (0.974) against 0.967 with every block. The grid spans those choices by half decades.
PROBE_WEIGHT_DECAYS = (3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
DEFAULT_PROBE_WEIGHT_DECAY = 1e-4  # without validation images to choose by
MAX_POSITIVE_WEIGHT = 100.0
"""--balance weights on multi-label data weighs each class's positives by negatives / positives, at most this much (a
class with one positive in 10,000 images would otherwise weigh it 10,000 times)."""
PROBE_PARTS = ("blocks", "last")


@dataclass(frozen=True)
class HeadSpec:
    kind: str = "linear"
    in_features: int = 0
    num_classes: int = 0
    dropout: float = 0.2
    hidden: int = 512
    multi_label: bool = False
    """One sigmoid per class (several labels an image) instead of one softmax over the classes."""

    def build(self) -> nn.Sequential:
        if self.kind == "linear":
            return nn.Sequential(nn.Dropout(self.dropout), nn.Linear(self.in_features, self.num_classes))
        if self.kind == "mlp":
            return nn.Sequential(nn.Linear(self.in_features, self.hidden), nn.ReLU(), nn.Dropout(self.dropout),
                                 nn.Linear(self.hidden, self.num_classes))
        raise ValueError(f"head must be one of {', '.join(HEAD_KINDS)}, not {self.kind!r}")


DEFAULT_WEIGHT_DECAY = 1e-4


@dataclass(frozen=True)
class FitOptions:
    """How a head (or, through TrainConfig, a network) is trained. `optimizer="lbfgs"`: a linear head fitted by
    L-BFGS on cached features (`fit_linear_lbfgs`). `weight_decay` None: chosen on validation by L-BFGS,
    DEFAULT_WEIGHT_DECAY for the other optimizers; `monitor` None: val_accuracy for L-BFGS (which picks among a few
    fits, where the accuracy is what is reported), val_loss for the others (epoch by epoch, smoother)."""

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float | None = None
    label_smoothing: float = 0.0
    patience: int = 10
    balance: str = "none"
    seed: int = 0
    optimizer: str = "adamw"
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "constant"
    lr_steps: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    monitor: str | None = None

    @property
    def decay(self) -> float:
        """The weight decay an iterative optimizer uses."""
        return DEFAULT_WEIGHT_DECAY if self.weight_decay is None else self.weight_decay

    @property
    def monitored(self) -> str:
        """What picks the best epoch (or, for L-BFGS, the best fit)."""
        return self.monitor or ("val_accuracy" if self.optimizer == "lbfgs" else "val_loss")

    def check(self) -> None:
        check_choices(self.optimizer, self.schedule, self.lr_steps, self.epochs)
        if self.monitor is not None and self.monitor not in MONITORS:
            raise DataError(f"monitor must be one of {', '.join(MONITORS)}, not {self.monitor!r}.")
        if self.balance not in BALANCES:
            raise DataError(f"balance must be one of {', '.join(BALANCES)}, not {self.balance!r}.")


@dataclass
class FitResult:
    head: nn.Sequential
    history: list[dict]
    best_epoch: int
    chosen: dict = field(default_factory=dict)
    """What validation chose for an L-BFGS probe: the features used (`blocks`: every block; `last`: the last
    block's alone) and the weight decay."""


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (sklearn's 'balanced'): every class weighs the same in the loss. For multi-label
    targets: each class's negatives / positives, binary cross-entropy's positive weight."""
    if is_multilabel(targets):
        return torch.from_numpy(positive_weights(targets)).clamp(max=MAX_POSITIVE_WEIGHT)
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(targets) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def sampling_weights(targets: np.ndarray, weight: torch.Tensor, balance: str) -> torch.Tensor | None:
    """Per image, how likely the class-balancing sampler draws it (None: every image once an epoch)."""
    if balance != "sampler":
        return None
    if is_multilabel(targets):
        raise DataError("--balance sampler draws images by their one class; for multi-label data use --balance "
                        "weights (each class's positives weighted by its negatives / positives).")
    return weight[torch.as_tensor(targets)].double()


def class_probabilities(logits: torch.Tensor, multi_label: bool, temperature: float = 1.0) -> torch.Tensor:
    """A head's probabilities: one sigmoid per class for a multi-label head (no temperature: its thresholds
    decide), else the softmax over the classes of the logits divided by `temperature`."""
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits / temperature, dim=1)


def as_targets(targets: np.ndarray) -> torch.Tensor:
    """Class indices as int64, multi-label 0/1 matrices as float32."""
    return torch.as_tensor(targets, dtype=torch.float32 if is_multilabel(targets) else torch.long)


def check_label_smoothing(targets: np.ndarray, label_smoothing: float) -> None:
    if label_smoothing and is_multilabel(targets):
        raise DataError("label smoothing applies to one label an image; drop --label-smoothing for multi-label data.")


def make_criterion(targets: np.ndarray, weight: torch.Tensor | None, label_smoothing: float = 0.0):
    """`loss(logits, targets)`: cross-entropy for class indices, binary cross-entropy (one sigmoid per class) for
    multi-label targets; `weight` balances the classes (for multi-label: the positives' weight)."""
    check_label_smoothing(targets, label_smoothing)
    if is_multilabel(targets):
        return lambda logits, y: bce_loss(logits, y, None if weight is None else weight.to(logits.device))
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def loss_and_score(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) of class-index targets; (binary cross-entropy, macro mAP) of multi-label targets."""
    if y.ndim == 2:
        return loss_and_map(sigmoid(logits.float().numpy()), y.numpy())
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def count_right(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Images whose answer is right: the top class, or for multi-label every label at 0.5."""
    if y.ndim == 2:
        return int(((logits >= 0) == (y > 0.5)).all(1).sum().item())
    return int((logits.argmax(1) == y).sum().item())


def val_score_key(multi_label: bool) -> str:
    """The history column of the validation score: accuracy, or for multi-label the macro mAP."""
    return "val_map" if multi_label else "val_accuracy"


def rank(row: dict, monitor: str | None, default: str, multi_label: bool) -> tuple[float, ...]:
    """How good an epoch's (or fit's) validation row is, lower first: by loss when `monitor` (else `default`) is
    val_loss, else by the score (accuracy; for multi-label always the macro mAP unless val_loss is asked for by name)
    with ties broken by loss."""
    monitored = monitor or ("val_accuracy" if multi_label else default)
    if monitored == "val_loss":
        return (row["val_loss"],)
    return (-row[val_score_key(multi_label)], row["val_loss"])


def _evaluate(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    head.eval()
    with torch.inference_mode():
        return loss_and_score(head(x), y)


def fit_head(spec: HeadSpec, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray | None = None,
             val_y: np.ndarray | None = None, options: FitOptions = FitOptions(),
             progress: bool | None = None, initial: dict[str, torch.Tensor] | None = None,
             last_block: int | None = None) -> FitResult:
    """Build and train a head (from the weights `initial` when given); with validation data, stop early on
    `options.monitor` and keep the best epoch. `optimizer="lbfgs"` fits a linear head by L-BFGS instead
    (`fit_linear_lbfgs`); `last_block` is then the width of the features' last block (None: one block).

    Initialisation and training run in a forked RNG state seeded by `options.seed`: a run is reproducible whatever
    ran before it, and the caller's RNG is left untouched.
    """
    if options.optimizer == "lbfgs":
        return fit_linear_lbfgs(spec, train_x, train_y, val_x, val_y, options, progress, initial, last_block)
    x, y = torch.as_tensor(train_x, dtype=torch.float32), as_targets(train_y)
    has_val = val_x is not None and len(val_x) > 0
    vx = torch.as_tensor(val_x, dtype=torch.float32) if has_val else None
    vy = as_targets(val_y) if has_val else None
    weight = class_weights(train_y, spec.num_classes)
    sample_weights = sampling_weights(train_y, weight, options.balance)
    criterion = make_criterion(train_y, weight if options.balance == "weights" else None, options.label_smoothing)
    multi = is_multilabel(train_y)
    score_key = val_score_key(multi)
    history: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        head = spec.build()
        if initial is not None:
            head.load_state_dict(initial)
        ranks = distributed.current()
        # Under torchrun every rank draws the same order and takes its share of each global batch of
        # batch_size x world_size; DDP averages the gradients, so each step matches one of that global size.
        model = nn.parallel.DistributedDataParallel(head) if ranks.distributed else head
        global_batch = options.batch_size * ranks.world_size
        optimizer = make_optimizer([{"params": list(head.parameters())}], options.optimizer, options.lr,
                                   options.decay, options.momentum, options.nesterov)
        scheduler = make_scheduler(optimizer, options.schedule, options.epochs, math.ceil(len(x) / global_batch),
                                   options.warmup_epochs, options.lr_steps, options.lr_gamma)
        best = ((math.inf,), 0, copy.deepcopy(head.state_dict()))
        generator = torch.Generator().manual_seed(options.seed)
        bar = progress_bar(options.epochs, "Training head", "epoch", progress)
        for epoch in range(1, options.epochs + 1):
            head.train()
            total_loss, correct, seen = 0.0, 0, 0
            order = (torch.randperm(len(x), generator=generator) if sample_weights is None else
                     torch.multinomial(sample_weights, len(x), replacement=True, generator=generator))
            for shared in order.split(global_batch):
                if len(shared) < ranks.world_size:
                    continue  # too few images left to give every rank one; all ranks skip it alike
                batch = shared[ranks.rank::ranks.world_size]
                logits = model(x[batch])
                loss = criterion(logits, y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if options.grad_clip:
                    nn.utils.clip_grad_norm_(head.parameters(), options.grad_clip)
                optimizer.step()
                lr_of_last_batch = optimizer.param_groups[0]["lr"]
                scheduler.step()
                total_loss += loss.item() * len(batch)
                correct += count_right(logits.detach(), y[batch])
                seen += len(batch)
            total_loss, correct, seen = distributed.sum_over_ranks(total_loss, correct, seen)
            row = {"epoch": epoch, "train_loss": total_loss / seen, "train_accuracy": correct / seen,
                   "lr": lr_of_last_batch}
            if has_val:
                row["val_loss"], row[score_key] = _evaluate(head, vx, vy)
                score = rank(row, options.monitor, options.monitored, multi)
                if score < best[0]:
                    best = (score, epoch, copy.deepcopy(head.state_dict()))
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row.get(score_key, math.nan):.3f}")
            bar.update()
            if has_val and epoch - best[1] >= options.patience:
                break
        bar.close()
    if has_val:
        head.load_state_dict(best[2])
    head.eval()
    return FitResult(head, history, best[1] if has_val else len(history))


def row_basis(x: torch.Tensor) -> torch.Tensor | None:
    """An orthonormal basis (as columns, float64) of the span of `x`'s rows when it has fewer rows than columns (from
    the eigenvectors of the rows' Gram matrix: much cheaper than an SVD of `x`); None otherwise."""
    if len(x) >= x.shape[1]:
        return None
    x64 = x.double()
    values, vectors = torch.linalg.eigh(x64 @ x64.T)
    keep = values > values.max() * 1e-10
    return x64.T @ vectors[:, keep] / values[keep].sqrt()


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
               class_weight: torch.Tensor | None = None, label_smoothing: float = 0.0,
               start: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 100,
               basis: torch.Tensor | None | bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a multinomial logistic regression (for an (images, classes) 0/1 `y`: one logistic regression
    per class, `multilabel.bce_loss`): mean cross-entropy + weight_decay / 2 * |weight|^2 (the bias
    unpenalised), minimised by scipy's L-BFGS from `start` (default zeros), at most `max_iter` iterations.

    scipy, not torch.optim: the first torch optimiser a process builds imports torch's compiler stack (1.2 s here),
    which a cold probe run would otherwise wait for. With fewer rows than columns (a few hundred images, thousands of
    features) the fit runs in the span of the rows (`basis`: True computes it with `row_basis`; give it when fitting
    the same rows again), which holds the solution exactly: the gradient of the loss lies there, and the penalty only
    shrinks what is outside it.
    """
    from scipy.optimize import minimize

    if basis is True:
        basis = row_basis(x)
    multi = y.ndim == 2  # one sigmoid per class: binary cross-entropy (class_weight: the positives' weight)
    y = y.float() if multi else y.long()
    class_weight = class_weight.float() if class_weight is not None else None
    features = (x.double() @ basis).float() if basis is not None else x.float()
    width = features.shape[1]
    weight0, bias0 = start if start is not None else (torch.zeros(num_classes, x.shape[1]), torch.zeros(num_classes))
    weight0 = (weight0.double() @ basis).float() if basis is not None else weight0.float()

    def loss_and_gradient(flat: np.ndarray) -> tuple[float, np.ndarray]:
        parameters = torch.from_numpy(flat.astype(np.float32)).requires_grad_(True)
        weight, bias = parameters[:num_classes * width].view(num_classes, width), parameters[num_classes * width:]
        logits = features @ weight.T + bias
        fit = (bce_loss(logits, y, class_weight) if multi else
               nn.functional.cross_entropy(logits, y, weight=class_weight, label_smoothing=label_smoothing))
        loss = fit + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss.item(), parameters.grad.double().numpy()

    initial = torch.cat([weight0.reshape(-1), bias0.float()]).double().numpy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small products: one thread was 1.7x faster than two here (no thread hand-offs)
    try:
        solution = minimize(loss_and_gradient, initial, jac=True, method="L-BFGS-B", options={"maxiter": max_iter}).x
    finally:
        torch.set_num_threads(threads)
    weight = torch.from_numpy(solution[:num_classes * width]).view(num_classes, width)
    bias = torch.from_numpy(solution[num_classes * width:])
    if basis is not None:
        weight = weight @ basis.T
    return weight.float(), bias.float()


def fit_linear_lbfgs(spec: HeadSpec, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray | None,
                     val_y: np.ndarray | None, options: FitOptions, progress: bool | None = None,
                     initial: dict[str, torch.Tensor] | None = None, last_block: int | None = None) -> FitResult:
    """A linear head fitted by full-batch L-BFGS (multinomial logistic regression with an L2 penalty on the weights),
    on every block's features and on the last block's alone (`last_block` columns at the end), for each weight decay
    of PROBE_WEIGHT_DECAYS unless `options.weight_decay` gives one; the pair validation scores best by
    `options.monitored` is kept (without validation images: every block, DEFAULT_PROBE_WEIGHT_DECAY). A weight of
    the head stays 0 for each feature it does not use. `options.epochs` caps the L-BFGS iterations of each fit; class
    balancing (weights or sampler: the same for a full batch) and label smoothing apply to the loss.

    One row of history per fit, in the order they ran; `best_epoch` numbers the kept one.
    """
    if spec.kind != "linear":
        raise DataError("the lbfgs optimizer fits a linear head; use --optimizer adamw (or sgd, ...) for an mlp head.")
    x, y = torch.as_tensor(train_x, dtype=torch.float32), as_targets(train_y)
    has_val = val_x is not None and len(val_x) > 0
    vx = torch.as_tensor(val_x, dtype=torch.float32) if has_val else None
    vy = as_targets(val_y) if has_val else None
    weight = class_weights(train_y, spec.num_classes) if options.balance != "none" else None
    check_label_smoothing(train_y, options.label_smoothing)
    multi = is_multilabel(train_y)
    score_key = val_score_key(multi)
    parts = {"blocks": slice(0, x.shape[1])}
    if has_val and last_block and last_block < x.shape[1]:
        parts["last"] = slice(x.shape[1] - last_block, x.shape[1])
    decays = ((options.weight_decay,) if options.weight_decay is not None
              else PROBE_WEIGHT_DECAYS if has_val else (DEFAULT_PROBE_WEIGHT_DECAY,))
    history: list[dict] = []
    best = ((math.inf,), 0, None, {})
    bar = progress_bar(len(parts) * len(decays), "Fitting the probe", "fit", progress)
    for part, columns in parts.items():
        linear = nn.Linear(columns.stop - columns.start, spec.num_classes).eval()
        fitted = (initial["1.weight"], initial["1.bias"]) if initial is not None and part == "blocks" else None
        part_x, part_vx = x[:, columns], (vx[:, columns] if has_val else None)
        basis = row_basis(part_x)
        for weight_decay in decays:
            fitted = fit_linear(part_x, y, spec.num_classes, weight_decay, weight, options.label_smoothing, fitted,
                                options.epochs, basis)
            with torch.no_grad():
                linear.weight.copy_(fitted[0])
                linear.bias.copy_(fitted[1])
            train_loss, train_accuracy = _evaluate(linear, part_x, y)
            row = {"epoch": len(history) + 1, "features": part, "weight_decay": weight_decay,
                   "train_loss": train_loss, "train_accuracy": train_accuracy}
            if has_val:
                row["val_loss"], row[score_key] = _evaluate(linear, part_vx, vy)
                score = rank(row, options.monitor, options.monitored, multi)
            else:
                score = (0.0,)
            if score < best[0]:
                best = (score, row["epoch"], (columns, copy.deepcopy(linear.state_dict())),
                        {"features": part, "weight_decay": weight_decay})
            history.append(row)
            bar.set_postfix(val=f"{row.get(score_key, math.nan):.3f}")
            bar.update()
    bar.close()
    head = spec.build()
    (columns, state), final = best[2], head[-1]
    with torch.no_grad():
        final.weight.zero_()
        final.weight[:, columns] = state["weight"]
        final.bias.copy_(state["bias"])
    head.eval()
    return FitResult(head, history, best[1], best[3])


def lr_range_test_features(spec: HeadSpec, train_x: np.ndarray, train_y: np.ndarray, options: FitOptions,
                           progress: bool = False) -> LRFinding:
    """The learning-rate range test for a head on cached features (a fresh head, thrown away afterwards)."""
    x, y = torch.as_tensor(train_x, dtype=torch.float32), as_targets(train_y)
    criterion = make_criterion(train_y, None, options.label_smoothing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        head = spec.build().train()
        optimizer = make_optimizer([{"params": list(head.parameters())}], options.optimizer, options.lr,
                                   options.decay, options.momentum, options.nesterov)
        generator = torch.Generator().manual_seed(options.seed)

        def batches():
            while True:
                yield from torch.randperm(len(x), generator=generator).split(options.batch_size)

        stream = batches()

        def step(lr: float) -> float:
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(stream)
            loss = criterion(head(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.item()

        return lr_range_test(step, progress=progress)
