"""Training on images: the head/finetune/scratch modes, augmentation, schedules, frozen BatchNorm, checkpoints and
resume, the learning-rate finder. Synthetic shapes at 96 px keep each run to seconds."""

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
import safetensors.torch
import timm
import torch
from PIL import Image

import transferkit
from transferkit import Classifier, DataError, RunError
from transferkit.augment import AUGMENTS, train_transform
from transferkit.backbone import open_backbone
from transferkit.finetune import EpochSampler, backbone_blocks, trainable_names
from transferkit.runs import CHECKPOINT, load_checkpoint, staging_dir

FAST = dict(image_size=96, workers=2, batch_size=12)
LOSS_COLUMNS = ("stage", "epoch", "train_loss", "train_accuracy", "lr", "val_loss", "val_accuracy")


def _train(data, tmp_path, cache_dir, name="run", **options):
    return transferkit.train(data, out=tmp_path / name, cache_dir=str(cache_dir), progress=False,
                             **{**FAST, **options})


def _history(run) -> list[dict]:
    return list(csv.DictReader((run / "history.csv").open()))


def _losses(rows: list[dict]) -> list[tuple]:
    return [tuple(str(row.get(k)) for k in LOSS_COLUMNS) for row in rows]


@pytest.mark.parametrize("mode", ["head", "finetune", pytest.param("scratch", marks=pytest.mark.slow)])
def test_image_modes_train_and_load_like_probe_runs(mode, split_folder, tmp_path, cache_dir):
    options = {"head": dict(epochs=6, lr=1e-2), "finetune": dict(epochs=2), "scratch": dict(epochs=3)}[mode]
    result = _train(split_folder, tmp_path, cache_dir, mode=mode, **options)
    run = result.run_dir
    config = json.loads((run / "config.json").read_text())
    assert config["mode"] == mode and config["train"]["augment"] == "light"
    stored = {k.split(".")[0] for k in safetensors.torch.load_file(str(run / "model.safetensors"))}
    assert stored == ({"head"} if mode == "head" else {"head", "backbone"})
    stages = [row["stage"] for row in _history(run)]
    assert stages[-options["epochs"]:] == [mode] * options["epochs"]
    if mode == "finetune":
        assert stages[0] == "head" and config["backbone"]["started_from"].startswith("efficientnet-lite0")
        assert result.val_accuracy >= 0.9
    if mode == "head":
        assert result.val_accuracy >= 0.8
    assert not (run / CHECKPOINT).exists() and not staging_dir(run).exists()

    # one model format: load, predict and evaluate exactly as a probe run, on any engine
    val_paths = sorted((split_folder / "val").glob("*/*.jpg"))
    for engine in ("torch", "onnxruntime"):
        report = transferkit.evaluate(run, split_folder, cache_dir=cache_dir, engine=engine, progress=False)
        assert abs(report.accuracy - result.val_accuracy) <= 1 / 15 + 1e-9
    predictions = Classifier.load(run, engine="torch").predict(val_paths, top_k=1)
    accuracy = np.mean([p.label == path.parent.name for p, path in zip(predictions, val_paths)])
    assert accuracy == pytest.approx(report.accuracy, abs=1 / 15 + 1e-9)


def test_finetuned_backbone_changes_only_unfrozen_layers_and_bn_statistics_stay(split_folder, tmp_path, cache_dir):
    pretrained = open_backbone(image_size=96).trainable_copy().state_dict()
    top = set(trainable_names(open_backbone(image_size=96).trainable_copy(), "top-blocks:2"))

    def backbone_of(run):
        return {k.removeprefix("backbone."): v for k, v in
                safetensors.torch.load_file(str(run / "model.safetensors")).items() if k.startswith("backbone.")}

    frozen_bn = backbone_of(_train(split_folder, tmp_path, cache_dir, "a", mode="finetune", epochs=1,
                                   unfreeze="top-blocks:2", lr=1e-2).run_dir)
    statistics = [k for k in pretrained if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(frozen_bn[k], pretrained[k]) for k in statistics)
    changed = {k for k in top if not torch.equal(frozen_bn[k], pretrained[k])}
    assert changed and changed <= top
    assert all(torch.equal(frozen_bn[k], pretrained[k]) for k in pretrained if k not in top)

    trained_bn = backbone_of(_train(split_folder, tmp_path, cache_dir, "b", mode="finetune", epochs=1,
                                    unfreeze="top-blocks:2", lr=1e-2, train_bn=True).run_dir)
    moved = [k for k in statistics if not torch.equal(trained_bn[k], pretrained[k])]
    assert moved and all(k.rsplit(".", 1)[0] + ".weight" in top for k in moved)


