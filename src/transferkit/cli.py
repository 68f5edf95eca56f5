"""The `transferkit` command line: a thin layer over the Python API."""

from __future__ import annotations

import csv
import json
import logging
import sys
import warnings
from dataclasses import replace
from functools import wraps
from pathlib import Path
from typing import Callable, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from transferkit.text import plural


class _Commands(TyperGroup):
    """transferkit's commands: usage errors (an unknown option, a missing argument, a bad choice) in one line, as
    transferkit's own errors are, instead of typer's boxed panel."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as error:  # typer's usage errors; a NoArgsIsHelpError has printed the help
            if type(error).__name__ != "NoArgsIsHelpError":
                context = getattr(error, "ctx", None)
                hint = f" (see `{context.command_path} -h`)" if context is not None else ""
                message = error.format_message().replace("Value error, ", "")  # pydantic's prefix, via typer
                err.print(f"[bold red]error:[/] {escape(message)}{escape(hint)}", highlight=False)
            sys.exit(error.exit_code)
        except typer.Abort:
            err.print("aborted.")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def get_command(self, ctx, name: str):
        """The command, its help without the types typer would show for -h (<bool>) and lists (<list[str]>)."""
        command = super().get_command(ctx, name)
        if command is not None:
            command.get_help_option(ctx).metavar = ""
            for param in command.params:
                if param.param_type_name == "argument" and param.display_type_rich(ctx) in ("<str>", "<list[str]>"):
                    param.display_type_rich = lambda ctx: None  # its name and help say it (RUN IMAGES...)
        return command

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        option.metavar = ""
        return option


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Commands,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Labelled photos -> pretrained backbone -> cached features -> trained head -> classifier.",
                  epilog="Example: transferkit train photos/ (then transferkit COMMAND -h for each command).")
# Piped output gets room for wide tables instead of rich's 80-column default.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


# The panels of `train --help`.
DATA, MODEL, TRAINING, FINETUNE, OUTPUT, SPEED = "Data", "Model", "Training", "Fine-tuning", "Output", "Speed"
ENGINE_OPTION = typer.Option("auto", case_sensitive=False, rich_help_panel=SPEED,
                             help="Backbone engine: auto (fastest numerically safe here), torch, onnxruntime.")
DEVICE_OPTION = typer.Option("auto", metavar="auto|cpu|cuda[:N]", rich_help_panel=SPEED,
                             help="auto (a CUDA GPU if there is one), cpu, cuda or cuda:N.")
CACHE_HELP = ("transferkit's cache folder: features, the backbones' ONNX files, model summaries \\[default: "
              "$TRANSFERKIT_CACHE_DIR or ~/.cache/transferkit].")
Engine = Literal["auto", "torch", "onnxruntime"]
Split = Literal["auto", "train", "val", "test", "all"]


def _flag(name: str, help: str, panel: str | None = None):
    """An on/off option, shown without a type."""
    return typer.Option(False, name, help=help, metavar="", rich_help_panel=panel)


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", is_eager=True, metavar="", help="Print the version and exit.",
                                 callback=lambda shown: _print_version() if shown else None),
) -> None:
    """Labelled photos -> pretrained backbone -> cached features -> trained head -> classifier."""


def _print_version() -> None:
    from transferkit import __version__

    out.print(f"transferkit {__version__}", highlight=False)
    raise typer.Exit()


# What a runtime-only install (transferkit --no-deps + onnxruntime, Pillow, numpy) leaves out.
_FULL_INSTALL_MODULES = {"torch", "torchvision", "timm", "safetensors", "sklearn", "matplotlib", "jinja2", "tqdm",
                         "cleanlab", "imagehash", "pywt", "scipy", "pandas"}


def _friendly_errors(command: Callable) -> Callable:
    """User-caused errors become one line on stderr and exit code 2; Ctrl-C keeps what was cached."""

    @wraps(command)
    def run(*args, **kwargs):
        from transferkit.errors import TrainingInterrupted, TransferkitError, storage_problem

        try:
            return command(*args, **kwargs)
        except TransferkitError as error:
            err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
            raise typer.Exit(2) from None
        except OSError as error:
            problem = storage_problem(error)
            if problem is None:
                raise
            err.print(f"[bold red]error:[/] {escape(problem)}; then run the command again.", highlight=False)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as error:
            missing = (error.name or "").partition(".")[0]
            if missing not in _FULL_INSTALL_MODULES:
                raise
            err.print(f"[bold red]error:[/] this needs {missing}, which this runtime-only install lacks; it runs "
                      "exported models (`transferkit predict EXPORT_DIR ...`, `transferkit serve EXPORT_DIR`). "
                      "For everything else: pip install transferkit", highlight=False)
            raise typer.Exit(2) from None
        except TrainingInterrupted as interrupted:
            err.print(f"interrupted. Continue from the last finished epoch with `transferkit train --resume "
                      f"{escape(str(interrupted.run))}`.", highlight=False)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            err.print("interrupted.")
            raise typer.Exit(130) from None

    return run


class _LogFormat(logging.Formatter):
    """Information as is; warnings and errors prefixed with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _CommandHandler(logging.StreamHandler):
    """The handler a command adds for transferkit's log lines."""


