"""`--time-limit` and `--mode auto`: durations, the plan's rules, the choice between probe and fine-tuning, the limit
honoured end to end, resume within the time left, and plain progress lines in logs."""

from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import transferkit
from transferkit import DataError
from transferkit.auto import (MIN_EPOCHS, MIN_TRAIN_SIZE, epoch_seconds, eval_size_for, plan_finetune, probe_size_for,
                              train_size_for)
from transferkit.budget import parse_duration
from transferkit.cli import app
from transferkit.runs import CHECKPOINT, load_checkpoint, staging_dir

FAST = dict(image_size=96, workers=2, batch_size=12)


@pytest.fixture
def probe_learns_nothing(monkeypatch):
    """The probe's head zeroed after fitting (every class equally likely): a probe that leaves room, on shapes that
    every block's features otherwise tell apart at once."""
    train_module = importlib.import_module("transferkit.train")
    real_fit_head = train_module.fit_head

    def fit_nothing(*args, **kwargs):
        fit = real_fit_head(*args, **kwargs)
        with torch.no_grad():
            for parameter in fit.head.parameters():
                parameter.zero_()
        return fit

    monkeypatch.setattr(train_module, "fit_head", fit_nothing)


def random_labels(source: Path, target: Path, seed: int = 0) -> Path:
    """`source`'s images (a train/ + val/ layout) filed under two classes at random: no probe fits them well."""
    rng = np.random.default_rng(seed)
    for path in sorted(source.rglob("*.jpg")):
        split = path.relative_to(source).parts[0]
        folder = target / split / ("a", "b")[int(rng.integers(2))]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    return target


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "transferkit", "train", *args]


