"""Run directories: everything one training run produced, written all at once or not at all."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime
from pathlib import Path

from transferkit.errors import RunError

RUN_FORMAT = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "labels.txt")


def default_run_dir(root: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = Path(root) / stamp, 1
    while candidate.exists():
        n += 1
        candidate = Path(root) / f"{stamp}-{n}"
    return candidate


class StagedRun:
    """A run written into a hidden sibling folder, renamed into place only when complete.

    A crash at any moment leaves either no run or the whole run, never one that loads half-way.
    """

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        if self.out.exists() and not overwrite and (not self.out.is_dir() or any(self.out.iterdir())):
            raise RunError(f"{self.out} already exists; choose another --out, or pass --overwrite to replace it.")
        self.staging = self.out.parent / f".{self.out.name}.partial-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> StagedRun:
        try:
            self.staging.mkdir(parents=True)
        except OSError as err:
            raise RunError(f"cannot create the run folder in {self.out.parent}: {err.strerror or err}; "
                           "choose a writable --out.") from err
        return self

    def path(self, name: str) -> Path:
        return self.staging / name

    def write_text(self, name: str, text: str) -> None:
        self.path(name).write_text(text, encoding="utf-8")

    def write_json(self, name: str, value: object) -> None:
        self.write_text(name, json.dumps(value, indent=2, allow_nan=False) + "\n")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        for file in self.staging.iterdir():
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
    config = json.loads((run / "config.json").read_text())
    if config.get("format", 0) > RUN_FORMAT:
        raise RunError(f"{run} was written by a newer transferkit (run format {config['format']}); upgrade it.")
    return config