def _setup_logging() -> None:
    """transferkit's log lines (information, warnings) to this command's stderr, one line each.

    A handler on the "transferkit" logger, not logging.basicConfig: that does nothing when the root logger already
    has handlers (as in a notebook or under pytest), so the lines would vanish. Replaced on each call, so a second
    command in the same process writes to its own stderr.
    """
    logger = logging.getLogger("transferkit")
    for handler in [h for h in logger.handlers if isinstance(h, _CommandHandler)]:
        logger.removeHandler(handler)
    handler = _CommandHandler(sys.stderr)
    handler.setFormatter(_LogFormat("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # warnings are for the user here: one line each ("warning: ..."), without the source line that raised them
    warnings.showwarning = lambda message, *_: logging.getLogger("transferkit").warning("%s", message)
    # transferkit checks image sizes itself and reports oversized images as skipped files.
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _without_option(arguments: list[str], name: str) -> list[str]:
    """`arguments` without `name VALUE` / `name=VALUE`."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == name:
            skip = True
        elif not argument.startswith(f"{name}="):
            kept.append(argument)
    return kept


def _epoch_list(text: str) -> tuple[int, ...]:
    from transferkit.errors import DataError

    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise DataError(f"--lr-steps takes epoch numbers separated by commas (e.g. 6,9), not {text!r}.") from None


def _label_kind(multi_label: bool, single_label: bool) -> bool | None:
    """--multi-label: True, --single-label: False, neither: None (detected from the data)."""
    from transferkit.errors import DataError

    if multi_label and single_label:
        raise DataError("give --multi-label or --single-label, not both.")
    return True if multi_label else False if single_label else None


def _accuracy_text(metrics: dict) -> str:
    if metrics.get("multi_label"):
        return (f"macro mAP [bold]{metrics['map_macro'] or 0:.3f}[/], micro mAP {metrics['map_micro'] or 0:.3f}, "
                f"exact match {metrics['exact_match']:.3f}, Hamming loss {metrics['hamming_loss']:.3f}")
    top5 = f", top-5 {metrics['top5_accuracy']:.3f}" if "top5_accuracy" in metrics else ""
    return f"[bold]{metrics['accuracy']:.3f}[/]{top5}"


def _print_train_result(result, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(result.summary()))
        return
    summary = result.summary()
    images = ", ".join(f"{n} {split}" for split, n in summary["images"].items())
    computed, cached = summary["features_computed"], summary["features_from_cache"]
    features = f"; features: {computed} computed, {cached} from cache" if computed or cached else ""
    out.print(f"Trained on {plural(len(result.classes), 'class')} ({images} images) in {summary['seconds']:.1f} s"
              f"{features}.")
    for split in ("val", "test"):
        if split in result.metrics:
            m = result.metrics[split]
            measured = "" if m.get("multi_label") else " accuracy"
            out.print(f"{'validation' if split == 'val' else 'test'}{measured}: {_accuracy_text(m)} "
                      f"({plural(m['n'], 'image')})")
    out.print(f"Best epoch {result.best_epoch} of {summary['epochs_run']}. Run written to "
              f"[bold]{escape(str(result.run_dir))}[/]")
    if result.choice:
        out.print(f"auto: {escape(result.choice)}", highlight=False)
    if result.advice:
        out.print(f"Tip: {escape(result.advice)}", highlight=False)
    if result.report:
        out.print(f"Report: [bold]{escape(str(result.report))}[/]")


# What `train --resume` takes besides the run: options that only shape the output or how the process is launched.
_RESUME_OPTIONS = {"resume", "as_json", "no_report", "no_doctor", "nproc"}


@app.command(epilog="Example: transferkit train photos/ --mode finetune --epochs 10 --out runs/cats")
@_friendly_errors
def train(
    ctx: typer.Context,
    data: Optional[str] = typer.Argument(None, help="Folder of class subfolders, folder with train/ (val/, test/), "
                                                    "CSV, WebDataset shards (a folder of .tar, or "
                                                    "train-{000..009}.tar), or any of these at an s3:// gs:// az:// "
                                                    "URL. Not needed with --resume."),
    val: Optional[str] = typer.Option(None, metavar="DATA", help="Explicit validation data (same forms as DATA).",
                                       rich_help_panel=DATA),
    test: Optional[str] = typer.Option(None, metavar="DATA", help="Explicit test data (same forms as DATA).",
                                       rich_help_panel=DATA),
    val_percent: float = typer.Option(10.0, min=0.0, max=99.0, help="Share of DATA held out for validation when it "
                                                                    "has no val/ folder.", rich_help_panel=DATA),
    test_percent: float = typer.Option(10.0, min=0.0, max=99.0, help="Share of DATA held out for testing when it "
                                                                     "has no test/ folder.", rich_help_panel=DATA),
    groups: Optional[Path] = typer.Option(None, help='JSON {"group": ["class", ...]} for accuracy per group.',
                                          rich_help_panel=DATA),
    no_doctor: bool = _flag("--no-doctor", "Skip the data check printed before training.", DATA),
    backbone: str = typer.Option("efficientnet_lite0", metavar="NAME", rich_help_panel=MODEL,
                                 help="efficientnet_lite0/1/2 (embedded), timm name, hf-hub:ID."),
    weights: Optional[Path] = typer.Option(None, help="Restore the backbone from a state dict / .safetensors file.",
                                           rich_help_panel=MODEL),
    image_size: Optional[int] = typer.Option(None, help="Input resolution \\[default: the backbone's test "
                                                        "resolution].", rich_help_panel=MODEL),
    train_size: Optional[int] = typer.Option(None, help="Resolution for training on images \\[default: the one the "
                                                        "backbone was trained at, or --image-size].",
                                             rich_help_panel=MODEL),
    head: Literal["linear", "mlp"] = typer.Option("linear", case_sensitive=False, rich_help_panel=MODEL,
                                                  help="linear (dropout + dense) or mlp (dense 512 + ReLU + dropout "
                                                       "+ dense)."),
    dropout: float = typer.Option(0.2, min=0.0, max=0.99, help="Dropout before the head's last layer.",
                                  rich_help_panel=MODEL),
    mode: Optional[Literal["auto", "probe", "head", "finetune", "scratch"]] = typer.Option(
        None, case_sensitive=False, rich_help_panel=TRAINING,
        help="probe (head on cached features), head (head on augmented images), finetune (probe, then unfreeze the "
             "top of the backbone), scratch, or auto (probe, then fine-tuning fitted to the time) \\[default: auto "
             "with --time-limit, else probe]."),
    time_limit: Optional[str] = typer.Option(None, metavar="DURATION", rich_help_panel=TRAINING,
                                             help="The whole run's time, e.g. 90s, 20m, 1h30m or seconds: the best "
                                                  "model it buys (--mode auto)."),
    epochs: Optional[int] = typer.Option(None, min=1, rich_help_panel=TRAINING,
                                         help="Passes over the training data \\[default: probe 100 (early-stopped), "
                                              "head 15, finetune 10, scratch 30]."),
    batch_size: int = typer.Option(32, min=1, help="Images (or feature rows) per step.", rich_help_panel=TRAINING),
    lr: Optional[float] = typer.Option(None, min=0.0, rich_help_panel=TRAINING,
                                       help="Learning rate \\[default: 1e-4 for finetune (the backbone x "
                                            "--backbone-lr-mult), 1e-3 otherwise]."),
    optimizer: Optional[Literal["lbfgs", "adamw", "adam", "sgd", "rmsprop"]] = typer.Option(
        None, case_sensitive=False, rich_help_panel=TRAINING,
        help="The optimizer \\[default: lbfgs for a linear probe (full batch, weight decay and features chosen on "
             "validation), adamw otherwise]."),
    momentum: float = typer.Option(0.9, min=0.0, max=0.999, help="For sgd and rmsprop.", rich_help_panel=TRAINING),
    nesterov: bool = _flag("--nesterov", "Nesterov momentum for sgd.", TRAINING),
    weight_decay: Optional[float] = typer.Option(
        None, min=0.0, rich_help_panel=TRAINING,
        help="Decoupled weight decay (L2 for sgd and lbfgs) \\[default: chosen on validation by lbfgs, 1e-4 "
             "otherwise]."),
    schedule: Optional[Literal["constant", "step", "cosine", "onecycle"]] = typer.Option(
        None, case_sensitive=False, rich_help_panel=TRAINING,
        help="Learning-rate schedule \\[default: constant for probe, onecycle otherwise]."),
    lr_steps: str = typer.Option("", metavar="EPOCHS", rich_help_panel=TRAINING,
                                 help="Epochs where --schedule step multiplies the rate by --lr-gamma, e.g. 6,9."),
    lr_gamma: float = typer.Option(0.1, min=0.0, help="Factor of each --schedule step.", rich_help_panel=TRAINING),
    warmup_epochs: float = typer.Option(0.0, min=0.0, help="Linear warm-up (fractions allowed).",
                                        rich_help_panel=TRAINING),
    grad_clip: Optional[float] = typer.Option(None, min=0.0, help="Clip the gradient norm to this value.",
                                              rich_help_panel=TRAINING),
    label_smoothing: float = typer.Option(0.0, min=0.0, max=0.99, help="Label smoothing of the loss.",
                                          rich_help_panel=TRAINING),
    patience: int = typer.Option(10, min=1, help="Early stopping: epochs without a better monitored value.",
                                 rich_help_panel=TRAINING),
    monitor: Optional[Literal["val_loss", "val_accuracy"]] = typer.Option(
        None, case_sensitive=False, rich_help_panel=TRAINING,
        help="Early stopping and best epoch (lbfgs: best fit) by this value \\[default: val_accuracy for lbfgs, "
             "val_loss otherwise]."),
    balance: Literal["none", "weights", "sampler"] = typer.Option(
        "none", case_sensitive=False, rich_help_panel=TRAINING,
        help="Imbalanced data: none, weights (class-weighted loss) or sampler (class-balanced sampling)."),
    augment: Literal["none", "light", "vgg", "strong"] = typer.Option(
        "light", case_sensitive=False, rich_help_panel=TRAINING,
        help="Image modes: none, light (random resized crop + flip), vgg (random short side in \\[256, 512], crop, "
             "flip) or strong."),
    seed: int = typer.Option(0, help="Random seed of splits, initialisation and augmentation.",
                             rich_help_panel=TRAINING),
    lr_find: bool = _flag("--lr-find", "Run the learning-rate range test instead of training: print a suggestion, "
                                       "plot lr_find.png.", TRAINING),
    unfreeze: str = typer.Option("all", metavar="all|top-blocks:N", rich_help_panel=FINETUNE,
                                 help="Which backbone layers train (timm's blocks, counted from the top)."),
    unfreeze_from: Optional[str] = typer.Option(None, metavar="LAYER", rich_help_panel=FINETUNE,
                                                help="Unfreeze from this layer name or block index upwards (instead "
                                                     "of --unfreeze)."),
    backbone_lr_mult: float = typer.Option(0.1, min=0.0, help="Backbone learning rate = lr x this.",
                                           rich_help_panel=FINETUNE),
    train_bn: bool = _flag("--train-bn", "Update BatchNorm statistics (frozen by default).", FINETUNE),
    cache_bottom: bool = _flag("--cache-bottom", "Fine-tune the unfrozen top on cached activations of the frozen "
                                                 "bottom (with --unfreeze top-blocks:N): ~6x faster epochs.", FINETUNE),
    mixup: Optional[float] = typer.Option(None, min=0.0, max=10.0, metavar="ALPHA", rich_help_panel=FINETUNE,
                                          help="Mixup of the images (or cached activations), Beta(ALPHA, ALPHA); 0: "
                                               "off \\[default: by the size of the training split]."),
    ema: Optional[float] = typer.Option(None, min=0.0, max=0.99999, metavar="DECAY", rich_help_panel=FINETUNE,
                                        help="Keep an average of the weights with this decay per step; 0: off "
                                             "\\[default: by the size of the training split]."),
    drop_path: Optional[float] = typer.Option(None, min=0.0, max=0.9, metavar="RATE", rich_help_panel=FINETUNE,
                                              help="Stochastic depth of the trained blocks; 0: off \\[default: by "
                                                   "the size of the training split]."),
    head_epochs: int = typer.Option(100, min=1, help="Epochs of the first stage (probe, early-stopped).",
                                    rich_help_panel=FINETUNE),
    accept: Optional[float] = typer.Option(None, metavar="SHARE", rich_help_panel=OUTPUT,
                                           help="Predictions say unknown for images further from the training images "
                                                "than this share of validation images \\[default: 0.95]."),
    multi_label: bool = _flag("--multi-label", "Several labels an image, one sigmoid per class (an image may have "
                                               "none) \\[default: detected from the CSV].", DATA),
    single_label: bool = _flag("--single-label", "Exactly one label an image: an empty label is an error.", DATA),
    label_sep: Optional[str] = typer.Option(None, metavar="SEP", rich_help_panel=DATA,
                                            help="The separator of several labels in a CSV's label field, e.g. '|' "
                                                 "or ' ' \\[default: detected: | or ;, or a space in a column named "
                                                 "tags/labels]."),
    threshold: Optional[float] = typer.Option(None, min=0.001, max=0.999, rich_help_panel=OUTPUT,
                                              help="Multi-label: give a label when its probability reaches this, for "
                                                   "every class \\[default: each class's F1-best on validation]."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder to write \\[default: runs/<timestamp>].",
                                           rich_help_panel=OUTPUT),
    overwrite: bool = _flag("--overwrite", "Replace --out if it already holds a run (or an interrupted one).",
                            OUTPUT),
    resume: Optional[Path] = typer.Option(None, help="Continue the interrupted run that was writing this folder, "
                                                     "with its own options.", rich_help_panel=OUTPUT),
    from_run: Optional[Path] = typer.Option(None, "--from", metavar="RUN", rich_help_panel=OUTPUT,
                                            help="Train a finished run further, as a new run: start from its head "
                                                 "(and its backbone, if it was fine-tuned)."),
    track: Optional[list[str]] = typer.Option(None, metavar="mlflow|wandb|tensorboard", rich_help_panel=OUTPUT,
                                              help="Log the run to an experiment tracker (repeat, or comma-separate, "
                                                   "for several): parameters, metrics per epoch, the report, the "
                                                   "model."),
    experiment: Optional[str] = typer.Option(None, metavar="NAME", rich_help_panel=OUTPUT,
                                             help="MLflow experiment / W&B project \\[default: "
                                                  "MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT, else transferkit]."),
    tensorboard: bool = _flag("--tensorboard", "Also log to TensorBoard (the same as --track tensorboard).", OUTPUT),
    no_report: bool = _flag("--no-report", "Skip the HTML report (report.html in the run).", OUTPUT),
    as_json: bool = _flag("--json", "Print a machine-readable summary.", OUTPUT),
    cache_dir: Optional[Path] = typer.Option(None, help=CACHE_HELP, rich_help_panel=SPEED),
    no_cache: bool = _flag("--no-cache", "Neither read nor write the feature cache.", SPEED),
    workers: Optional[int] = typer.Option(None, min=0, help="Image decoding workers \\[default: CPU count].",
                                          rich_help_panel=SPEED),
    engine: Engine = ENGINE_OPTION,
    device: str = DEVICE_OPTION,
    precision: Literal["auto", "fp32", "bf16", "fp16"] = typer.Option(
        "auto", case_sensitive=False, help="Autocast precision (fp16 on CUDA only).", rich_help_panel=SPEED),
    compile_model: bool = _flag("--compile", "Image modes: torch.compile the network (pays off on GPUs; on a CPU "
                                             "compiling takes minutes).", SPEED),
    nproc: int = typer.Option(1, min=1, rich_help_panel=SPEED,
                              help="Processes on this machine: launches torchrun --nproc_per_node N (--batch-size is "
                                   "per process)."),
) -> None:
    """Train a classifier: a head on cached features of a frozen backbone, or on images (head/finetune/scratch)."""
    from transferkit.errors import DataError
    from transferkit.train import find_lr
    from transferkit.train import resume as resume_run
    from transferkit.train import train as train_run

    from transferkit import distributed

    if nproc > 1 and not distributed.launched_by_torchrun():
        raise typer.Exit(distributed.launch(nproc, _without_option(sys.argv[1:], "--nproc")))
    _setup_logging()
    if resume is not None:
        given = [p for p in ctx.command.params if p.name not in _RESUME_OPTIONS
                 and getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")]
        if given:
            names = ", ".join(p.opts[0] if p.param_type_name == "option" else "DATA" for p in given)
            raise DataError(f"--resume continues a run with its own data and options, so {names} cannot apply: "
                            "drop them (or start the run again with --overwrite and new options).")
        result = resume_run(resume, report=False if no_report else None)
        if distributed.current().is_main:
            _print_train_result(result, as_json)
        return
    if data is None:
        raise DataError("give the DATA to train on (or --resume RUN to continue an interrupted run).")
    if unfreeze_from is not None:
        if unfreeze != "all":
            raise DataError("give either --unfreeze or --unfreeze-from, not both.")
        unfreeze = f"from:{unfreeze_from}"
    options = dict(backbone=backbone, weights=str(weights) if weights else None, image_size=image_size,
                   train_size=train_size, mode=mode, head=head, augment=augment, unfreeze=unfreeze,
                   time_limit=time_limit, backbone_lr_mult=backbone_lr_mult, train_bn=train_bn,
                   cache_bottom=cache_bottom, mixup=mixup, ema=ema, drop_path=drop_path, accept=accept,
                   multi_label=_label_kind(multi_label, single_label), label_sep=label_sep, threshold=threshold,
                   head_epochs=head_epochs, epochs=epochs,
                   batch_size=batch_size, lr=lr, weight_decay=weight_decay, dropout=dropout,
                   label_smoothing=label_smoothing, patience=patience, balance=balance, optimizer=optimizer,
                   momentum=momentum, nesterov=nesterov, schedule=schedule, lr_steps=_epoch_list(lr_steps),
                   lr_gamma=lr_gamma, warmup_epochs=warmup_epochs, grad_clip=grad_clip, monitor=monitor, seed=seed,
                   val_percent=val_percent, test_percent=test_percent,
                   cache_dir=str(cache_dir) if cache_dir else None, use_cache=not no_cache, workers=workers,
                   engine=engine, device=device, precision=precision, tensorboard=tensorboard,
                   track=tuple(track or ()), experiment=experiment, compile=compile_model)
    if lr_find:
        finding, plot = find_lr(data, val=val, test=test, out=out_dir, **options)
        if as_json:
            out.print_json(json.dumps({"suggestion": finding.suggestion, "plot": str(plot), **{
                "lrs": finding.lrs, "losses": finding.losses}}))
            return
        table = Table("learning rate", "smoothed loss", title="learning-rate range test")
        for row in finding.to_rows()[::max(1, len(finding.lrs) // 12)]:
            table.add_row(f"{row['lr']:.2e}", f"{row['loss']:.4f}")
        out.print(table)
        out.print(f"Suggested learning rate: [bold]{finding.suggestion:.2e}[/] (steepest descent). "
                  f"Plot: [bold]{escape(str(plot))}[/]")
        return
    result = train_run(data, val=val, test=test, out=out_dir, overwrite=overwrite, groups=groups,
                       report=not no_report, doctor=not no_doctor, from_run=from_run, **options)
    if distributed.current().is_main:
        _print_train_result(result, as_json)


@app.command(epilog="Example: transferkit evaluate runs/cats new_photos/")
@_friendly_errors
def evaluate(
    run: Path = typer.Argument(..., help="Run folder written by `transferkit train`."),
    data: str = typer.Argument(..., help="Labelled data (same forms as for train)."),
    split: Split = typer.Option("auto", case_sensitive=False,
                                help="auto (other data: all of it; the run's own data: test, else val, else all), "
                                     "train, val, test or all."),
    groups: Optional[Path] = typer.Option(None, help='JSON {"group": ["class", ...]} for accuracy per group.'),
    cache_dir: Optional[Path] = typer.Option(None, help=CACHE_HELP),
    no_cache: bool = _flag("--no-cache", "Neither read nor write the feature cache."),
    engine: Engine = ENGINE_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = _flag("--json", "Print all metrics as JSON."),
    no_reject: bool = _flag("--no-reject", "Leave out what calling unfamiliar images unknown would do."),
    accept: Optional[float] = typer.Option(None, metavar="SHARE", help="The share of validation images the unknown "
                                           "threshold accepts \\[default: the run's]."),
) -> None:
    """Accuracy, top-5, per-class precision/recall/F1, confusion matrix (and accuracy per group of classes), the
    calibration error, and the accuracy on the images not called unknown."""
    from transferkit.evaluate import evaluate as evaluate_run

    _setup_logging()
    report = evaluate_run(run, data, split=split, groups=groups, cache_dir=cache_dir, use_cache=not no_cache,
                          engine=engine, device=device, reject=not no_reject, accept=accept)
    if report.skipped:
        logging.getLogger("transferkit").warning("skipped %d files that could not be used", len(report.skipped))
    if as_json:
        out.print_json(json.dumps({"split": report.split, "scored": report.scored, **report.metrics}))
        return
    m = report.metrics
    out.print(f"Scored {escape(report.scored)}.")
    if m.get("multi_label"):
        _print_label_set_metrics(report.split, m)
        return
    out.print(f"{report.split}: accuracy {_accuracy_text(m)}, macro F1 {m['macro_f1']:.3f} ({plural(m['n'], 'image')})")
    table = Table("class", "precision", "recall", "F1", "support")
    for name, c in m["per_class"].items():
        table.add_row(escape(name), f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]))
    out.print(table)
    if len(m["per_class"]) <= 20:
        confusion = Table("true \\ predicted", *map(escape, m["per_class"]), title="confusion matrix")
        for name, row in zip(m["per_class"], m["confusion_matrix"]):
            confusion.add_row(escape(name), *map(str, row))
        out.print(confusion)
    for group, g in m.get("groups", {}).items():
        accuracy = "n/a" if g["accuracy"] is None else f"{g['accuracy']:.3f}"
        out.print(f"group {escape(group)}: accuracy {accuracy} ({plural(g['n'], 'image')})")
    if m.get("ece") is not None:
        out.print(f"expected calibration error {m['ece']:.3f} (the model's own probabilities: "
                  f"{m['ece_uncalibrated']:.3f})")
    unknown = m.get("unknown")
    if unknown and unknown["unknown_share"] is not None:
        rest = "n/a" if unknown["accuracy_known"] is None else f"{unknown['accuracy_known']:.3f}"
        out.print(f"unknown (accepting {unknown['accept']:.0%} of validation images): {unknown['unknown_share']:.1%} "
                  f"of these images; accuracy on the rest {rest} (on all: {unknown['accuracy']:.3f})")


def _print_label_set_metrics(split: str, m: dict) -> None:
    """`evaluate` of a multi-label run: mAP, exact match, Hamming loss, and per class AP / P / R / F1 at the run's
    thresholds."""
    out.print(f"{split}: {_accuracy_text(m)}, micro F1 {m['f1_micro']:.3f} ({plural(m['n'], 'image')}, "
              f"{m['labels_per_image']:.2f} labels an image)")
    table = Table("class", "AP", "precision", "recall", "F1", "support", "threshold")
    for name, c in m["per_class"].items():
        table.add_row(escape(name), "-" if c["ap"] is None else f"{c['ap']:.3f}", f"{c['precision']:.3f}",
                      f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]), f"{c['threshold']:.3f}")
    out.print(table)
    unknown = m.get("unknown")
    if unknown and unknown["unknown_share"] is not None:
        rest = "n/a" if unknown["accuracy_known"] is None else f"{unknown['accuracy_known']:.3f}"
        out.print(f"unknown (accepting {unknown['accept']:.0%} of validation images): {unknown['unknown_share']:.1%} "
                  f"of these images; exact match on the rest {rest} (on all: {unknown['accuracy']:.3f})")


def _print_label_sets(predictions, fmt: str) -> None:
    """A multi-label model's predictions: each input's label set, then its top-k labels with whether each passed its
    class's threshold."""
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["input", "labels", "rank", "label", "id", "probability", "passed", "unknown", "ood_score",
                         "error"])
        for p in predictions:
            if p.error:
                writer.writerow([p.source, "", "", "", "", "", "", "", "", p.error])
                continue
            verdict = ["" if p.unknown is None else str(p.unknown).lower(),
                       "" if p.ood_score is None else f"{p.ood_score:.6f}"]
            for (r, label, i, prob), passed in zip(p.ranked(), p.passed):
                writer.writerow([p.source, p.answer, r, label, i, f"{prob:.6f}", str(passed).lower(), *verdict, ""])
        return
    table = Table("input", "labels", "rank", "label", "probability", "passed")
    table.columns[0].overflow = "fold"
    for p in predictions:
        if p.error:
            table.add_row(escape(p.source), f"[red]unreadable: {escape(p.error)}[/]", "-", "-", "-", "-",
                          end_section=True)
            continue
        chosen = ("[bold]unknown[/]" if p.unknown else
                  ", ".join(f"{escape(label)} {prob:.2f}" for label, prob in zip(p.chosen, p.chosen_probabilities))
                  or "[dim](none)[/]")
        for (r, label, i, prob), passed in zip(p.ranked(), p.passed):
            table.add_row(escape(p.source) if r == 1 else "", chosen if r == 1 else "", str(r), escape(label),
                          f"{prob:.4f}", "[green]yes[/]" if passed else "[dim]no[/]", end_section=r == len(p.labels))
    out.print(table)


def _print_predictions(predictions, fmt: str) -> None:
    """Top-k rows per input; an unknown input's first row says `unknown` (its score, then the nearest classes)."""
    scored = any(p.ood_score is not None for p in predictions)
    if fmt == "json":
        out.print_json(json.dumps([p.to_dict() for p in predictions]))
    elif any(p.multi_label for p in predictions):
        _print_label_sets(predictions, fmt)
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["input", "rank", "label", "id", "probability", "unknown", "ood_score", "error"])
        for p in predictions:
            if p.error:
                writer.writerow([p.source, "", "", "", "", "", "", p.error])
            verdict = ["" if p.unknown is None else str(p.unknown).lower(),
                       "" if p.ood_score is None else f"{p.ood_score:.6f}"]
            for r, label, i, prob in p.ranked():
                writer.writerow([p.source, r, label, i, f"{prob:.6f}", *verdict, ""])
    else:
        table = Table("input", "rank", "id", "label", "probability", *(["unknown score"] if scored else []))
        table.columns[0].overflow = "fold"
        for p in predictions:
            if p.error:
                table.add_row(escape(p.source), "-", "-", f"[red]unreadable: {escape(p.error)}[/]", "-",
                              *(["-"] if scored else []), end_section=True)
                continue
            score = [] if not scored else ["-" if p.ood_score is None else f"{p.ood_score:.3f}"]
            if p.unknown:
                table.add_row(escape(p.source), "-", "-", "[bold]unknown[/] (nearest below)", "-", *score)
            for r, label, i, prob in p.ranked():
                first = r == 1 and not p.unknown
                table.add_row(escape(p.source) if first else "", str(r), str(i), escape(label), f"{prob:.4f}",
                              *(score if first else [""] * len(score)), end_section=r == len(p.labels))
        out.print(table)


