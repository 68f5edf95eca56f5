"""Run directories: everything one training run produced, written all at once or not at all."""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from datetime import datetime
from pathlib import Path

import torch

from transferkit.errors import RunError, StorageError, TransferkitError, storage_problem

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one run per --out is then the user's business
    fcntl = None

RUN_FORMAT = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "labels.txt")
CHECKPOINT = "checkpoint.pt"


def default_run_dir(root: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = Path(root) / stamp, 1
    while candidate.exists():
        n += 1
        candidate = Path(root) / f"{stamp}-{n}"
    return candidate


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

    def __init__(self, out: str | Path, overwrite: bool = False, resume: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        self.resume = resume
        if self.out.exists() and not overwrite and (not self.out.is_dir() or any(self.out.iterdir())):
            raise RunError(f"{self.out} already exists; choose another --out, or pass --overwrite to replace it.")
        self.staging = staging_dir(self.out)
        self._lock = None

    def __enter__(self) -> StagedRun:
        try:
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
                raise RunError(f"{self.out} is an unfinished run that was interrupted; continue it with "
                               f"`transferkit train --resume {self.out}`, or pass --overwrite to start again.")
            for leftover in leftovers:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        return self

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


def read_run_config(run: str | Path) -> dict:
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"{run} is not a run folder; give the folder `transferkit train` wrote (e.g. runs/...).")
    missing = [name for name in REQUIRED_FILES if not (run / name).is_file()]
    if missing:
        raise RunError(f"{run} is not a complete transferkit run (missing {', '.join(missing)}).")
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    if config.get("format", 0) > RUN_FORMAT:
        raise RunError(f"{run} was written by a newer transferkit (run format {config['format']}); upgrade it.")
    return config


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
                        data.get("test_percent", 10.0))
