"""Run directories: everything one training run produced, written all at once or not at all."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from transferkit import storage, tables
from transferkit.errors import RunError, StorageError, TrainingInterrupted, TransferkitError, storage_problem

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one run per --out is then the user's business
    fcntl = None

log = logging.getLogger("transferkit")

RUN_FORMAT = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "labels.txt")
CHECKPOINT = "checkpoint.pt"
# What loading a run reads from its config.json: section -> the keys it must hold.
CONFIG_KEYS = {"labels": (), "data": (), "backbone": ("name", "architecture", "weights_id"),
               "head": ("kind", "in_features", "num_classes"),
               "preprocessing": ("input_size", "interpolation", "mean", "std", "crop_pct")}


def default_run_dir(root: str | Path = "runs") -> Path:
    """ROOT/YYYYMMDD-HHMMSS: a new run's default name (`StagedRun(..., unique=True)` takes the next free one)."""
    return Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")


def staging_dir(out: str | Path) -> Path:
    """Where the run that will become `out` is written, checkpoints included, until it is complete."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def write_atomically(path: Path, write) -> None:
    """`write(temporary_path)`, flushed to disk, then renamed over `path`: readers see the old or the new file."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err  # the file the user asked for, not our temporary
    finally:
        temporary.unlink(missing_ok=True)


def save_checkpoint(folder: Path, state: dict) -> None:
    # Serialised in memory first: torch.save's own file writer turns a full disk into an opaque RuntimeError.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(folder / CHECKPOINT, lambda temporary: temporary.write_bytes(buffer.getbuffer()))


def load_checkpoint(folder: Path) -> dict | None:
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunError(f"the checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                       "pass --overwrite to start the run again.") from err


class StagedRun:
    """A run written into a hidden sibling folder (`staging_dir`), renamed into place only when complete.

    A crash at any moment leaves either no run or the whole run, never one that loads half-way. Image-training
    modes keep a checkpoint in the staging folder; an interrupted run leaves it there for `resume`. A lock file
    stops two processes from writing the same run.
    """

    def __init__(self, out: str | Path, overwrite: bool = False, resume: bool = False, unique: bool = False):
        """unique: `out` is a default name; when another run has it (finished or being written), the run takes the
        first free one of OUT-2, OUT-3... on entering (`self.out` then names it)."""
        self.out = Path(out)
        self.overwrite = overwrite
        self.resume = resume
        self.unique = unique
        if (not unique and self.out.exists() and not overwrite
                and (not self.out.is_dir() or any(self.out.iterdir()))):
            raise RunError(f"{self.out} already exists; choose another --out, or pass --overwrite to replace it.")
        self.staging = staging_dir(self.out)
        self._lock = None

    def __enter__(self) -> StagedRun:
        try:
            if self.unique:
                self._claim_free_name()
            else:
                self.staging.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.staging / ".lock", "w")
        except OSError as err:
            raise RunError(f"cannot create the run folder in {self.out.parent}: {err.strerror or err}; "
                           "choose a writable --out.") from err
        if fcntl is not None:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock.close()
                raise RunError(f"another transferkit process is writing {self.out}; wait for it to finish or "
                               "choose another --out.") from None
        leftovers = [p for p in self.staging.iterdir() if p.name != ".lock"]
        if leftovers and not self.resume:
            if (self.staging / CHECKPOINT).exists() and not self.overwrite:
                self._release()
                raise RunError(f"{unfinished_run(self.out)}, or pass --overwrite to start again.")
            for leftover in leftovers:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        return self

    def _claim_free_name(self) -> None:
        """The first of OUT, OUT-2, OUT-3... that no run has, claimed by creating its staging folder: mkdir is atomic,
        so two processes starting in the same second never share a name."""
        base = self.out
        for n in itertools.count(1):
            self.out = base if n == 1 else base.with_name(f"{base.name}-{n}")
            self.staging = staging_dir(self.out)
            if self.out.exists():
                continue
            try:
                self.staging.mkdir(parents=True)
            except FileExistsError:
                continue
            if not self.out.exists():
                return
            self.staging.rmdir()  # a run of this name finished in between

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def path(self, name: str) -> Path:
        return self.staging / name

    def write_text(self, name: str, text: str) -> None:
        self.path(name).write_text(text, encoding="utf-8")

    def write_bytes(self, name: str, data: bytes) -> None:
        self.path(name).write_bytes(data)

    def write_json(self, name: str, value: object) -> None:
        self.write_text(name, json.dumps(value, indent=2, allow_nan=False) + "\n")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            # an interrupted run keeps its checkpoint for `resume`; a fresh one stopped by a user error does not
            problem = storage_problem(exc)
            resumable = (self.staging / CHECKPOINT).exists() and (
                self.resume or problem is not None or not issubclass(exc_type, TransferkitError))
            if not resumable:
                shutil.rmtree(self.staging, ignore_errors=True)
            self._release()
            if problem is not None:
                then = (f"continue the run with `transferkit train --resume {self.out}` (the work done so far is "
                        "kept)" if resumable else "run again")
                raise StorageError(f"the run stopped: {problem}; then {then}.") from exc
            if resumable and issubclass(exc_type, KeyboardInterrupt):
                raise TrainingInterrupted(self.out) from exc
            return
        (self.staging / CHECKPOINT).unlink(missing_ok=True)
        (self.staging / ".lock").unlink(missing_ok=True)
        self._release()
        for file in self.staging.iterdir():
            if file.is_dir():
                continue
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        replaced = None
        if self.out.exists():
            replaced = self.out.parent / f".{self.out.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, replaced)
        os.rename(self.staging, self.out)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)