def _ood_report(predictions, novelty, run: str) -> None:
    """How well the score tells the given outsiders from the run's own held-out images: AUROC and the share of
    outsiders accepted as known."""
    import numpy as np

    from transferkit.errors import DataError
    from transferkit.novelty import auroc

    scores = np.array([p.ood_score for p in predictions if p.ood_score is not None])
    if novelty is None or not len(scores):
        raise DataError(f"{run} keeps no statistics of its training images (written before transferkit scored "
                        f"unknown images); retrain it to measure outsiders.")
    accepted = [p for p in predictions if p.unknown is False]
    judged = [p for p in predictions if p.unknown is not None]
    false_accept = f"{len(accepted) / len(judged):.1%} ({len(accepted)} of {len(judged)})" if judged else "not judged"
    out.print(f"outsiders: {len(scores)} images; AUROC {auroc(novelty.reference_scores, scores):.3f} against the "
              f"run's {len(novelty.reference_scores)} {novelty.scored_on} images; accepted as known: {false_accept} "
              f"({novelty.describe()})")


@app.command(epilog="Example: transferkit predict runs/cats photo.jpg \"more/*.jpg\" https://example.com/cat.jpg")
@_friendly_errors
def predict(
    inputs: list[str] = typer.Argument(..., metavar="RUN IMAGES...",
                                       help="RUN (or an export folder) then images, folders, CSVs, wildcards "
                                            "(\"photos/*.jpg\"), http(s) URLs or - (an image on stdin); with "
                                            "--imagenet only images."),
    imagenet: bool = _flag("--imagenet", "Top ImageNet classes from the backbone's own head."),
    backbone: str = typer.Option("efficientnet_lite0", metavar="NAME", help="Backbone for --imagenet."),
    weights: Optional[Path] = typer.Option(None, help="Backbone weights file for --imagenet."),
    top_k: int = typer.Option(5, min=1, help="How many labels to give per image."),
    fmt: Literal["table", "json", "csv"] = typer.Option("table", "--format", case_sensitive=False,
                                                        help="How to print the predictions."),
    as_json: bool = _flag("--json", "The same as --format json."),
    batch_size: int = typer.Option(32, min=1, help="Images per model call."),
    no_reject: bool = _flag("--no-reject", "Never answer unknown: always the most likely classes."),
    accept: Optional[float] = typer.Option(None, metavar="SHARE", help="Call unknown what is further from the "
                                           "training images than this share of validation images \\[default: the "
                                           "run's]."),
    ood_report: bool = _flag("--ood-report", "The IMAGES are outsiders (none of the run's classes): print how well "
                                             "they are told apart (AUROC, share accepted)."),
    threshold: Optional[float] = typer.Option(None, min=0.001, max=0.999,
                                              help="Multi-label runs: give every label whose probability reaches this "
                                                   "\\[default: the run's per-class thresholds]."),
    cache_dir: Optional[Path] = typer.Option(None, help=CACHE_HELP),
    engine: Engine = ENGINE_OPTION,
    device: str = DEVICE_OPTION,
) -> None:
    """Top-k predictions of a trained run (or of the backbone's ImageNet classifier) for images; images unlike the
    run's training images are answered `unknown` (with their score and the nearest classes)."""
    from transferkit.data import list_images
    from transferkit.errors import DataError
    from transferkit.runtime import ExportedClassifier, is_export

    _setup_logging()
    sources = inputs if imagenet else inputs[1:]
    if not sources:
        raise DataError("give image files, folders or CSVs to predict (after the run folder).")
    stdin = sys.stdin.buffer.read() if "-" in sources else None  # an image piped in: `cat x.jpg | ... -`
    paths = [path for source in sources for path in ([stdin] if source == "-" else list_images([source]))]
    if not paths:
        raise DataError(f"no image files found in {', '.join(sources)}.")
    if imagenet:
        from transferkit.classifier import predict_imagenet

        predictions = predict_imagenet(paths, backbone, str(weights) if weights else None, top_k, batch_size,
                                       device=device)
    else:
        if is_export(inputs[0]):  # ONNX Runtime, Pillow and numpy only: no PyTorch needed
            model = ExportedClassifier.load(inputs[0])
        else:
            from transferkit.classifier import Classifier

            model = Classifier.load(inputs[0], engine=engine, device=device, cache_dir=cache_dir)
        predictions = model.predict(paths, top_k=top_k, batch_size=batch_size,
                                    progress=None if len(paths) > 1 else False, reject=not no_reject, accept=accept,
                                    threshold=threshold)
        if ood_report:
            _ood_report(predictions, model.novelty, inputs[0])
            return
    predictions = [replace(p, source="-") if path is stdin else p for p, path in zip(predictions, paths)]
    _print_predictions(predictions, "json" if as_json else fmt)
    failed = sum(p.error is not None for p in predictions)
    if failed:
        logging.getLogger("transferkit").warning("%d of %d inputs could not be read", failed, len(predictions))
    if failed == len(predictions):
        raise typer.Exit(1)