def _history(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "history.csv").open(encoding="utf-8")))


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("1h30m", 5400), ("1h30m15s", 5415),
                                           ("600", 600), (" 2M ", 120), ("1.5h", 5400), (45, 45), (2.5, 2.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-5", "abc", "", "10x", "m", "0s", -1, 0, "1h-5m"])
def test_bad_durations_are_one_line_errors(text):
    with pytest.raises(DataError, match="--time-limit"):
        parse_duration(text)


@pytest.mark.parametrize("args, message", [
    (["--time-limit", "0"], "positive duration"),
    (["--time-limit", "-3m"], "--time-limit"),
    (["--time-limit", "abc"], "90s, 20m, 1h30m"),
    (["--time-limit", "1m", "--epochs", "3"], "not both"),
    (["--time-limit", "1m", "--mode", "finetune"], "mode auto"),
])
def test_cli_time_limit_errors(image_folder, tmp_path, args, message):
    result = CliRunner().invoke(app, ["train", str(image_folder), "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_training_resolution_follows_the_images():
    assert train_size_for(100, 224) == 128  # 100-px thumbnails: 128, not 224
    assert train_size_for(128, 224) == 128
    assert train_size_for(32, 224) == MIN_TRAIN_SIZE  # tiny photos are upsampled to a size the network works at
    assert train_size_for(375, 224) == 224  # large photos: the backbone's own training resolution
    assert probe_size_for(100, 224) == 224  # small photos: the probe at about twice their size, not at 288 px
    assert probe_size_for(32, 224) == MIN_TRAIN_SIZE and probe_size_for(60, 224) == 128
    assert eval_size_for(128, 128) == 128 and eval_size_for(224, 375) == 256  # FixRes, within the images' detail
    assert probe_size_for(375, 224) is None


def _rates(table: dict):
    """A measure() for plan_finetune: (train, eval[, bottom]) img/s from a table by (unfreeze, train size[,
    "cached"])."""
    calls = []

    def measure(unfreeze, train_size, eval_size, cached):
        calls.append((unfreeze, train_size, eval_size))
        rates = table[(unfreeze, train_size, "cached") if cached else (unfreeze, train_size)]
        return (*rates, None) if len(rates) == 2 else rates

    return measure, calls


def test_plan_fits_the_epochs_to_the_time_and_steps_down_when_short():
    table = {("all", 128): (30.0, 90.0), ("all", 96): (60.0, 180.0), ("top-blocks:6", 128): (90.0, 90.0)}
    measure, calls = _rates(table)
    plan, _ = plan_finetune(600, 1000, 100, 200, 128, 224, 0.7, measure)
    assert (plan.unfreeze, plan.train_size) == ("all", 128) and calls == [("all", 128, 128)]
    assert plan.epochs >= MIN_EPOCHS and plan.seconds <= 600 and (plan.lr, plan.backbone_lr_mult) == (1e-3, 0.3)
    longer, _ = plan_finetune(1200, 1000, 100, 200, 128, 224, 0.7, measure)
    assert longer.epochs > plan.epochs  # the schedule is fitted to what the time buys

    measure, calls = _rates(table)
    short, _ = plan_finetune(150, 1000, 100, 200, 128, 224, 0.7, measure)
    assert (short.unfreeze, short.train_size) == ("all", 96)  # the whole network at a smaller size first
    assert short.epochs >= MIN_EPOCHS

    table[("all", 96)] = (40.0, 180.0)
    measure, calls = _rates(table)
    shorter, _ = plan_finetune(110, 1000, 100, 200, 128, 224, 0.7, measure)
    assert shorter.unfreeze == "top-blocks:6" and shorter.train_size == 128  # then only the top blocks

    none, why = plan_finetune(20, 1000, 100, 200, 128, 224, 0.7, measure)
    assert none is None and "one epoch" in why

    # with the bottom's activations cached, the last resort trains the top blocks on them: faster epochs, after
    # caching a view per epoch (at most 4) and the validation crops at the bottom's own rate
    table[("top-blocks:6", 128, "cached")] = (500.0, 400.0, 200.0)
    measure, calls = _rates(table)
    cached, _ = plan_finetune(110, 1000, 100, 200, 128, 224, 0.7, measure, cached_views=4)
    caching = (4 * 1000 + 100) / (200.0 * 0.8)
    assert cached.cache_bottom and cached.unfreeze == "top-blocks:6" and cached.epochs > shorter.epochs
    assert cached.seconds >= caching and cached.seconds <= 110 and "cached activations" in cached.describe()
    few, _ = plan_finetune(45, 1000, 100, 200, 128, 224, 0.7, measure, cached_views=4)
    assert few.cache_bottom and few.epochs < 4 and few.seconds < 45  # fewer epochs cache fewer views
    per_epoch = epoch_seconds(1000, 100, 500, 400)
    assert few.seconds == pytest.approx(few.epochs * per_epoch + (few.epochs * 1000 + 100) / 160)

    gentle, _ = plan_finetune(600, 1000, 100, 200, 128, 224, 0.93, measure)
    assert (gentle.lr, gentle.backbone_lr_mult) == (1e-4, 0.1)  # closer to ImageNet
    user, _ = plan_finetune(600, 1000, 100, 200, 128, 224, 0.7, _rates({("all", 160): (20.0, 50.0)})[0],
                            train_size=160, eval_size=192, lr=3e-4)
    assert (user.train_size, user.eval_size, user.lr) == (160, 192, 3e-4)  # the user's choices are kept


@pytest.mark.slow
def test_auto_keeps_the_fine_tuned_model_when_it_is_better(split_folder, tmp_path, cache_dir, probe_learns_nothing):
    """A probe that learnt nothing is poor; fine-tuning in the time left beats it and is kept."""
    result = transferkit.train(split_folder, out=tmp_path / "run", cache_dir=str(cache_dir), progress=False,
                               time_limit="60s", patience=3, **FAST)
    config = json.loads((result.run_dir / "config.json").read_text())
    history = _history(result.run_dir)
    probe_val = float(result.choice.rsplit("the probe's ", 1)[1])  # the zeroed head's, not the fit's history
    assert probe_val < 0.5
    assert config["mode"] == "finetune" and config["train"]["mode"] == "auto"
    assert result.choice.startswith("kept the fine-tuned model")
    assert result.val_accuracy > probe_val
    assert config["backbone"]["stored_in_run"]
    assert len([row for row in history if row["stage"] == "finetune"]) >= 2
    loaded = transferkit.Classifier.load(result.run_dir)
    predictions = loaded.predict(sorted((split_folder / "val" / "circles").glob("*.jpg")))
    assert [p.label for p in predictions].count("circles") >= 4


@pytest.mark.slow
def test_auto_keeps_the_probe_when_fine_tuning_is_worse(split_folder, tmp_path, cache_dir, monkeypatch):
    """Fine-tuning at an absurd learning rate wrecks the network; the probe it started from is kept (fine-tuning is
    tried here even after a perfect probe)."""
    monkeypatch.setattr(importlib.import_module("transferkit.train"), "FINETUNE_BELOW", 1.01)
    result = transferkit.train(split_folder, out=tmp_path / "run", cache_dir=str(cache_dir), progress=False,
                               time_limit="30s", lr=5.0, patience=2, **FAST)
    config = json.loads((result.run_dir / "config.json").read_text())
    history = _history(result.run_dir)
    probe_val = float([row for row in history if row["stage"] == "probe"][-1]["val_accuracy"])
    finetuned = [row for row in history if row["stage"] == "finetune"]
    assert finetuned, "fine-tuning was not tried"
    assert config["mode"] == "probe" and not config["backbone"].get("stored_in_run")
    assert result.choice.startswith("kept the probe")
    assert result.val_accuracy == pytest.approx(probe_val)
    assert max(float(row["val_accuracy"]) for row in finetuned) <= probe_val


def test_easy_data_keeps_the_probe_without_fine_tuning(split_folder, tmp_path, cache_dir):
    result = transferkit.train(split_folder, out=tmp_path / "run", cache_dir=str(cache_dir), progress=False,
                               mode="auto", **FAST)
    assert result.val_accuracy >= 0.97 and "leaves little room" in result.choice
    assert {row["stage"] for row in _history(result.run_dir)} == {"probe"}


def test_a_short_limit_is_honoured_end_to_end(split_folder, tmp_path, cache_dir):
    transferkit.train(split_folder, out=tmp_path / "warm", cache_dir=str(cache_dir), progress=False, report=False,
                      **FAST)  # features cached (and the ONNX export made), as on a second run
    started = time.perf_counter()
    result = transferkit.train(split_folder, out=tmp_path / "run", cache_dir=str(cache_dir), progress=False,
                               time_limit=20, head_epochs=1, **FAST)
    wall = time.perf_counter() - started
    assert wall <= 20 * 1.05, f"a 20 s limit took {wall:.1f} s"
    assert result.report.is_file() and result.report.parent == result.run_dir  # the report fitted in the limit too
    assert result.val_accuracy >= 0.8


@pytest.mark.slow
def test_a_limit_shorter_than_extraction_warns_and_keeps_the_probe(image_folder, tmp_path, cache_dir):
    result = subprocess.run(_cli(str(image_folder), "--out", str(tmp_path / "run"), "--cache-dir", str(cache_dir),
                                 "--time-limit", "1s", "--image-size", "96", "--no-report"),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning: kept the probe: the time limit (1 s) is shorter than extracting" in result.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mode"] == "probe"


@pytest.mark.slow
def test_auto_run_killed_mid_way_resumes_within_the_time_left(split_folder, tmp_path, cache_dir):
    data = random_labels(split_folder, tmp_path / "random")  # the probe leaves room: fine-tuning is planned
    # 90 s: the last pass (training images for the unknown score, validation, test) is planned in after the epochs
    args = [str(data), "--time-limit", "90s", "--image-size", "96", "--workers", "2",
            "--batch-size", "12", "--cache-dir", str(cache_dir), "--no-report"]
    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli(*args, "--out", str(killed)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    state = None
    while time.time() < deadline and process.poll() is None:
        try:
            state = load_checkpoint(staging_dir(killed)) if (staging_dir(killed) / CHECKPOINT).exists() else None
        except transferkit.RunError:
            state = None  # caught half-renamed; read again
        if state and state.get("stage", {}).get("epoch", 0) >= 2:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    state = load_checkpoint(staging_dir(killed))
    assert state["stage"]["epoch"] >= 2 and state["auto_plan"]["epochs"] > state["stage"]["epoch"]
    spent = state["elapsed"]

    started = time.perf_counter()
    resumed = subprocess.run(_cli("--resume", str(killed), "--json"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    session = time.perf_counter() - started
    assert session <= 90 - spent + 15  # the resumed session used the time that was left, not a new 90 s
    # the run's clock counts the killed session too (less this process's start-up, which no clock sees)
    assert spent + session - 10 <= summary["seconds"] <= 90 * 1.05
    epochs = [int(row["epoch"]) for row in _history(killed) if row["stage"] == "finetune"]
    assert epochs == list(range(epochs[0], epochs[0] + len(epochs))) and len(epochs) > state["stage"]["epoch"]
    assert summary["choice"].startswith("kept")


@pytest.mark.slow
def test_logs_get_plain_lines_per_epoch_not_progress_bars(split_folder, tmp_path, cache_dir):
    log = tmp_path / "train.log"
    with log.open("w") as stderr:
        result = subprocess.run(_cli(str(split_folder), "--mode", "finetune", "--epochs", "2", "--image-size", "96",
                                     "--batch-size", "12", "--cache-dir", str(cache_dir), "--out",
                                     str(tmp_path / "run"), "--no-report"), stdout=subprocess.DEVNULL, stderr=stderr)
    assert result.returncode == 0
    text = log.read_text()
    assert "\r" not in text
    assert "Extracting features: 51/51 img" in text
    lines = text.splitlines()
    assert any(line.startswith("finetune epoch 1/2: train loss") and "left (until" in line for line in lines), text
    assert any(line.startswith("finetune epoch 2/2: train loss") for line in lines), text


@pytest.mark.slow
def test_probe_says_when_fine_tuning_would_pay(split_folder, tmp_path, cache_dir):
    result = subprocess.run(_cli(str(split_folder), "--optimizer", "adamw", "--epochs", "1", "--lr", "1e-6",
                                 "--image-size", "96",
                                 "--cache-dir", str(cache_dir), "--out", str(tmp_path / "run"), "--no-report"),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    tips = [line for line in result.stdout.splitlines() if line.startswith("Tip: fine-tuning would likely pay")]
    assert len(tips) == 1 and f"transferkit train {split_folder} --time-limit " in tips[0], result.stdout
    good = subprocess.run(_cli(str(split_folder), "--image-size", "96", "--cache-dir", str(cache_dir), "--out",
                               str(tmp_path / "good"), "--no-report"), capture_output=True, text=True)
    assert "Tip:" not in good.stdout


@pytest.mark.slow
def test_auto_on_imagenet_like_photos_is_never_worse_than_the_probe(hymenoptera, tmp_path, cache_dir):
    probe = transferkit.train(hymenoptera, out=tmp_path / "probe", cache_dir=str(cache_dir), progress=False,
                              report=False)
    auto = transferkit.train(hymenoptera, out=tmp_path / "auto", cache_dir=str(cache_dir), progress=False,
                             report=False, time_limit="2m")
    assert auto.val_accuracy >= probe.val_accuracy >= 0.95
    assert auto.seconds <= 120
