"""`--cache-bottom`: the top of the backbone fine-tuned on cached activations of its frozen bottom. The cached split
computes the same features as the whole network, a killed run (during caching or training) resumes to the same end,
and a disk without room falls back to training on images."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import transferkit
from conftest import fresh_cache
from transferkit import topcache
from transferkit.backbone import PixelFeatures, open_backbone, pooled_features
from transferkit.finetune import trainable_names
from transferkit.runs import CHECKPOINT, load_checkpoint, staging_dir
from transferkit.augment import Unreadable
from transferkit.topcache import Bottom, CachedSet, CachedViews, first_trained_unit, top_forward

FAST = dict(image_size=96, workers=2, batch_size=12)
TOP = dict(mode="finetune", unfreeze="top-blocks:6", cache_bottom=True)


def _history(run) -> list[dict]:
    return list(csv.DictReader((run / "history.csv").open(encoding="utf-8")))


def _losses(history: list[dict]) -> list[str]:
    return [row["train_loss"] for row in history if row["stage"] == "finetune"]


def test_bottom_then_top_gives_the_whole_networks_features():
    backbone = open_backbone(image_size=96)
    model = backbone.trainable_copy()
    first = first_trained_unit(model, set(trainable_names(model, "top-blocks:6")))
    assert first == len(backbone.block_widths) - 7  # timm's last block group holds the final conv too
    pixels = torch.randint(0, 256, (3, 96, 96, 3), dtype=torch.uint8)
    bottom = Bottom(PixelFeatures(model, backbone.preprocessing), first)
    with torch.inference_mode():
        activation, pooled = bottom(pixels)
        split = top_forward(model, first, activation, pooled)
        whole = pooled_features(model, bottom_input(bottom, pixels), "blocks")
    assert pooled.shape[1] == sum(backbone.block_widths[:first])
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def bottom_input(bottom: Bottom, pixels: torch.Tensor) -> torch.Tensor:
    return bottom.features.normalize(pixels)


def test_cached_top_training_learns_and_reuses_its_cache(split_folder, tmp_path, cache_dir):
    first = transferkit.train(split_folder, out=tmp_path / "a", cache_dir=str(cache_dir), progress=False,
                              epochs=3, **TOP, **FAST)
    folders = list((cache_dir / "activations").iterdir())
    views = sorted(p.name for f in folders for p in f.glob("view-*.f16"))
    assert views == ["view-0.f16", "view-1.f16", "view-2.f16"]  # a view per epoch, up to topcache.MAX_VIEWS
    assert first.val_accuracy >= 0.9
    config = json.loads((first.run_dir / "config.json").read_text())
    assert config["backbone"]["stored_in_run"] and config["train"]["cache_bottom"]
    # only the top 6 blocks changed; the bottom is the pretrained one
    trained = transferkit.Classifier.load(first.run_dir).backbone.model.state_dict()
    pretrained = open_backbone().trainable_copy()
    top = set(trainable_names(pretrained, "top-blocks:6"))
    changed = {k for k, v in pretrained.state_dict().items() if not torch.equal(trained[k], v)}
    assert changed and changed <= top
    stamps = {p: p.stat().st_mtime_ns for f in folders for p in f.iterdir()}
    second = transferkit.train(split_folder, out=tmp_path / "b", cache_dir=str(cache_dir), progress=False,
                               epochs=3, **TOP, **FAST)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # read, not written again
    assert _losses(_history(first.run_dir)) == _losses(_history(second.run_dir))


def test_no_room_for_the_activations_trains_on_images(split_folder, tmp_path, cache_dir, monkeypatch, caplog):
    monkeypatch.setattr(topcache, "MAX_CACHE_BYTES", 1)
    result = transferkit.train(split_folder, out=tmp_path / "run", cache_dir=str(cache_dir), progress=False,
                               epochs=1, **TOP, **FAST)
    assert "has room for none of them; training on images instead" in caplog.text
    assert result.val_accuracy >= 0.9 and not list((cache_dir / "activations").rglob("*.f16"))


def test_each_epoch_reads_the_next_view_flipped_at_random():
    views = [CachedSet(np.full((4, 2, 3, 3), float(view), np.float16), np.zeros((4, 5), np.float32),
                       np.array([True, True, True, False])) for view in range(3)]
    views[0].activations[0, :, :, 0] = 9  # a left column tells a flip
    dataset = CachedViews(views, np.arange(4), seed=0)
    assert [float(dataset[(epoch, 1)][0][0].mean()) for epoch in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]
    flipped = [bool(dataset[(epoch, 0)][0][0][0, 0, 2] == 9) for epoch in range(1, 40, 3)]  # view 0 each time
    assert 0 < sum(flipped) < len(flipped)
    assert isinstance(dataset[(1, 3)], Unreadable)


def test_cache_bottom_needs_a_frozen_bottom(tmp_path):
    with pytest.raises(transferkit.DataError, match="unfreeze top-blocks:N"):
        transferkit.train(tmp_path, mode="finetune", cache_bottom=True)
    with pytest.raises(transferkit.DataError, match="mode finetune"):
        transferkit.train(tmp_path, cache_bottom=True, unfreeze="top-blocks:3")


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", ["caching", "training"])
def test_a_killed_cached_top_run_resumes_to_the_same_end(split_folder, tmp_path, cache_dir, stop_at):
    args = [str(split_folder), "--mode", "finetune", "--unfreeze", "top-blocks:6", "--cache-bottom", "--epochs", "4",
            "--image-size", "96", "--workers", "2", "--batch-size", "12", "--cache-dir", str(cache_dir),
            "--mixup", "0.4", "--ema", "0.99", "--drop-path", "0.2"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "transferkit", "train", *args, "--out", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if stop_at == "caching":
            done = [json.loads(p.read_text())["rows"] for p in (cache_dir / "activations").rglob("view-*.json")] \
                if (cache_dir / "activations").exists() else []
            if sum(done) >= 12:  # part of the way through the views
                break
        else:
            state = load_checkpoint(staging_dir(killed)) if (staging_dir(killed) / CHECKPOINT).exists() else None
            if state and state.get("stage", {}).get("epoch", 0) >= 2:
                break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not killed.exists()
    resumed = subprocess.run([sys.executable, "-m", "transferkit", "train", "--resume", str(killed)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole = transferkit.train(split_folder, out=tmp_path / "whole", cache_dir=str(fresh_cache(tmp_path / "fresh")),
                              progress=False, epochs=4, mixup=0.4, ema=0.99, drop_path=0.2, **TOP, **FAST)
    assert _losses(_history(killed)) == _losses(_history(whole.run_dir))
    assert json.loads((killed / "metrics.json").read_text())["val"]["accuracy"] == whole.val_accuracy
    np.testing.assert_array_equal(_head(killed), _head(whole.run_dir))


def _head(run) -> np.ndarray:
    import safetensors.torch

    return safetensors.torch.load_file(str(run / "model.safetensors"))["head.1.weight"].numpy()
