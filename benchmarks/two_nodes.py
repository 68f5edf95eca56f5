"""Issue #28 number: two torchrun nodes with no shared file system produce the same model as one process.

Two `torchrun --nnodes 2 --node_rank K --nproc_per_node 1` commands on loopback stand for two machines: each runs in
a folder of its own with its own feature cache (TRANSFERKIT_CACHE_DIR=<tmp>/cache<K>); the ranks exchange features
through the process group and only rank 0 writes a run folder. Against them: one plain process with a third cache.
The backbone's ONNX export is made once beforehand and linked into each cache (as on any machine after its first run).

Data: hymenoptera's train/ (validation split drawn from it) with its val/ folder as the test set.
Prints: the largest absolute difference between the two models' tensors (head weights), both test accuracies, wall
times, and how many feature rows each cache holds.

Usage: python benchmarks/two_nodes.py [--data ../shared/datasets/hymenoptera] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.numpy

from transferkit.backbone import open_backbone
from transferkit.data import list_images
from transferkit.features import Extractor, extract_features

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def feature_rows(cache: Path) -> int:
    """Feature rows in a cache's index."""
    rows = 0
    for index in cache.rglob("index.sqlite"):
        with sqlite3.connect(index) as db:
            rows += db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
    return rows


def fresh_cache(folder: Path, onnx: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "onnx").symlink_to(onnx, target_is_directory=True)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_command(data: Path, test: Path) -> list[str]:
    return ["-m", "transferkit", "train", str(data), "--test", str(test), "--out", "run", "--json", "--no-report"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "hymenoptera")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it, instead of a temporary one")
    args = parser.parse_args()
    data, test = args.data / "train", args.data / "val"
    with tempfile.TemporaryDirectory(prefix="two-nodes-") as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        onnx = tmp / "onnx"
        onnx.mkdir()
        first = list_images([data])[:1]
        extract_features(Extractor(open_backbone(), cache_dir=tmp), first, progress=False)  # the one-off export

        single = tmp / "single"
        single.mkdir()
        env = {**os.environ, "TRANSFERKIT_CACHE_DIR": str(fresh_cache(tmp / "cache-single", onnx))}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, *train_command(data, test)], cwd=single, env=env, capture_output=True,
                              text=True)
        single_s = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"the one-process run failed:\n{done.stderr[-3000:]}")
        alone = json.loads(done.stdout)

        port, nodes = free_port(), []
        started = time.perf_counter()
        for node in (0, 1):
            folder = tmp / f"node{node}"
            folder.mkdir()
            env = {**os.environ, "TRANSFERKIT_CACHE_DIR": str(fresh_cache(tmp / f"cache{node}", onnx))}
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                       "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                       *train_command(data, test)]
            nodes.append(subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        outputs = [process.communicate() for process in nodes]
        nodes_s = time.perf_counter() - started
        for node, (process, (_, stderr)) in enumerate(zip(nodes, outputs)):
            if process.returncode != 0:
                sys.exit(f"node {node} failed:\n{stderr[-3000:]}")
        ranked = json.loads(outputs[0][0])

        ours = safetensors.numpy.load_file(tmp / "node0" / "run" / "model.safetensors")
        theirs = safetensors.numpy.load_file(single / "run" / "model.safetensors")
        assert ours.keys() == theirs.keys(), (sorted(ours), sorted(theirs))
        images = len(list_images([data])) + len(list_images([test]))
        print(f"data: {args.data} ({images} images: train/ split into train + val, val/ as the test set)")
        print(f"max |difference| of the models' tensors ({', '.join(sorted(ours))}): "
              f"{max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours):.3g}")
        print(f"test accuracy: one process {alone['test_accuracy']:.4f}, two nodes {ranked['test_accuracy']:.4f}")
        print(f"val accuracy:  one process {alone['val_accuracy']:.4f}, two nodes {ranked['val_accuracy']:.4f}")
        print(f"wall time (cold feature caches, both nodes on this one {os.cpu_count()}-core machine): one process "
              f"{single_s:.1f} s, two nodes {nodes_s:.1f} s")
        print(f"features computed: one process {alone['features_computed']}, two nodes {ranked['features_computed']} "
              f"(summed over ranks)")
        print(f"feature rows in each cache: one process {feature_rows(tmp / 'cache-single')}, node 0 "
              f"{feature_rows(tmp / 'cache0')}, node 1 {feature_rows(tmp / 'cache1')}")
        print(f"run folders: node 0 {(tmp / 'node0' / 'run').is_dir()}, node 1 {(tmp / 'node1' / 'run').exists()}; "
              f"node 1 printed {len(outputs[1][0])} characters")


if __name__ == "__main__":
    main()
