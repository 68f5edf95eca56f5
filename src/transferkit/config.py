"""Every option of a training run, checked before any work starts (`TrainConfig`); the stages below `train` read
it without importing `train`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from numbers import Integral, Real

from transferkit.augment import check_augment
from transferkit.backbone import DEFAULT_BACKBONE
from transferkit.budget import parse_duration
from transferkit.data import DEFAULT_MAX_IMAGE_PIXELS
from transferkit.errors import DataError
from transferkit.features import check_precision, resolve_device
from transferkit.head import HEAD_KINDS, FitOptions
from transferkit.novelty import check_accept
from transferkit.recipe import Recipe, recipe_for
from transferkit.tracking import parse_trackers

MODES = ("auto", "probe", "head", "finetune", "scratch")
# Options that name a choice: accepted in any case ("MLP", "SGD").
CHOICE_OPTIONS = ("head", "augment", "optimizer", "schedule", "monitor", "balance", "engine", "device", "precision")
# Per-mode defaults for the options left at None. Probe epochs are cheap and early stopping ends them; the image
# modes follow fastai's fit_one_cycle. Fine-tuning starts from a trained head, so it runs 10x lower (the backbone
# 100x lower, at the default --backbone-lr-mult): on hymenoptera 1e-3 fell from 0.974 to 0.934 validation accuracy
# within 10 epochs, 1e-4 stayed at 0.961-0.974.
MODE_DEFAULTS = {"probe": {"epochs": 100, "schedule": "constant", "lr": 1e-3},
                 "head": {"epochs": 15, "schedule": "onecycle", "lr": 1e-3},
                 "finetune": {"epochs": 10, "schedule": "onecycle", "lr": 1e-4},
                 "scratch": {"epochs": 30, "schedule": "onecycle", "lr": 1e-3},
                 # auto: the probe's own defaults, then a fine-tuning plan (epochs, lr) fitted to the time
                 "auto": {"schedule": "onecycle"}}


@dataclass(frozen=True)
class Bound:
    """The numbers an option accepts: whole or not, from `low` up to `high` (both included; None: no end)."""

    whole: bool
    low: float
    high: float | None = None

    def problem(self, value: object) -> str | None:
        """What is wrong with `value` ("must be 1 or more"), or None when it is fine."""
        kind = Integral if self.whole else Real
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"must be {'a whole number' if self.whole else 'a number'}"
        if value < self.low or (self.high is not None and value > self.high):
            return f"must be {self.low:g} or more" if self.high is None else \
                f"must be between {self.low:g} and {self.high:g}"
        return None


# The range of every numeric option (None always means "the default"); the CLI declares the same ones. Checked
# before any work, so that a Python caller gets one line instead of an exception from deep inside training.
BOUNDS = {"epochs": Bound(True, 1), "head_epochs": Bound(True, 1), "batch_size": Bound(True, 1),
          "patience": Bound(True, 1), "hidden": Bound(True, 1), "seed": Bound(True, 0),
          "image_size": Bound(True, 32, 2048), "train_size": Bound(True, 32, 2048),
          "extract_batch_size": Bound(True, 1), "workers": Bound(True, 0), "max_image_pixels": Bound(True, 1),
          "weight_decay": Bound(False, 0), "dropout": Bound(False, 0, 0.99), "label_smoothing": Bound(False, 0, 0.99),
          "momentum": Bound(False, 0, 0.999), "lr_gamma": Bound(False, 0), "warmup_epochs": Bound(False, 0),
          "grad_clip": Bound(False, 0), "backbone_lr_mult": Bound(False, 0), "val_percent": Bound(False, 0, 99),
          "test_percent": Bound(False, 0, 99), "mixup": Bound(False, 0, 10), "ema": Bound(False, 0, 0.99999),
          "drop_path": Bound(False, 0, 0.9), "threshold": Bound(False, 0.001, 0.999)}
# The regularisation of the image stages (`recipe`): None picks it by the size of the training split.
RECIPE_OPTIONS = ("mixup", "ema", "drop_path")


# Options of the epoch-by-epoch loop that L-BFGS has no use for: given to a probe without an optimizer, they are an
# error rather than silently ignored.
LOOP_OPTIONS = ("lr", "schedule", "warmup_epochs", "grad_clip", "nesterov", "lr_steps")


def probe_optimizer(head: str) -> str:
    """How a probe on cached features is fitted by default: L-BFGS for a linear head, AdamW epochs for an MLP."""
    return "lbfgs" if head == "linear" else "adamw"


def option_name(field: str) -> str:
    """`batch_size (--batch-size)`: an option as Python callers and command-line users both know it."""
    return f"{field} (--{field.replace('_', '-')})"


@dataclass(frozen=True)
class TrainConfig(FitOptions):
    """Every option of a training run (the head's fit options included); CLI flags map one to one onto fields.

    mode: probe (head on cached features), head (head on augmented images, frozen backbone), finetune (probe, then
    the unfrozen top of the backbone with the head on augmented images), scratch (random weights) or auto (the
    probe, then fine-tuning planned to fit `time_limit`, keeping the better on validation). None: auto with a
    time limit, probe without.
    time_limit: seconds (or a string such as "90s", "20m", "1h30m") for the whole run, end to end.
    """

    mode: str | None = None
    time_limit: float | str | None = None
    epochs: int | None = None
    lr: float | None = None
    schedule: str | None = None
    optimizer: str | None = None
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
    cache_bottom: bool = False
    mixup: float | None = None
    ema: float | None = None
    drop_path: float | None = None
    accept: float | None = None
    """The share of validation images the "unknown" threshold accepts (None: novelty.DEFAULT_ACCEPT)."""
    multi_label: bool | None = None
    """Several labels an image, one sigmoid per class: None detects it from the data, True forces it, False reads one
    label an image."""
    label_sep: str | None = None
    """The separator of several labels in a CSV's label field (None: detected)."""
    threshold: float | None = None
    """Multi-label: one decision threshold for every class instead of the per-class ones chosen on validation."""
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
    """Kept for runs and calls of earlier versions: the same as track=("tensorboard",)."""
    track: tuple[str, ...] = ()
    """Experiment trackers to log to: "tensorboard", "mlflow", "wandb" (`transferkit.tracking`)."""
    experiment: str | None = None
    """The MLflow experiment / W&B project (default: MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT, else "transferkit")."""
    compile: bool = False

    def resolved(self) -> TrainConfig:
        """The mode's defaults filled in, `balance=True` read as "weights", and every value checked."""
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            if value is not None and (problem := bound.problem(value)):
                raise DataError(f"{option_name(name)} {problem}, not {value!r}.")
        time_limit = parse_duration(self.time_limit)
        mode = (self.mode or ("auto" if time_limit else "probe")).lower()
        if mode not in MODES:
            raise DataError(f"mode must be one of {', '.join(MODES)}, not {mode!r}.")
        if time_limit and self.epochs is not None:
            raise DataError(f"give {option_name('time_limit')} or {option_name('epochs')}, not both: with a time "
                            "limit the epochs are fitted to the time (drop epochs), or drop the time limit to train a "
                            "set number of epochs.")
        if time_limit and mode in ("head", "finetune", "scratch"):
            raise DataError(f"{option_name('time_limit')} plans training itself (mode auto: the probe, then "
                            f"fine-tuning fitted to the time); with mode {mode} give {option_name('epochs')} instead.")
        loop_options = [name for name in LOOP_OPTIONS if getattr(self, name) not in (None, 0.0, (), False)]
        defaults = {k: v for k, v in MODE_DEFAULTS[mode].items() if getattr(self, k) is None}
        if self.optimizer is None:
            defaults["optimizer"] = probe_optimizer(self.head.lower()) if mode == "probe" else "adamw"
        balance = {True: "weights", False: "none"}.get(self.balance, self.balance)
        track = parse_trackers([*parse_trackers(self.track), *(["tensorboard"] if self.tensorboard else [])])
        config = replace(self, **defaults, mode=mode, time_limit=time_limit, balance=balance,
                         lr_steps=tuple(self.lr_steps), track=track, tensorboard=False)
        config = replace(config, **{name: value.lower() for name in CHOICE_OPTIONS
                                    if isinstance(value := getattr(config, name), str)})
        config.check()
        check_precision(config.precision, resolve_device(config.device))
        if config.lr is not None and config.lr <= 0:
            raise DataError(f"lr must be more than 0, not {config.lr}.")
        if config.head not in HEAD_KINDS:
            raise DataError(f"head must be one of {', '.join(HEAD_KINDS)}, not {config.head!r}.")
        if config.optimizer == "lbfgs" and (config.mode != "probe" or config.head != "linear"):
            raise DataError(f"{option_name('optimizer')} lbfgs fits a linear probe on cached features (mode probe, "
                            f"head linear), not {'an mlp head' if config.head != 'linear' else f'mode {config.mode}'}"
                            f"; use adamw, adam, sgd or rmsprop.")
        if self.optimizer is None and config.optimizer == "lbfgs" and loop_options:
            raise DataError(f"{option_name(loop_options[0])} tunes training epoch by epoch, and the probe is fitted by "
                            f"L-BFGS (no learning rate or schedule to set): add optimizer=\"adamw\" (--optimizer "
                            f"adamw) to train it epoch by epoch, or drop {loop_options[0]}.")
        check_augment(config.augment)
        if not (config.unfreeze == "all" or config.unfreeze.startswith(("top-blocks:", "from:"))):
            raise DataError(f"{option_name('unfreeze')} must be all, top-blocks:N or from:LAYER, "
                            f"not {config.unfreeze!r}.")
        if config.cache_bottom and (config.mode != "finetune" or config.unfreeze == "all"):
            raise DataError(f"{option_name('cache_bottom')} trains the top of the backbone on cached activations of "
                            f"its frozen bottom: give mode finetune (--mode finetune) with unfreeze top-blocks:N "
                            f"(--unfreeze top-blocks:6, say).")
        if config.cache_bottom and not config.use_cache:
            raise DataError(f"{option_name('cache_bottom')} keeps the activations in the feature cache; drop "
                            f"use_cache=False (--no-cache).")
        check_accept(config.accept)
        if config.label_sep is not None and (config.label_sep == "" or config.multi_label is False):
            raise DataError(f"{option_name('label_sep')} separates several labels in a CSV field: give a character "
                            "such as '|' or ' ', and not together with multi_label=False (--single-label).")
        given = [name for name in RECIPE_OPTIONS if getattr(config, name) is not None]
        if given and config.mode == "probe":
            raise DataError(f"{option_name(given[0])} regularises training on images (modes finetune, head, scratch "
                            f"and auto's fine-tuning), not the probe on cached features: drop it, or choose one of "
                            f"those modes.")
        return config

    def recipe(self, train_images: int) -> Recipe:
        """The regularisation of an image stage on `train_images` photos: recipe_for's rule, with the options given
        here in its place."""
        chosen = recipe_for(train_images)
        return replace(chosen, **{name: value for name in RECIPE_OPTIONS
                                  if (value := getattr(self, name)) is not None})