def test_unfreeze_choices_follow_timm_blocks():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    names = [name for name, _ in model.named_parameters()]
    blocks = backbone_blocks(model)
    assert [n for block in blocks for n in block] == names and blocks[0][0] == "conv_stem.weight"
    assert trainable_names(model, "all") == names
    assert trainable_names(model, "top-blocks:1") == blocks[-1] and "conv_head.weight" in blocks[-1]
    assert trainable_names(model, "from:-2") == blocks[-2] + blocks[-1]
    from_name = trainable_names(model, "from:blocks.6")
    assert from_name[0] == "blocks.6.0.conv_pw.weight" and from_name[-1] == names[-1]
    with pytest.raises(DataError, match="names no layer.*such as"):
        trainable_names(model, "from:layer4")
    with pytest.raises(DataError, match=f"between 1 and {len(blocks)}"):
        trainable_names(model, "top-blocks:99")
    with pytest.raises(DataError, match="--unfreeze must be"):
        trainable_names(model, "some")


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine", "onecycle"])
def test_image_training_follows_the_schedule(schedule, split_folder, tmp_path, cache_dir):
    result = _train(split_folder, tmp_path, cache_dir, mode="head", epochs=3, lr=1e-2, schedule=schedule,
                    lr_steps=(2,), lr_gamma=0.1, augment="none")
    lrs = [row["lr"] for row in result.history]
    if schedule == "constant":
        assert lrs == pytest.approx([1e-2] * 3)
    elif schedule == "step":
        assert lrs == pytest.approx([1e-2, 1e-2, 1e-3])  # after 2 epochs, as MultiStepLR([2])
    else:
        assert lrs[-1] < lrs[0] / 10
    if schedule == "onecycle":
        assert lrs[0] == pytest.approx(1e-2, rel=0.3)  # the peak, 30% into the cycle
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]


def _views(name: str, image: Image.Image, count: int = 40) -> list[np.ndarray]:
    transform = train_transform(name, 64, open_backbone().preprocessing)
    views = []
    for seed in range(count):
        torch.manual_seed(seed)
        views.append(np.asarray(transform(image)))
    assert all(v.shape == (64, 64, 3) and v.dtype == np.uint8 for v in views)
    return views


def _width_share(view: np.ndarray) -> float:
    """How much of the gradient picture's width a view shows, negative when mirrored (red rises left to right)."""
    red = view[..., 0].astype(np.float64).mean(0)
    return (red[-1] - red[0]) / 255 * 64 / 63


# preset -> (narrowest, widest share of the 240 x 160 picture's width a view may show), for 64-px views.
# light: random resized crops of 35-100% of the area at aspect 3/4-4/3; vgg: the short side scaled to 73-146 px
# (256-512 at 224) and a 64-px crop; none: the evaluation resize (short side 73) and centre crop, never mirrored.
SHARES = {"none": (0.58, 0.59), "light": (0.40, 0.95), "vgg": (0.28, 0.59)}


