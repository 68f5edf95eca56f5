"""Real 2-process DDP jobs (torchrun, gloo on CPU) against the single-process run on the same synthetic images."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib
import json
import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import transferkit
from transferkit.backbone import open_backbone
from transferkit.config import TrainConfig
from transferkit.data import Skipped, list_images, load_dataset
from transferkit.distributed import Ranks, gather_rows
from transferkit.features import Extractor, FeatureCache, FeatureSet, extract_features

from conftest import fresh_cache, make_image_folder

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


# ------------------------------------------------------------------ features gathered through the process group


def test_gather_rows_in_one_process_sorts_by_index():
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    indices, gathered, notes = gather_rows(np.array([3, 0, 2, 1]), rows, ["a"])
    assert indices.tolist() == [0, 1, 2, 3] and notes == ["a"]
    np.testing.assert_array_equal(gathered, rows[[1, 3, 2, 0]])
    assert gathered.dtype == np.float32
    indices, gathered, notes = gather_rows(np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32))
    assert indices.shape == (0,) and gathered.shape[0] == 0 and notes == []


def _fake_row(path) -> np.ndarray:
    """A feature row that names its image: four float32 numbers drawn from the file name."""
    return np.frombuffer(hashlib.sha256(Path(path).name.encode()).digest()[:16], dtype=np.uint32).astype(
        np.float32) / 2 ** 32


def _fake_extract(extractor, paths, cache=None, batch_size=None, workers=None, max_pixels=None, progress=None):
    """extract_features without a backbone: images numbered 3 are unreadable, those numbered 0-4 come from cache."""
    kept = [i for i, p in enumerate(paths) if not p.stem.endswith("3")]
    skipped = [Skipped(str(p), "unreadable") for p in paths if p.stem.endswith("3")]
    from_cache = sum(int(paths[i].stem[-3:]) < 5 for i in kept)
    features = np.stack([_fake_row(paths[i]) for i in kept]) if kept else np.empty((0, 0), dtype=np.float32)
    return FeatureSet(features, np.array(kept, dtype=np.int64), skipped, len(kept) - from_cache, from_cache)


def _train_module():
    return importlib.import_module("transferkit.train")  # `transferkit.train` is also the function


def _extracted(data: Path) -> tuple:
    config = TrainConfig(use_cache=False, workers=1)
    prepared, features = _train_module()._extract(load_dataset(data, val_percent=30), None, config, False)
    return prepared.paths, prepared.targets, [s.path for s in prepared.skipped], prepared.features_computed, \
        prepared.features_from_cache, features


def _gloo_worker(rank: int, store: str, data: str, out: str) -> None:
    """One of two gloo ranks: gather uneven shares (rank 1 holds nothing of the second list), then `_extract` with
    `_fake_extract`; what each rank got is pickled to OUT/rank<k>.pkl."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mine = np.array([[4, 0, 7, 3], [1, 5, 2, 8, 6]][rank])
        uneven = gather_rows(mine, np.stack([np.full(3, i, dtype=np.float32) for i in mine]), [f"rank{rank}"])
        held = np.arange(9, dtype=np.float32).reshape(3, 3)
        none_on_one = gather_rows(np.array([2, 0, 1]), held) if rank == 0 else gather_rows(
            np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32))
        _train_module().extract_features = _fake_extract
        result = (uneven, none_on_one, _extracted(Path(data)))
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_gather_features_in_order(tmp_path, monkeypatch):
    import torch.multiprocessing

    data = make_image_folder(tmp_path / "data", per_class=7, size=32)
    torch.multiprocessing.start_processes(_gloo_worker, (str(tmp_path / "store"), str(data), str(tmp_path)),
                                          nprocs=2, start_method="spawn")
    monkeypatch.setattr(_train_module(), "extract_features", _fake_extract)
    paths, targets, skipped, computed, from_cache, features = _extracted(data)
    assert len(skipped) == 3 and computed == 3 * 6 - 12 and from_cache == 12
    for rank in (0, 1):
        uneven, none_on_one, extracted = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert uneven[0].tolist() == list(range(9)) and uneven[2] == ["rank0", "rank1"]
        np.testing.assert_array_equal(uneven[1], np.repeat(np.arange(9, dtype=np.float32)[:, None], 3, axis=1))
        assert none_on_one[0].tolist() == [0, 1, 2]
        np.testing.assert_array_equal(none_on_one[1], np.arange(9, dtype=np.float32).reshape(3, 3)[[1, 2, 0]])
        assert extracted[:5] == (paths, targets, skipped, computed, from_cache)  # the one-process answer
        assert extracted[5].keys() == features.keys()
        for name in features:
            np.testing.assert_array_equal(extracted[5][name], features[name])
            np.testing.assert_array_equal(features[name], np.stack([_fake_row(p) for p in paths[name]]))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(data: Path, tmp_path: Path, *arguments: str) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2` started twice on loopback, as two machines would: node k runs in tmp_path/node<k> with
    its own cache, TRANSFERKIT_CACHE_DIR=tmp_path/cache<k>; nothing but DATA is shared between them."""
    port, nodes = _free_port(), []
    for node in (0, 1):
        folder = tmp_path / f"node{node}"
        folder.mkdir()
        env = {**os.environ, "TRANSFERKIT_CACHE_DIR": str(fresh_cache(tmp_path / f"cache{node}"))}
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                   "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                   "-m", "transferkit", "train", str(data), *arguments]
        nodes.append(subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    done = []
    for process in nodes:
        stdout, stderr = process.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return done


@pytest.mark.slow
def test_two_nodes_with_their_own_caches_match_one_process(split_folder, tmp_path):
    single = tmp_path / "single"
    transferkit.train(split_folder, out=single, cache_dir=str(fresh_cache(tmp_path / "single-cache")), progress=False,
                      report=False, image_size=96, workers=1, engine="onnxruntime")
    node0, node1 = _two_nodes(split_folder, tmp_path, "--out", "run", "--json", "--no-report", *SIZE)
    assert node0.returncode == 0 and node1.returncode == 0, node0.stderr[-3000:] + node1.stderr[-3000:]
    summary = json.loads(node0.stdout)  # only rank 0 speaks and writes a run folder
    assert node1.stdout == "" and list((tmp_path / "node1").iterdir()) == []
    run = tmp_path / "node0" / "run"
    paths = list_images([split_folder])
    assert summary["features_computed"] == len(paths) == 51 and summary["features_from_cache"] == 0
    assert (_indexed_rows(tmp_path / "cache0"), _indexed_rows(tmp_path / "cache1")) == (26, 25)  # each its share
    ours, theirs = safetensors.numpy.load_file(run / "model.safetensors"), safetensors.numpy.load_file(
        single / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-5)
    ours, theirs = (list(csv.DictReader((folder / "predictions.csv").open())) for folder in (run, single))
    assert [(r["path"], r["predicted"]) for r in ours] == [(r["path"], r["predicted"]) for r in theirs]
    np.testing.assert_allclose([float(r["probability"]) for r in ours], [float(r["probability"]) for r in theirs],
                               atol=1e-5)
    ran, alone = json.loads((run / "metrics.json").read_text()), json.loads((single / "metrics.json").read_text())
    assert ran["val"]["confusion_matrix"] == alone["val"]["confusion_matrix"]
    assert ran["val"]["loss"] == pytest.approx(alone["val"]["loss"], rel=1e-3, abs=1e-6)