def unfinished_run(run: Path) -> str:
    """What every command says of a run that was interrupted."""
    return (f"{run} is an unfinished run that was interrupted; continue it with `transferkit train --resume {run}` "
            f"(in Python: transferkit.resume)")


def damaged_file(path: Path, problem: object) -> RunError:
    reason = " ".join(str(problem).split())
    return RunError(f"{path} is damaged ({reason}): retrain, or restore it from a copy.")


def _config_problem(config: object) -> str | None:
    """What is missing from a config.json that loading a run needs, or None."""
    if not isinstance(config, dict):
        return "not a JSON object"
    for section, keys in CONFIG_KEYS.items():
        value = config.get(section)
        if not isinstance(value, list if section == "labels" else dict):
            return f"no {section!r} section"
        missing = [key for key in keys if key not in value]
        if missing:
            return f"no {missing[0]!r} in its {section!r} section"
    return None


def read_run_config(run: str | Path) -> dict:
    """A run's config.json, checked along with its model.safetensors: a damaged run fails here, in one line. Its
    data paths are absolute (those of runs written before they were stored absolute are resolved here)."""
    run = Path(run)
    if not (run / "config.json").is_file() and (staging_dir(run) / CHECKPOINT).is_file():
        raise RunError(f"{unfinished_run(run)} before using it.")
    if not run.is_dir():
        raise RunError(f"{run} is not a run folder; give the folder `transferkit train` wrote (e.g. runs/...).")
    missing = [name for name in REQUIRED_FILES if not (run / name).is_file()]
    if missing:
        raise RunError(f"{run} is not a complete transferkit run (missing {', '.join(missing)}).")
    try:
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except ValueError as err:
        raise damaged_file(run / "config.json", err) from None
    if isinstance(config, dict) and config.get("format", 0) > RUN_FORMAT:
        raise RunError(f"{run} was written by a newer transferkit (run format {config['format']}); upgrade it.")
    problem = _config_problem(config)
    if problem:
        raise damaged_file(run / "config.json", problem)
    try:
        with safe_open(run / "model.safetensors", "pt") as weights:
            weights.keys()
    except (SafetensorError, OSError) as err:
        raise damaged_file(run / "model.safetensors", err) from None
    data = config["data"]
    named = {key: data[key] for key in ("source", "val", "test") if data.get(key)}
    return {**config, "data": {**data, **dict(zip(named, stored_paths(run, list(named.values()))))}}


def absolute_path(path: str | Path | None) -> str | None:
    """A path as a run stores it: absolute, so the run works from any folder and after it is moved; a URL as it is,
    less any user:password part."""
    if path and _is_remote(str(path)):
        return storage.redact(str(path))
    return os.path.abspath(os.path.expanduser(path)) if path else None