@app.command("export", epilog="Example: transferkit export runs/cats --quantize int8")
@_friendly_errors
def export_command(
    run: Path = typer.Argument(..., help="Run folder written by `transferkit train`."),
    fmt: Literal["onnx", "torchscript"] = typer.Option("onnx", "--format", case_sensitive=False,
                                                       help="ONNX (runs without PyTorch) or TorchScript."),
    quantize: Optional[Literal["int8"]] = typer.Option(None, case_sensitive=False,
                                                       help="int8: static quantisation (ONNX), calibrated on the "
                                                            "run's training images."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder \\[default: RUN/export-FORMAT\\[-int8]]."),
    overwrite: bool = _flag("--overwrite", "Replace --out if it exists."),
    as_json: bool = _flag("--json", "Print a machine-readable summary."),
) -> None:
    """The whole classifier (pixels in, probabilities out, any batch size) with labels.txt and preprocessing.json,
    checked against PyTorch before it is written."""
    from transferkit.export import export_run

    _setup_logging()
    result = export_run(run, fmt, quantize, out_dir, overwrite)
    if as_json:
        out.print_json(json.dumps(result.summary()))
        return
    parity = result.parity
    out.print(f"Exported {result.format} to [bold]{escape(str(result.folder))}[/] ({escape(result.model)}).")
    checked = (f"{plural(parity['images'], 'synthetic image')} (the run has no validation/test image that can be "
               "read)" if parity["synthetic"] else f"{plural(parity['images'], 'validation/test image')}")
    out.print(f"Parity with PyTorch on {checked}: top-1 agreement {parity['top1_agreement']:.3f}, "
              f"max probability difference {parity['max_abs_probability_difference']:.2e}"
              + (f", label sets agreeing {parity['label_set_agreement']:.3f}." if "label_set_agreement" in parity
                 else "."))
    q = result.quantization
    if q:
        change = "n/a" if q["accuracy_change"] is None else f"{100 * q['accuracy_change']:+.2f} points"
        label_sets = q.get("label_set_agreement")
        measured = "exact match" if "label_set_agreement" in q else "accuracy"
        agreeing = "" if label_sets is None else f"; label sets agree fp32/int8 {label_sets:.3f}"
        out.print(f"int8: calibrated on {plural(q['calibration_images'], 'training image')}; validation {measured} "
                  f"{q['accuracy_fp32']:.4f} -> {q['accuracy_int8']:.4f} ({change} on "
                  f"{plural(q['validation_images'], 'image')}{agreeing}); size {q['size_int8_bytes'] / 1e6:.1f} MB, "
                  f"{q['size_ratio']:.2f}x the fp32 model.")
    if result.format == "onnx":
        out.print(f"Predict without PyTorch: transferkit predict {escape(str(result.folder))} IMAGES...")


@app.command("serve", epilog="Example: transferkit serve runs/cats/export-onnx --port 8000")
@_friendly_errors
def serve_command(
    model: Path = typer.Argument(..., help="An export folder (served by ONNX Runtime, no PyTorch) or a run folder."),
    host: str = typer.Option("127.0.0.1", metavar="ADDRESS",
                             help="Interface to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port; 0 takes any free one (printed at start)."),
    max_batch: int = typer.Option(16, min=1, help="Micro-batching: most images per model call (1 = off)."),
    max_wait_ms: float = typer.Option(5.0, min=0.0, help="Micro-batching: longest wait for more requests."),
    max_bytes: int = typer.Option(20_000_000, min=1, help="Largest request body accepted (413 above)."),
    threads: Optional[int] = typer.Option(None, min=1, help="Decoding and ONNX Runtime threads \\[default: cores]."),
    cache_dir: Optional[Path] = typer.Option(None, help=CACHE_HELP + " Used for a run folder."),
    threshold: Optional[float] = typer.Option(None, min=0.001, max=0.999,
                                              help="Multi-label models: give every label whose probability reaches "
                                                   "this \\[default: the model's per-class thresholds]."),
) -> None:
    """Serve a classifier over HTTP: POST /v1/predict, /v1/predict/batch; GET /v1/model, /healthz, /docs and a
    page at / where a person drops a photo."""
    from transferkit.serve import ServeConfig, serve

    _setup_logging()
    serve(model, host, port, ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_bytes=max_bytes,
                                         threads=threads, cache_dir=str(cache_dir) if cache_dir else None,
                                         threshold=threshold))


