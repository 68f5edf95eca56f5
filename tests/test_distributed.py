"""Real 2-process DDP jobs (torchrun, gloo on CPU) against the single-process run on the same synthetic images."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import transferkit
from transferkit.backbone import open_backbone
from transferkit.data import list_images
from transferkit.distributed import Ranks
from transferkit.features import Extractor, FeatureCache, extract_features

from conftest import make_image_folder

SIZE = ["--image-size", "96", "--workers", "1", "--engine", "onnxruntime"]


def _two_processes(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "transferkit", "train", "--nproc", "2", *arguments]


def _cached_features(cache_dir: Path, paths: list[Path]) -> np.ndarray:
    """The features `cache_dir` holds for `paths`, read without running the backbone."""
    extractor = Extractor(open_backbone(image_size=96), engine="onnxruntime")
    cache = FeatureCache(cache_dir)
    try:
        features = extract_features(extractor, paths, cache, progress=False)
    finally:
        cache.close()
    assert features.computed == 0, "the cache should already hold every image"
    return features.features


def test_ranks_share_out_work():
    items = list(range(10))
    shards = [Ranks(rank, 3).shard(items) for rank in range(3)]
    assert sorted(sum(shards, [])) == items and [len(s) for s in shards] == [4, 3, 3]


@pytest.mark.slow
def test_two_processes_match_one(split_folder, tmp_path):
    single = transferkit.train(split_folder, out=tmp_path / "single", cache_dir=str(tmp_path / "cache1"),
                               progress=False, report=False, image_size=96, workers=1, engine="onnxruntime")
    done = subprocess.run(_two_processes(str(split_folder), "--out", str(tmp_path / "double"), "--cache-dir",
                                         str(tmp_path / "cache2"), "--json", *SIZE), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one summary: only rank 0 prints
    paths = list_images([split_folder])
    assert summary["features_computed"] == len(paths) and summary["features_from_cache"] == 0
    np.testing.assert_allclose(_cached_features(tmp_path / "cache2", paths),
                               _cached_features(tmp_path / "cache1", paths), atol=1e-5)
    assert abs(summary["val_accuracy"] - single.val_accuracy) <= 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache1", "cache2", "double", "layout", "single"]
    assert sorted(p.name for p in (tmp_path / "double").iterdir()) == [
        "config.json", "history.csv", "labels.txt", "metrics.json", "model.safetensors", "novelty.npz",
        "predictions.csv", "report.html", "report_files", "skipped.txt"]
    val = sorted((split_folder / "val").glob("*/*.jpg"))
    predicted = transferkit.Classifier.load(tmp_path / "double").predict(val)
    assert sum(p.label == path.parent.name for p, path in zip(predicted, val)) >= 0.9 * len(val)


def _indexed_rows(cache_dir: Path) -> int:
    """Feature rows committed to the cache's index (what a killed run keeps)."""
    try:
        with sqlite3.connect(next(cache_dir.rglob("index.sqlite")), timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
    except (StopIteration, sqlite3.Error):
        return 0


def _process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, pending = [], [pid]
    while pending:
        tree.append(pending.pop())
        pending += children.get(tree[-1], [])
    return tree


@pytest.mark.slow
def test_killed_two_process_run_resumes(tmp_path, cache_dir):
    data = make_image_folder(tmp_path / "data", per_class=100, seed=4)
    cache = cache_dir
    run = tmp_path / "run"
    process = subprocess.Popen(_two_processes(str(data), "--out", str(run), "--cache-dir", str(cache), *SIZE),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and _indexed_rows(cache) < 16:
        time.sleep(0.05)
    for pid in _process_tree(process.pid):  # kill -9 the whole job: torchrun and both workers
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    kept = _indexed_rows(cache)
    assert not run.exists() and 16 <= kept < 300, "the kill should land mid-extraction"
    resumed = subprocess.run(_two_processes("--resume", str(run), "--json"), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["features_from_cache"] >= kept and summary["features_computed"] == 300 - summary[
        "features_from_cache"]
    assert (run / "model.safetensors").is_file() and summary["val_accuracy"] >= 0.9


@pytest.mark.slow
def test_two_process_fine_tuning(split_folder, tmp_path, cache_dir):
    done = subprocess.run(_two_processes(str(split_folder), "--mode", "finetune", "--epochs", "2", "--batch-size",
                                         "6", "--out", str(tmp_path / "run"), "--cache-dir", str(cache_dir),
                                         "--json", *SIZE), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("continue it with") == 1  # only rank 0 speaks
    summary = json.loads(done.stdout)
    history = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert [row["stage"] for row in history[-2:]] == ["finetune", "finetune"]
    assert summary["val_accuracy"] >= 0.8
    assert transferkit.Classifier.load(tmp_path / "run").config["mode"] == "finetune"
