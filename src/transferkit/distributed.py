"""Several processes, one run: PyTorch DDP as launched by `torchrun` (gloo on CPU, nccl on CUDA).

`torchrun --nproc_per_node N -m transferkit train ...` starts N copies of the same command; each finds its rank in
the environment torchrun sets. `transferkit train --nproc N` is a shortcut that starts torchrun itself. Only rank 0
writes the run folder. Each rank extracts its share of the images into its own feature cache (one folder shared by
the ranks of a machine, or one per machine with no shared file system) and the ranks exchange the features through
the process group (`gather_rows`), so no rank reads another's cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from transferkit.runs import StagedRun


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank among `world_size` processes, `local_rank` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list) -> list:
        """This rank's share of `items`: every world_size-th one, starting at its rank."""
        return items[self.rank::self.world_size]


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Ranks:
    """The ranks of an initialised process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Ranks()


def setup(device: str) -> Ranks:
    """Join the process group torchrun describes (once per process): nccl when each rank has a GPU, gloo otherwise.

    On CUDA each rank takes the GPU of its local rank; on CPU the machine's cores are split between its ranks.
    """
    if not launched_by_torchrun():
        return Ranks()
    if not dist.is_initialized():
        local_rank = int(os.environ["LOCAL_RANK"])
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        else:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return current()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over all ranks (unchanged in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor(values, dtype=torch.float64, device=device)  # nccl reduces tensors on the GPU only
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_rows(indices: np.ndarray, rows: np.ndarray,
                notes: list[Any] | None = None) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Every rank's rows, on every rank. Row j of `rows` is item `indices[j]` of a list all ranks share out (each
    item held by at most one rank); returns (indices, rows) of all ranks with the indices ascending, so rows come
    back in the list's order whatever each rank's share, and the `notes` of all ranks, rank 0's first.

    One all_gather_object of numpy arrays (pickled whole, no per-number objects): gloo on CPU, nccl on the GPU
    torch.cuda.current_device() names. A single process gets its own rows back, sorted.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    rows = np.asarray(rows)
    if len(indices) != len(rows):
        raise ValueError(f"{len(indices)} indices for {len(rows)} rows")
    parts = [(indices, rows, list(notes or []))]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (indices, rows, list(notes or [])))
    held = [(i, r) for i, r, _ in parts if len(i)]
    gathered_notes = [note for _, _, part in parts for note in part]
    if not held:
        return np.empty(0, dtype=np.int64), rows[:0], gathered_notes
    all_indices = np.concatenate([i for i, _ in held])
    all_rows = np.concatenate([r for _, r in held])
    order = np.argsort(all_indices, kind="stable")
    all_indices = all_indices[order]
    if len(all_indices) > 1 and (np.diff(all_indices) == 0).any():
        raise ValueError("gather_rows: two ranks hold the same item")
    return all_indices, all_rows[order], gathered_notes


def launch(nproc: int, arguments: list[str]) -> int:
    """`torchrun --standalone --nproc_per_node nproc -m transferkit ARGUMENTS` on this machine; its exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "transferkit", *arguments]
    return subprocess.run(command).returncode


class ScratchRun(StagedRun):
    """What ranks other than 0 write instead of the run folder: a private folder thrown away at the end."""

    def __init__(self):
        self.staging = Path(tempfile.mkdtemp(prefix="transferkit-rank-"))

    def __enter__(self) -> ScratchRun:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