@app.command(epilog="Example: transferkit report runs/cats --data new_photos/")
@_friendly_errors
def report(
    run: Path = typer.Argument(..., help="Run folder written by `transferkit train`."),
    data: Optional[str] = typer.Option(None, metavar="DATA", help="Evaluate on this labelled data \\[default: the "
                                       "run's own test/validation split as training measured it]."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="HTML file \\[default: RUN/report.html]; its PNGs "
                                                                 "go in a NAME_files/ folder beside it."),
    split: Split = typer.Option("auto", case_sensitive=False,
                                help="With --data: auto (other data: all of it; the run's own data: test, else "
                                     "val, else all), train, val, test, all. Without: auto (test, else val), val "
                                     "or test, as training measured them."),
    groups: Optional[Path] = typer.Option(None, help='JSON {"group": ["class", ...]} for accuracy per group.'),
    cache_dir: Optional[Path] = typer.Option(None, help=CACHE_HELP),
    no_cache: bool = _flag("--no-cache", "Neither read nor write the feature cache."),
    engine: Engine = ENGINE_OPTION,
    device: str = DEVICE_OPTION,
) -> None:
    """One self-contained HTML page: learning curves, sample and prediction grids, top losses, confusion matrix,
    per-class table, model and data summaries."""
    from transferkit.report import report as write_report

    _setup_logging()
    page = write_report(run, data, out_file, groups, split, cache_dir=cache_dir, use_cache=not no_cache,
                        engine=engine, device=device)
    out.print(f"Report: [bold]{escape(str(page))}[/] (pictures in {escape(str(page.parent / (page.stem + '_files')))})")


