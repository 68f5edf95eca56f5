"""What a W&B offline run wrote, read back from its run-ID.wandb file for tests: the run, its config, each history
row, summary updates and artefacts.

The file is W&B's transaction log: a 7-byte header (":W&B", a magic number, a version), then LevelDB's log format
(32 KiB blocks of chunks, each with a 7-byte header: checksum, length, type; a record spans FIRST..LAST chunks),
each record one `wandb_internal_pb2.Record`. wandb 0.31 no longer ships a Python reader, hence these lines.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, LAST = 1, 4


@dataclass
class OfflineRun:
    run_id: str = ""
    name: str = ""
    project: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: dict[str, list[str]] = field(default_factory=dict)
    exit_code: int | None = None


def _records(path: Path):
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + HEADER])
        pending += data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, LAST):
            yield pending
            pending = b""


def read_offline_run(folder: Path) -> OfflineRun:
    """The run written under `folder` (a wandb/offline-run-* folder)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("run-*.wandb")
    run = OfflineRun()
    for data in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name, run.project = record.run.run_id, record.run.display_name, record.run.project
            run.config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            run.history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
        elif kind == "summary":
            run.summary.update({item.key: json.loads(item.value_json) for item in record.summary.update if item.key})
        elif kind == "artifact":
            run.artifacts[record.artifact.name] = [entry.path for entry in record.artifact.manifest.contents]
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
