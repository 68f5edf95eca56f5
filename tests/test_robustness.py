"""Messy file systems: unicode and spaces in paths, symlink loops, files that vanish mid-run, read-only folders and
full disks. Each must end with a clear message, no corrupted cache or run, and a next run that recovers.

Full disks are made real with RLIMIT_FSIZE in a child process (writes past the limit fail with EFBIG, as they fail
with ENOSPC on a full disk); read-only folders with chmod, or for root (whom permissions do not stop) a read-only
bind mount in a private mount namespace.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import transferkit
from conftest import CLASS_STYLES, draw_sample, make_image_folder
from transferkit.backbone import open_backbone
from transferkit.cli import app
from transferkit.data import load_dataset
from transferkit.features import Extractor, FeatureCache, extract_features
from transferkit.runs import CHECKPOINT, load_checkpoint, staging_dir

TRAIN_MODULE = importlib.import_module("transferkit.train")  # `transferkit.train` is the function
FAST = dict(image_size=96, workers=2, batch_size=12, report=False, doctor=False, progress=False)


def _cli(*args: str, file_size_limit: int | None = None, read_only: Path | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`transferkit ARGS` in a child process, optionally with a file size limit or with `read_only` unwritable."""
    command = [sys.executable, "-m", "transferkit", *args]
    if read_only is not None and os.geteuid() == 0:
        command = ["unshare", "--mount", "sh", "-c",
                   'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', str(read_only), *command]

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600,
                          preexec_fn=limit_file_size if file_size_limit else None)


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("unshare") is None or _cli("--help", read_only=folder).returncode != 0:
            pytest.skip("running as root without mount namespaces (unshare): no folder can be made read-only")
    else:
        folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def test_unicode_and_spaces_in_paths(tmp_path, cache_dir):
    names = {"café crème": CLASS_STYLES["circles"], "猫 neko": CLASS_STYLES["squares"],
             "stripes ünd Streifen": CLASS_STYLES["stripes"]}
    root = tmp_path / "mes photos ü 2026"
    rng = np.random.default_rng(0)
    for label, (style, colour) in names.items():
        (root / label).mkdir(parents=True)
        for i in range(10):
            draw_sample(style, colour, rng).save(root / label / f"été n° {i} – {label}.jpg", quality=92)
    run = tmp_path / "runs" / "essai à 1"
    result = CliRunner().invoke(app, ["train", str(root), "--out", str(run), "--cache-dir", str(cache_dir),
                                      "--image-size", "96", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["val_accuracy"] >= 0.9
    assert (run / "labels.txt").read_text(encoding="utf-8").splitlines() == sorted(names)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "猫 neko" in page and "café crème" in page

    photo = root / "猫 neko" / "été n° 3 – 猫 neko.jpg"
    listing = tmp_path / "à prédire.csv"
    listing.write_text(f'path,label\n"{photo.relative_to(tmp_path)}",猫 neko\n', encoding="utf-8")
    predicted = CliRunner().invoke(app, ["predict", str(run), str(listing), "--format", "csv"])
    assert predicted.exit_code == 0, predicted.output
    top = [row for row in csv.DictReader(predicted.stdout.splitlines()) if row["rank"] == "1"]
    assert [(row["input"], row["label"]) for row in top] == [(str(photo), "猫 neko")]


def test_symlink_loops_are_reported_and_linked_folders_listed_once(tmp_path, cache_dir):
    root = make_image_folder(tmp_path / "shapes", per_class=8)
    elsewhere = make_image_folder(tmp_path / "elsewhere", per_class=3, seed=5)
    (root / "circles" / "loop").symlink_to("..")                   # a folder linking to its parent
    (root / "squares" / "more").symlink_to(elsewhere / "squares")  # a linked folder: followed
    (root / "everything").symlink_to(".")                          # a class folder linking to the data folder
    (root / "stripes" / "self.jpg").symlink_to("self.jpg")         # a file linking to itself
    (root / "stripes" / "gone.jpg").symlink_to("nowhere.jpg")      # a broken link

    dataset = load_dataset(root)
    assert dataset.classes == ["circles", "squares", "stripes"]
    listed = [s.path for samples in dataset.splits.values() for s in samples]
    assert len(listed) == len(set(listed)) == 8 * 3 + 3 + 2
    assert {Path(s.path).name for s in dataset.skipped} == {"loop", "everything"}
    assert all("already listed" in s.reason for s in dataset.skipped)

    result = transferkit.train(root, out=tmp_path / "run", cache_dir=str(cache_dir), **FAST)
    reasons = dict(line.split("\t") for line in (tmp_path / "run" / "skipped.txt").read_text().splitlines())
    assert "symbolic link loop" in reasons[str(root / "stripes" / "self.jpg")]
    assert reasons[str(root / "stripes" / "gone.jpg")] == "broken symbolic link (to nowhere.jpg)"
    assert sum(result.images.values()) == 8 * 3 + 3


@pytest.mark.slow
def test_files_that_vanish_during_a_run_are_reported_and_the_run_finishes(split_folder, tmp_path, cache_dir,
                                                                           monkeypatch):
    """Probe: a file deleted after listing is skipped. Image training: files deleted after the up-front check are
    left out from then on, named in a warning and in skipped.txt."""
    victims = [next((split_folder / "train" / "circles").glob("*.jpg")),
               next((split_folder / "val" / "squares").glob("*.jpg"))]
    stages = {"probe": "load_dataset", "head": "_prepare_images"}

    for mode, stage in stages.items():
        original = getattr(TRAIN_MODULE, stage)

        def then_delete(*args, original=original, **kwargs):
            value = original(*args, **kwargs)
            for victim in victims:
                shutil.move(victim, tmp_path / victim.name)
            return value

        monkeypatch.setattr(TRAIN_MODULE, stage, then_delete)
        result = transferkit.train(split_folder, out=tmp_path / mode, cache_dir=str(cache_dir), mode=mode,
                                   epochs=2, **FAST)
        monkeypatch.undo()
        skipped = (tmp_path / mode / "skipped.txt").read_text()
        assert all(str(victim) in skipped for victim in victims), skipped
        assert result.images["val"] == 14 and result.val_accuracy is not None
        if mode == "head":
            assert "became unreadable during training: file not found" in skipped
            assert len(result.history) == 2
        for victim in victims:
            shutil.move(tmp_path / victim.name, victim)

    again = transferkit.train(split_folder, out=tmp_path / "again", cache_dir=str(cache_dir), **FAST)
    assert again.skipped == [] and again.images == {"train": 36, "val": 15}


@pytest.mark.slow
def test_read_only_output_or_cache_folder(split_folder, tmp_path, read_only_folder):
    cache = tmp_path / "cache"
    common = ["--image-size", "96", "--no-doctor", "--no-report", "--engine", "torch"]
    refused = _cli("train", str(split_folder), "--out", str(read_only_folder / "run"), "--cache-dir", str(cache),
                   *common, read_only=read_only_folder)
    assert refused.returncode == 2, refused.stderr
    assert "cannot create the run folder" in refused.stderr and "writable --out" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not any(read_only_folder.iterdir()) and not cache.exists()  # refused before any work

    uncached = _cli("train", str(split_folder), "--out", str(tmp_path / "run"), "--cache-dir",
                    str(read_only_folder / "cache"), *common, read_only=read_only_folder)
    assert uncached.returncode == 0, uncached.stderr
    assert "continuing without a cache" in uncached.stderr
    assert transferkit.Classifier.load(tmp_path / "run").classes == sorted(CLASS_STYLES)

    report = _cli("report", str(tmp_path / "run"), "--out", str(read_only_folder / "report.html"),
                  read_only=read_only_folder)
    assert report.returncode == 2 and "Traceback" not in report.stderr
    assert "Read-only file system" in report.stderr or "Permission denied" in report.stderr
    assert "writable" in report.stderr


def _limited(limit: int, *args: str) -> subprocess.CompletedProcess:
    return _cli(*args, "--image-size", "96", "--no-doctor", "--no-report", "--engine", "torch",
                file_size_limit=limit)


@pytest.mark.slow
def test_disk_full_while_caching_features_leaves_a_consistent_cache(split_folder, tmp_path, cache_dir):
    # room for the first batch's features (32 rows of 12.5 kB), not the second's
    full = _limited(500_000, "train", str(split_folder), "--out", str(tmp_path / "full"), "--cache-dir",
                    str(cache_dir))
    assert full.returncode == 0, full.stderr
    assert "cannot be written" in full.stderr and "continuing without caching" in full.stderr
    assert transferkit.Classifier.load(tmp_path / "full").classes == sorted(CLASS_STYLES)

    result = transferkit.train(split_folder, out=tmp_path / "next", cache_dir=str(cache_dir), engine="torch", **FAST)
    assert 0 < result.features_from_cache < 51 and result.features_computed + result.features_from_cache == 51

    extractor = Extractor(open_backbone("efficientnet_lite0", image_size=96), engine="torch")
    paths = sorted(split_folder.rglob("*.jpg"))
    cached = extract_features(extractor, paths, FeatureCache(cache_dir), progress=False)
    fresh = extract_features(extractor, paths, None, progress=False)
    assert cached.computed == 0 and cached.from_cache == 51
    cosine = (cached.features * fresh.features).sum(1) / np.linalg.norm(cached.features, axis=1) / np.linalg.norm(
        fresh.features, axis=1)
    assert cosine.min() > 0.999


@pytest.mark.slow
def test_disk_full_while_checkpointing_stops_cleanly_and_resumes(split_folder, tmp_path, cache_dir):
    run = tmp_path / "run"
    full = _limited(2_000_000, "train", str(split_folder), "--mode", "finetune", "--epochs", "2", "--batch-size",
                    "12", "--workers", "2", "--out", str(run), "--cache-dir", str(cache_dir))
    assert full.returncode == 2, full.stderr
    assert "File too large" in full.stderr and f"transferkit train --resume {run}" in full.stderr
    assert "Traceback" not in full.stderr
    assert not run.exists()
    assert sorted(p.name for p in staging_dir(run).iterdir()) == [".lock", CHECKPOINT]  # no half-written temporary
    assert "prepared" in load_checkpoint(staging_dir(run)) and "stage" not in load_checkpoint(staging_dir(run))

    resumed = _cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    history = list(csv.DictReader((run / "history.csv").open()))
    assert [row["stage"] for row in history].count("finetune") == 2
    assert transferkit.Classifier.load(run).predict([next(split_folder.rglob("*.jpg"))])[0].error is None


def test_truncated_image_while_it_is_being_written(image_folder, tmp_path, cache_dir):
    """A photo caught half-copied is skipped; once complete, the next run uses it (its file stat changed)."""
    photo = next((image_folder / "circles").glob("*.jpg"))
    whole = photo.read_bytes()
    photo.write_bytes(whole[: len(whole) // 3])
    first = transferkit.train(image_folder, out=tmp_path / "first", cache_dir=str(cache_dir), **FAST)
    assert [s.path for s in first.skipped] == [str(photo)] and "truncated" in first.skipped[0].reason
    photo.write_bytes(whole)
    second = transferkit.train(image_folder, out=tmp_path / "second", cache_dir=str(cache_dir), **FAST)
    assert second.skipped == [] and second.features_computed == 1