@app.command(epilog="Example: transferkit compare runs/probe runs/finetuned --data new_photos/")
@_friendly_errors
def compare(
    run_a: Path = typer.Argument(..., help="The first run folder (A)."),
    run_b: Path = typer.Argument(..., help="The second run folder (B)."),
    data: Optional[str] = typer.Option(None, metavar="DATA", help="Score both runs on this labelled data \\[default: "
                                       "the images both were evaluated on at training, matched by path]."),
    split: Split = typer.Option("auto", case_sensitive=False,
                                help="With --data: auto (other data: all of it; a run's own data: test, else val), "
                                     "train, val, test, all. Without: auto (test, else val), val or test."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for compare.html, compare.json and the "
                                                                "pictures \\[default: RUN_A/../compare/A-vs-B]."),
    cache_dir: Optional[Path] = typer.Option(None, help=CACHE_HELP),
    no_cache: bool = _flag("--no-cache", "Neither read nor write the feature cache."),
    engine: Engine = ENGINE_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = _flag("--json", "Print the numbers as JSON (as compare.json holds them)."),
) -> None:
    """Two runs on the same images: accuracy overall and per class side by side, the images one gets right and the
    other wrong (pictures on a page), and McNemar's test of whether the difference is more than chance."""
    from transferkit.compare import compare as compare_runs

    _setup_logging()
    result = compare_runs(run_a, run_b, data, out_dir, split, cache_dir=cache_dir, use_cache=not no_cache,
                          engine=engine, device=device)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(f"{plural(result.n, 'image')} compared: {escape(result.scored)}. A = {escape(str(result.run_a))}, "
              f"B = {escape(str(result.run_b))}.", highlight=False)
    out.print(result.table())
    out.print(f"A right, B wrong: {len(result.a_only)}; B right, A wrong: {len(result.b_only)}. "
              f"{escape(result.verdict)}", highlight=False)
    out.print(f"Page: [bold]{escape(str(result.page))}[/]")


