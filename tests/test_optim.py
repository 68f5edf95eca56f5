"""Optimisers, learning-rate schedules, gradient clipping and the early-stopping monitor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import transferkit
from conftest import make_image_folder
from transferkit.cli import app
from transferkit.errors import DataError
from transferkit.optim import make_optimizer, make_scheduler


def _rates(schedule: str, epochs: int = 4, steps: int = 5, **options) -> np.ndarray:
    optimizer = make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], "sgd", 1.0, 0.0)
    scheduler = make_scheduler(optimizer, schedule, epochs, steps, **options)
    rates = []
    for _ in range(epochs * steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(rates)


def test_step_schedule_follows_the_milestones_after_warmup():
    rates = _rates("step", lr_steps=(2, 3), warmup_epochs=1)
    assert np.all(np.diff(rates[:5]) > 0) and rates[4] < 1.0  # linear warm-up over the first epoch
    np.testing.assert_allclose(rates[5:10], 1.0)
    np.testing.assert_allclose(rates[10:15], 0.1)
    np.testing.assert_allclose(rates[15:], 0.01)


def test_cosine_and_onecycle_shapes():
    cosine = _rates("cosine")
    assert cosine[0] == 1.0 and np.all(np.diff(cosine) < 0) and cosine[-1] < 0.01
    onecycle = _rates("onecycle", warmup_epochs=1)
    peak = int(np.argmax(onecycle))
    assert 3 <= peak <= 5 and onecycle[peak] == pytest.approx(1.0, rel=0.02)
    assert onecycle[0] < 0.1 and onecycle[-1] < 0.01
    np.testing.assert_allclose(_rates("constant"), 1.0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("optim")
    make_image_folder(root / "data" / "train", per_class=10, seed=5)
    make_image_folder(root / "data" / "val", per_class=4, seed=6)
    return root


@pytest.mark.parametrize("options", [
    {"optimizer": "sgd", "lr": 0.05, "nesterov": True, "schedule": "step", "lr_steps": (10, 20)},
    {"optimizer": "adam", "schedule": "cosine", "warmup_epochs": 2},
    {"optimizer": "rmsprop", "lr": 3e-4, "schedule": "onecycle", "grad_clip": 1.0},
    {"optimizer": "adamw", "monitor": "val_accuracy", "epochs": 15},
])
def test_every_optimizer_and_schedule_learns_the_shapes(shapes, options):
    options = dict(options)  # the parametrize dict is shared between runs of this test
    result = transferkit.train(shapes / "data", out=shapes / "runs" / str(sorted(options.items())), progress=False,
                               cache_dir=str(shapes / "cache"), epochs=options.pop("epochs", 30), **options)
    assert result.val_accuracy >= 0.9
    rates = [row["lr"] for row in result.history]
    if options.get("schedule") in ("step", "cosine"):
        assert rates[-1] < rates[2]
    if options.get("monitor") == "val_accuracy":
        best = max(row["val_accuracy"] for row in result.history)
        assert result.history[result.best_epoch - 1]["val_accuracy"] == best


def test_bad_optimisation_options_are_one_line_errors(shapes):
    with pytest.raises(DataError, match="--lr-steps must be increasing epochs between 1 and 30"):
        transferkit.train(shapes / "data", epochs=30, schedule="step", lr_steps=(9, 3), out=shapes / "x")
    runner = CliRunner()
    for flags, message in ((["--optimizer", "adagrad"],
                            "'adagrad' is not one of 'lbfgs', 'adamw', 'adam', 'sgd', 'rmsprop'"),
                           (["--schedule", "step", "--lr-steps", "6;9"], "--lr-steps takes epoch numbers"),
                           (["--monitor", "loss"], "'loss' is not one of 'val_loss', 'val_accuracy'")):
        result = runner.invoke(app, ["train", str(shapes / "data"), "--out", str(shapes / "y"), *flags])
        assert result.exit_code == 2 and message in result.output, result.output
