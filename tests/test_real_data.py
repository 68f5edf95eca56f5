"""Slow tests on real photos (../shared) and the demo: the README's promises, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import transferkit
from conftest import HYMENOPTERA, fresh_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory):
    """The defaults on hymenoptera with an empty feature cache, which the tests below then share."""
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"real-data test: {HYMENOPTERA} is absent")
    root = tmp_path_factory.mktemp("hymenoptera")
    cache = fresh_cache(root / "cache")
    return transferkit.train(HYMENOPTERA, out=root / "cold", cache_dir=str(cache), progress=False), root


def test_hymenoptera_defaults_reach_target_and_reuse_cache(hymenoptera, cold_run, tmp_path):
    cold, root = cold_run
    assert cold.images == {"train": 245, "val": 153}  # formica.jpeg and the GIF placeholder are read too
    assert cold.val_accuracy >= 0.95
    assert cold.features_computed == 398
    warm = transferkit.train(hymenoptera, out=tmp_path / "warm", cache_dir=str(root / "cache"), progress=False)
    assert warm.features_computed == 0 and warm.val_accuracy == cold.val_accuracy


def test_cli_train_and_imagenet_predict_on_real_photos(hymenoptera, cold_run, tmp_path):
    env_cache = ["--cache-dir", str(cold_run[1] / "cache")]
    train = subprocess.run([sys.executable, "-m", "transferkit", "train", str(hymenoptera), "--out",
                            str(tmp_path / "run"), "--json", *env_cache], capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr
    assert json.loads(train.stdout)["val_accuracy"] >= 0.95
    bee = sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[0]
    imagenet = subprocess.run([sys.executable, "-m", "transferkit", "predict", "--imagenet", str(bee), "--format",
                               "json"], capture_output=True, text=True, timeout=600)
    assert imagenet.returncode == 0, imagenet.stderr
    top5 = json.loads(imagenet.stdout)[0]["predictions"]
    assert len(top5) == 5 and any(p["id"] == 309 and p["label"] == "bee" for p in top5)


def test_demo_runs_offline(tmp_path, cache_dir):
    result = subprocess.run([sys.executable, "-m", "transferkit", "demo", "--out", str(tmp_path / "run"),
                             "--cache-dir", str(cache_dir)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and "a few test predictions" in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.9 and metrics["test"]["n"] > 100


def test_hymenoptera_finetune_keeps_the_probe_accuracy_and_loads(hymenoptera, cold_run, tmp_path):
    cache = cold_run[1] / "cache"  # the first stage's features are cached; 2 epochs at 160 px keep this to a minute
    result = transferkit.train(hymenoptera, out=tmp_path / "run", cache_dir=str(cache), progress=False,
                               mode="finetune", epochs=2, train_size=160)
    assert result.val_accuracy >= 0.95
    assert [row["stage"] for row in result.history][-2:] == ["finetune"] * 2
    report = transferkit.evaluate(result.run_dir, hymenoptera, cache_dir=cache, progress=False)
    assert abs(report.accuracy - result.val_accuracy) <= 2 / 153