def _is_remote(path: str) -> bool:
    from transferkit.data import is_remote

    return is_remote(path) or path.startswith(tables.PREFIX)


def stored_paths(run: str | Path, paths: list[str]) -> list[str]:
    """Paths a run stored, absolute. Runs written before transferkit stored them absolute hold them relative to the
    folder training ran in: the working directory, else the first folder above the run where they exist."""
    relative = [path for path in paths if not os.path.isabs(os.path.expanduser(path)) and not _is_remote(path)]
    if not relative:
        return paths
    base = next((folder for folder in (Path.cwd(), *Path(run).absolute().parents) if (folder / relative[0]).exists()),
                Path.cwd())
    return [path if _is_remote(path) else os.path.normpath(os.path.join(base, os.path.expanduser(path)))
            for path in paths]


def warn_missing_images(run: str | Path, paths: list[str]) -> None:
    """One warning line when images a run stored (its evaluation images) are gone from where they were."""
    missing = [path for path in paths if not _is_remote(path) and not os.path.exists(path)]
    if missing:
        folder = os.path.commonpath([os.path.dirname(path) for path in missing])
        log.warning("%d of %d images %s was evaluated on are missing (expected under %s); put them back there, or "
                    "give their new location as the data to evaluate the run afresh",
                    len(missing), len(paths), run, folder)


def read_metrics(run: str | Path) -> dict:
    """A run's metrics.json by split ({} when it has none)."""
    try:
        return json.loads((Path(run) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def load_run_dataset(config: dict, source: str | Path | None = None):
    """The dataset a run was trained on (or `source`, split the same way), from its config."""
    from transferkit.data import load_dataset

    data = config["data"]
    return load_dataset(source or data["source"], data.get("val"), data.get("test"), data.get("val_percent", 10.0),
                        data.get("test_percent", 10.0), **label_options(config))


def label_options(config: dict) -> dict:
    """How load_dataset must read a multi-label run's data (label sets, with the separator training used); {} for a
    single-label run."""
    data = config.get("data", {})
    return {"multi_label": True, "label_sep": data.get("label_sep")} if data.get("multi_label") else {}


@dataclass(frozen=True)
class RunSummary:
    """One finished run as `transferkit runs` lists it."""

    path: Path
    date: str  # when its config.json was written, local time
    data: str
    mode: str
    backbone: str
    accuracy: float | None  # on the test split, else on validation (multi-label runs: the macro mAP)
    accuracy_split: str | None
    options: str  # the options that shape a run most, e.g. "head=linear epochs=100 lr=0.001"
    measure: str = "accuracy"
    """What `accuracy` measures: accuracy, or "mAP" for a multi-label run."""

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


SUMMARY_OPTIONS = ("head", "epochs", "lr", "batch_size", "optimizer", "augment")


def list_runs(root: str | Path = "runs") -> list[RunSummary]:
    """The finished runs in `root` (or `root` itself when it is one), newest first; other folders are left out."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"no runs in {root}: it is not a folder; give the folder that holds the runs (runs/ by "
                       "default).")
    folders = [root] if (root / "config.json").is_file() else sorted(p for p in root.iterdir() if p.is_dir())
    found = []
    for folder in folders:
        try:
            config = read_run_config(folder)
            written = (folder / "config.json").stat().st_mtime
        except (TransferkitError, OSError, ValueError):
            continue
        metrics = read_metrics(folder)
        split = next((s for s in ("test", "val") if "accuracy" in metrics.get(s, {})), None)
        train_options = config.get("train", {})
        found.append(RunSummary(
            folder, datetime.fromtimestamp(written).strftime("%Y-%m-%d %H:%M"), str(config["data"].get("source")),
            config.get("mode", "probe"), config["backbone"].get("name", "?"),
            metrics[split].get("map_macro", metrics[split]["accuracy"]) if split else None, split,
            " ".join(f"{k}={train_options[k]}" for k in SUMMARY_OPTIONS if train_options.get(k) is not None),
            "mAP" if split and metrics[split].get("multi_label") else "accuracy"))
    return sorted(found, key=lambda run: run.date, reverse=True)