@pytest.mark.parametrize("name", AUGMENTS)
def test_augment_presets_crop_flip_and_colour_as_documented(name):
    y, x = np.mgrid[0:160, 0:240]
    gradient = Image.fromarray(np.stack([x * 255 // 239, y * 255 // 159, np.full_like(x, 128)], -1).astype(np.uint8))
    views = _views(name, gradient)
    if name in SHARES:
        shares = np.array([_width_share(v) for v in views])
        narrowest, widest = SHARES[name]
        assert narrowest - 0.02 <= np.abs(shares).min() and np.abs(shares).max() <= widest + 0.02, shares
        if name == "none":
            assert all(np.array_equal(v, views[0]) for v in views) and shares[0] > 0
        else:
            assert np.ptp(np.abs(shares)) > 0.1 and 0.25 <= np.mean(shares < 0) <= 0.75, shares  # scales; mirrors
    # colour: a plain grey picture keeps its colour under crops, flips and rotations (which only add black
    # corners); the strong preset's colour jitter and RandAugment change it
    grey = _views(name, Image.new("RGB", (240, 160), (120, 130, 140)), count=12)
    colours = np.array([np.median(v[v.max(2) > 5], axis=0) for v in grey])
    if name == "strong":
        assert colours.std(0).max() > 5, colours
    else:
        assert np.abs(colours - (120, 130, 140)).max() <= 1, colours


def test_weighted_sampler_balances_classes():
    targets = np.array([0] * 90 + [1] * 10)
    weights = (len(targets) / (2 * np.bincount(targets)))[targets]
    drawn = [targets[i] for epoch in range(1, 11) for i in
             (lambda s: (s.set_epoch(epoch), [i for _, i in s])[1])(EpochSampler(100, 0, weights))]
    assert 0.4 < np.mean(drawn) < 0.6
    plain = EpochSampler(100, 0)
    assert sorted(i for _, i in plain) == list(range(100))


def test_probe_trains_with_the_balancing_sampler(image_folder, tmp_path, cache_dir):
    result = _train(image_folder, tmp_path, cache_dir, balance="sampler", val_percent=30, test_percent=0)
    assert result.val_accuracy >= 0.8
    with pytest.raises(DataError, match="balance must be one of"):
        _train(image_folder, tmp_path, cache_dir, "x", balance="oversample")


@pytest.mark.slow
def test_same_seed_same_image_training(split_folder, tmp_path, cache_dir):
    first = _train(split_folder, tmp_path, cache_dir, "a", mode="head", epochs=1, augment="strong")
    second = _train(split_folder, tmp_path, cache_dir, "b", mode="head", epochs=1, augment="strong")
    third = _train(split_folder, tmp_path, cache_dir, "c", mode="head", epochs=1, augment="strong", seed=1)
    assert _losses(_history(first.run_dir)) == _losses(_history(second.run_dir))
    assert _losses(_history(first.run_dir)) != _losses(_history(third.run_dir))


def _train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "transferkit", "train", *args]


@pytest.mark.slow
def test_resume_after_kill_9_continues_exactly(split_folder, tmp_path, cache_dir):
    """A run killed mid-epoch resumes from its last checkpoint and ends exactly as an uninterrupted run."""
    args = [str(split_folder), "--mode", "finetune", "--epochs", "4", "--image-size", "96", "--workers", "2",
            "--batch-size", "12", "--cache-dir", str(cache_dir)]
    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(*args, "--out", str(killed)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        state = load_checkpoint(staging_dir(killed)) if (staging_dir(killed) / CHECKPOINT).exists() else None
        if state and state.get("stage", {}).get("epoch", 0) >= 2:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not killed.exists() and load_checkpoint(staging_dir(killed))["stage"]["epoch"] in (2, 3)

    again = subprocess.run(_train_command(*args, "--out", str(killed)), capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = subprocess.run(_train_command("--resume", str(killed)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    history = _history(killed)
    finetune_epochs = [int(row["epoch"]) for row in history if row["stage"] == "finetune"]
    assert finetune_epochs == list(range(finetune_epochs[0], finetune_epochs[0] + 4))

    whole = transferkit.train(split_folder, out=tmp_path / "whole", cache_dir=str(cache_dir), progress=False,
                              mode="finetune", epochs=4, **FAST)
    assert _losses(history) == _losses(_history(whole.run_dir))
    assert (json.loads((killed / "metrics.json").read_text())["val"]["accuracy"] == whole.val_accuracy)

    with pytest.raises(RunError, match="nothing to resume"):
        transferkit.resume(killed)
    with pytest.raises(RunError, match="no interrupted run"):
        transferkit.resume(tmp_path / "never")


def test_interrupted_run_is_restarted_only_with_overwrite(split_folder, tmp_path, cache_dir):
    killed = tmp_path / "run"
    staging_dir(killed).mkdir()
    torch.save({"arguments": {}}, staging_dir(killed) / CHECKPOINT)
    with pytest.raises(RunError, match="unfinished run"):
        _train(split_folder, tmp_path, cache_dir, mode="head", epochs=1)
    result = _train(split_folder, tmp_path, cache_dir, mode="head", epochs=1, overwrite=True)
    assert result.run_dir == killed and not staging_dir(killed).exists()


def test_lr_find_plots_and_suggests(split_folder, tmp_path, cache_dir):
    finding, plot = transferkit.find_lr(split_folder, out=tmp_path / "lr", cache_dir=str(cache_dir), progress=False,
                                        image_size=96)
    assert 1e-6 < finding.suggestion < 1.0 and len(finding.lrs) >= 20
    # the suggestion is on the falling part of the curve: below the lowest loss's rate, with the loss already lower
    lowest = int(np.argmin(finding.losses))
    at = finding.lrs.index(finding.suggestion)
    assert at < lowest and finding.losses[at] < finding.losses[len(finding.lrs) // 10]
    assert Image.open(plot).size[0] > 300
    assert len((tmp_path / "lr" / "lr_find.csv").read_text().splitlines()) == len(finding.lrs) + 1


def test_cli_image_training_errors(split_folder, tmp_path):
    from typer.testing import CliRunner

    from transferkit.cli import app

    runner = CliRunner()
    for args, message in [(["--mode", "finetune", "--unfreeze", "top-blocks:99"], "top-blocks:N needs N"),
                          (["--mode", "warp"], "'warp' is not one of"),
                          (["--augment", "heavy"], "'heavy' is not one of"),
                          (["--unfreeze", "top-blocks:1", "--unfreeze-from", "blocks.5"], "not both"),
                          (["--mode", "scratch", "--precision", "fp16", "--device", "cpu"],
                           "fp16 runs on CUDA GPUs only")]:
        result = runner.invoke(app, ["train", str(split_folder), "--out", str(tmp_path / "x"), *args, "--epochs", "1",
                                     "--image-size", "96"])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "--resume" in result.output


@pytest.mark.slow
def test_compiled_network_trains_like_the_eager_one(split_folder, tmp_path, cache_dir, monkeypatch):
    """--compile (torch.compile; inductor needs a C compiler) gives the same training. On a CPU it trains in fp32:
    freshly compiled bf16 kernels for this network crash the process. The compiled run is a fresh process, as a
    user runs it: on an AVX2 CPU, inductor's fp32 kernels compiled in a process that trained eagerly before
    segfault inside torch (torch 2.14.1, seen here in this suite)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # compile afresh, as a user would
    eager = _train(split_folder, tmp_path, cache_dir, name="eager", mode="head", epochs=1, precision="fp32",
                   report=False)
    run = tmp_path / "compiled"
    process = subprocess.run(_train_command(str(split_folder), "--out", str(run), "--cache-dir", str(cache_dir),
                                            "--mode", "head", "--epochs", "1", "--compile", "--no-report",
                                            "--image-size", str(FAST["image_size"]), "--workers",
                                            str(FAST["workers"]), "--batch-size", str(FAST["batch_size"]),
                                            "--json"), capture_output=True, text=True)
    assert process.returncode == 0, process.stderr[-3000:]
    compiled = json.loads(process.stdout)
    assert float(_history(run)[-1]["train_loss"]) == pytest.approx(eager.history[-1]["train_loss"], rel=0.05)
    assert compiled["val_accuracy"] == pytest.approx(eager.val_accuracy, abs=0.1)
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["compile"] is True and config["extractor"]["precision"] == "fp32"