@app.command(epilog="Example: transferkit models 'convnext*'")
@_friendly_errors
def models(
    pattern: Optional[str] = typer.Argument(None, help="timm name pattern, e.g. 'convnext*' \\[default: the embedded "
                                                       "backbones and a few popular ones]."),
    as_json: bool = _flag("--json", "Print the table as JSON."),
) -> None:
    """Backbones to pick from, measured on the model objects: parameters, layers, feature size, input size."""
    from transferkit.summary import TOP1_SOURCE, list_backbones

    rows = list_backbones(pattern)
    if as_json:
        out.print_json(json.dumps([row.to_dict() for row in rows]))
        return
    table = Table("name", "weights", "parameters", "as backbone", "layers", "features", "input (train/test)",
                  "weights MB", "ImageNet top-1")
    for row in rows:
        table.add_row(row.name, "[green]embedded[/]" if row.embedded else "download", f"{row.parameters:,}",
                      f"{row.backbone_parameters:,}", str(row.layers), str(row.feature_size),
                      f"{row.input_size}/{row.test_input_size}", f"{row.weights_mb:.1f}",
                      f"{row.imagenet_top1:.1f}%" if row.imagenet_top1 else "-")
    out.print(table)
    out.print(f"parameters: the ImageNet model; as backbone: without its ImageNet classifier, as training and "
              f"`transferkit summary RUN` count them. layers: modules with weights. weights MB: the file on disk "
              f"(embedded) or 4 bytes a parameter. ImageNet top-1: {TOP1_SOURCE}.", highlight=False)


@app.command(epilog="Example: transferkit summary runs/cats")
@_friendly_errors
def summary(
    target: str = typer.Argument(..., help="A run folder or a backbone name."),
    as_json: bool = _flag("--json", "Print the summary as JSON."),
    cache_dir: Optional[Path] = typer.Option(None, help=CACHE_HELP),
) -> None:
    """Parameters (total, trainable, non-trainable), layers and output shapes, like Keras' model.summary()."""
    from transferkit.summary import summarize

    result = summarize(target, cache_dir)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    table = Table("block", "type", "output shape", "parameters", "trainable", title=escape(result.name))
    for row in result.rows:
        table.add_row(escape(row.name), escape(row.kind), " x ".join(map(str, row.output_shape or [])),
                      f"{row.parameters:,}", f"{row.trainable:,}")
    out.print(table)
    for key, value in result.notes.items():
        out.print(f"{key}: {escape(str(value))}")
    out.print(f"Total parameters: {result.total_parameters:,}\nTrainable parameters: {result.trainable_parameters:,}"
              f"\nNon-trainable parameters: {result.non_trainable_parameters:,}\nLayers with weights: "
              f"{result.layers}\nFeature size: {result.feature_size}")


@app.command(epilog="Example: transferkit track runs/cats --to mlflow (the server: MLFLOW_TRACKING_URI)")
@_friendly_errors
def track(
    runs: list[str] = typer.Argument(..., metavar="RUN...", help="Finished run folders."),
    to: list[str] = typer.Option(..., metavar="mlflow|wandb|tensorboard",
                                 help="The tracker to log to (repeat for several)."),
    experiment: Optional[str] = typer.Option(None, metavar="NAME",
                                             help="MLflow experiment / W&B project \\[default: "
                                                  "MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT, else transferkit]."),
) -> None:
    """Log finished runs to experiment trackers afterwards (trained without --track, or while the server was
    down): parameters, each epoch, the final metrics, the run folder and the model."""
    from transferkit.tracking import track_run

    _setup_logging()
    for run in runs:
        ids = track_run(run, to, experiment)
        out.print(f"{escape(str(run))}: " + ", ".join(f"{name} run {run_id}" for name, run_id in ids.items()))


@app.command(epilog="Example: transferkit shard photos/ s3://bucket/shards/ --size 500MB")
@_friendly_errors
def shard(
    data: str = typer.Argument(..., metavar="DATA", help="Folder of class subfolders, folder with train/ (val/, "
                                                         "test/), CSV, WebDataset shards, or an s3:// (gs://, az://) "
                                                         "URL of any of these."),
    out_dir: str = typer.Argument(..., metavar="OUT", help="Folder or s3:// (gs://, az://) URL that gets the shards "
                                                           "(train-000000.tar, ..., val-..., test-...) and "
                                                           "classes.txt."),
    size: str = typer.Option("1GB", metavar="SIZE", help="Largest shard: 1GB, 500MB, 64MiB or bytes (GB = 10^9, "
                                                         "GiB = 2^30); a larger image gets a shard of its own."),
    val: Optional[str] = typer.Option(None, metavar="DATA", help="Explicit validation data (same forms as DATA)."),
    test: Optional[str] = typer.Option(None, metavar="DATA", help="Explicit test data (same forms as DATA)."),
    val_percent: float = typer.Option(10.0, min=0.0, max=99.0, help="Share of DATA held out for validation when it "
                                                                    "has no val/ folder."),
    test_percent: float = typer.Option(10.0, min=0.0, max=99.0, help="Share of DATA held out for testing when it "
                                                                     "has no test/ folder."),
    multi_label: bool = _flag("--multi-label", "Several labels an image \\[default: detected from the CSV]."),
    single_label: bool = _flag("--single-label", "Exactly one label an image."),
    label_sep: Optional[str] = typer.Option(None, metavar="SEP", help="The separator of several labels in a CSV's "
                                            "label field \\[default: detected]."),
    overwrite: bool = _flag("--overwrite", "Replace the shards OUT already holds."),
    as_json: bool = _flag("--json", "Print what was written as JSON."),
) -> None:
    """Write DATA as WebDataset tar shards with the splits train would use: the images' original bytes, their
    labels (.cls, .json) and classes.txt. `transferkit train OUT` then reads them."""
    from transferkit.make_shards import write_shards

    _setup_logging()
    result = write_shards(data, out_dir, size=size, val=val, test=test, val_percent=val_percent,
                          test_percent=test_percent, multi_label=_label_kind(multi_label, single_label),
                          label_sep=label_sep, overwrite=overwrite)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(escape(result.summary()))
    if result.skipped:
        table = Table("file", "why", title=f"skipped ({len(result.skipped)})", title_justify="left")
        for item in result.skipped[:10]:
            table.add_row(escape(item.path), escape(item.reason))
        out.print(table)


@app.command(epilog="Example: transferkit doctor photos/ --report doctor.html")
@_friendly_errors
def doctor(
    data: str = typer.Argument(..., help="Folder or CSV, as for train."),
    val: Optional[str] = typer.Option(None, metavar="DATA", help="Explicit validation data (same forms as DATA)."),
    test: Optional[str] = typer.Option(None, metavar="DATA", help="Explicit test data (same forms as DATA)."),
    report_file: Optional[Path] = typer.Option(None, "--report", help="Also write an HTML page with thumbnails."),
    near_duplicate_cosine: float = typer.Option(0.97, min=0.0, max=1.0, metavar="", help="Feature similarity for near "
                                                                             "duplicates."),
    cache_dir: Optional[Path] = typer.Option(None, help=CACHE_HELP),
    as_json: bool = _flag("--json", "Print the findings as JSON."),
    multi_label: bool = _flag("--multi-label", "Several labels an image \\[default: detected from the CSV]."),
    single_label: bool = _flag("--single-label", "Exactly one label an image."),
    label_sep: Optional[str] = typer.Option(None, metavar="SEP", help="The separator of several labels in a CSV's "
                                            "label field \\[default: detected]."),
) -> None:
    """Check a dataset: unreadable/odd files, duplicates and train/val leakage, imbalance, likely label errors."""
    from transferkit.doctor import TITLES, diagnose, write_html

    _setup_logging()
    result = diagnose(data, val, test, near_duplicate_cosine=near_duplicate_cosine, cache_dir=cache_dir,
                      multi_label=_label_kind(multi_label, single_label), label_sep=label_sep)
    if report_file is not None:
        write_html(result, report_file)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(escape(result.summary()))
    for kind, count in result.totals().items():
        table = Table("file", "why", title=f"{TITLES.get(kind, kind)} ({count})", title_justify="left")
        for finding in result.of_kind(kind)[:10]:
            table.add_row(escape(str(finding.path)), escape(finding.detail))
        out.print(table)
    possible = sum(not issue.likely for issue in result.label_issues)
    if possible:
        out.print(f"cleanlab ranks {plural(possible, 'more image')} as possible label issues, less certain: see "
                  f"{'the report' if report_file else '--report or --json'}.")
    if report_file is not None:
        out.print(f"Report: [bold]{escape(str(report_file))}[/]")


@app.command(epilog="Example: transferkit download hymenoptera")
@_friendly_errors
def download(
    name: Optional[str] = typer.Argument(None, help="A dataset from --list (hymenoptera, flowers, pets, dogs, "
                                                    "food-101); with --url, the folder to unpack into."),
    to: Path = typer.Option(Path("data"), help="Folder that gets one subfolder per dataset."),
    url: Optional[str] = typer.Option(None, metavar="URL", help="Any zip or tar archive instead of a named dataset."),
    sha256: Optional[str] = typer.Option(None, metavar="HEX",
                                         help="With --url: the archive's SHA-256, checked before unpacking."),
    force: bool = _flag("--force", "Download again and replace the dataset folder."),
    keep_archives: bool = _flag("--keep-archives", "Keep the archives in TO/.downloads after unpacking."),
    list_datasets: bool = _flag("--list", "List the named datasets."),
    as_json: bool = _flag("--json", "Print where the dataset is as JSON."),
) -> None:
    """Fetch and unpack a classic transfer-learning set (or any --url archive) in a layout train reads: checked
    against its size and SHA-256, resumed when interrupted, archive paths that lead out refused."""
    from transferkit.download import DATASETS, download as download_dataset, download_url
    from transferkit.errors import DownloadError

    if list_datasets:
        table = Table("name", "what", "source", title="transferkit download NAME", title_justify="left")
        for spec in DATASETS.values():
            table.add_row(spec.name, spec.description, "\n".join(remote.url for remote in spec.files))
        out.print(table)
        return
    if name is None and url is None:
        raise DownloadError("give a dataset NAME (see `transferkit download --list`) or --url.")
    options = dict(to=to, force=force, keep_archives=keep_archives)
    result = download_url(url, sha256=sha256, name=name, **options) if url else download_dataset(name, **options)
    if as_json:
        out.print_json(json.dumps({"name": result.name, "folder": str(result.folder), "data": str(result.data),
                                   "fetched": result.fetched}))
        return
    state = "downloaded to" if result.fetched else "already in"
    out.print(escape(f"{result.name}: {state} {result.folder}. Train with:\n  transferkit train {result.data}"))


@app.command(epilog="Example: transferkit demo")
@_friendly_errors
def demo(
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder \\[default: runs/<timestamp>]."),
    cache_dir: Optional[Path] = typer.Option(None, help="Where the demo images and features are kept."),
) -> None:
    """Offline demo: write scikit-learn's handwritten digits as image folders and train on them."""
    from transferkit.demo import run_demo, sample_predictions

    _setup_logging()
    result = run_demo(out_dir, cache_dir)
    _print_train_result(result, as_json=False)
    table = Table("image", "true label", "predicted", "probability",
                  title="a few test predictions (one per class, and a mistake if there is one)")
    for shown in sample_predictions(result.run_dir):
        colour = "green" if shown.predicted == shown.label else "red"
        table.add_row(escape(shown.path), escape(shown.label), f"[{colour}]{escape(shown.predicted)}[/]",
                      f"{shown.probability:.3f}")
    out.print(table)


@app.command("runs", epilog="Example: transferkit runs runs/ --json")
@_friendly_errors
def runs_command(
    folder: Path = typer.Argument(Path("runs"), help="The folder that holds the runs."),
    as_json: bool = _flag("--json", "Print the list as JSON."),
) -> None:
    """The finished runs in a folder, newest first: date, data, mode, backbone, accuracy and key options."""
    from transferkit.errors import RunError
    from transferkit.runs import list_runs

    found = list_runs(folder)
    if not found:
        raise RunError(f"no runs in {folder}; train one with `transferkit train DATA --out {folder}/NAME`.")
    if as_json:
        out.print_json(json.dumps([run.to_dict() for run in found]))
        return
    table = Table("run", "date", "data", "mode", "backbone", "accuracy", "options", title=escape(str(folder)),
                  title_justify="left")
    for run in found:
        accuracy = ("-" if run.accuracy is None else
                    f"{run.accuracy:.3f} ({run.accuracy_split}{', mAP' if run.measure == 'mAP' else ''})")
        table.add_row(*map(escape, (run.path.name, run.date, run.data, run.mode, run.backbone, accuracy,
                                    run.options)))
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
