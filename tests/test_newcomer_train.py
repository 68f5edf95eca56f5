"""Issue 17, a newcomer's first hour: a warning for a validation split too small to steer training, resume that
refuses new options and keeps the run's own, `from_run` to train a finished run further, Python options checked
before any work, numpy arrays as prediction inputs, and useful reprs."""

from __future__ import annotations

import importlib
import json
import logging

import numpy as np
import pytest
import safetensors.torch
from conftest import make_image_folder
from PIL import Image
from typer.testing import CliRunner

import transferkit
from transferkit import Classifier, DataError
from transferkit.cli import app
from transferkit.runs import staging_dir

train_module = importlib.import_module("transferkit.train")  # the package's `train` is the function
FAST = dict(image_size=96, workers=2, batch_size=12, report=False, doctor=False)


def _train(data, tmp_path, cache_dir, name="run", **options):
    return transferkit.train(data, out=tmp_path / name, cache_dir=str(cache_dir), progress=False,
                             **{**FAST, **options})


def _validation_warnings(tmp_path, cache_dir, caplog, val_per_class: int) -> list[str]:
    """The small-validation warnings of a run on 3 classes with 8 training and `val_per_class` validation images."""
    data = tmp_path / "data"
    make_image_folder(data / "train", per_class=8, seed=1)
    make_image_folder(data / "val", per_class=val_per_class, seed=2)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        _train(data, tmp_path, cache_dir)
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "validation" in r.getMessage() and "early" in r.getMessage()]


# item 9: a validation split too small to steer early stopping is named, with what to do


def test_tiny_validation_split_warns_once_and_says_what_to_do(tmp_path, cache_dir, caplog):
    warnings = _validation_warnings(tmp_path, cache_dir, caplog, val_per_class=1)
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "3 images" in warnings[0] and "val_percent" in warnings[0]


def test_a_large_enough_validation_split_gives_no_warning(tmp_path, cache_dir, caplog):
    assert not _validation_warnings(tmp_path, cache_dir, caplog, val_per_class=7)


# item 11: resume refuses options it cannot honour and keeps the run's own; from_run trains a finished run further


def test_resume_refuses_new_options_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "run"), "--epochs", "12", "--lr", "0.5"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "--epochs" in line and "--lr" in line and "--resume" in line
    # --json only shapes the output: it reaches resume, which finds nothing to continue here
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 2 and "no interrupted run" in result.output


def _interrupted_run(split_folder, tmp_path, cache_dir, monkeypatch, **options):
    """A head run stopped (as by Ctrl-C) right after the checkpoint of its first epoch."""
    save = train_module._save

    def save_then_stop(staged, checkpoint, clock):
        save(staged, checkpoint, clock)
        if checkpoint.get("stage", {}).get("epoch") == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_save", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            _train(split_folder, tmp_path, cache_dir, mode="head", epochs=2, **options)
    run = tmp_path / "run"
    assert not run.exists() and staging_dir(run).exists()
    return run


def test_resume_keeps_the_runs_no_report_choice(split_folder, tmp_path, cache_dir, monkeypatch):
    run = _interrupted_run(split_folder, tmp_path, cache_dir, monkeypatch, report=False)
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert (run / "config.json").is_file() and not (run / "report.html").exists()


def test_a_run_started_with_a_relative_path_resumes_from_another_folder(split_folder, tmp_path, cache_dir,
                                                                         monkeypatch):
    monkeypatch.chdir(split_folder.parent)
    run = _interrupted_run(split_folder.name, tmp_path, cache_dir, monkeypatch)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = transferkit.resume(run, progress=False)
    assert resumed.run_dir == run and (run / "config.json").is_file()
    assert json.loads((run / "config.json").read_text())["data"]["source"] == str(split_folder)


def _tensors(run, prefix: str) -> dict:
    return {k: v for k, v in safetensors.torch.load_file(str(run / "model.safetensors")).items()
            if k.startswith(prefix)}


def test_from_run_starts_the_probe_from_the_runs_head(split_folder, tmp_path, cache_dir):
    first = _train(split_folder, tmp_path, cache_dir, "first")
    # a learning rate too small to move anything: the new run's first epoch scores the old run's head
    again = _train(split_folder, tmp_path, cache_dir, "again", from_run=first.run_dir, lr=1e-12, epochs=1,
                   optimizer="adamw")
    assert again.history[0]["val_loss"] == pytest.approx(first.history[first.best_epoch - 1]["val_loss"], rel=1e-5)
    old, new = _tensors(first.run_dir, "head."), _tensors(again.run_dir, "head.")
    assert all(np.allclose(old[k].numpy(), new[k].numpy(), atol=1e-6) for k in old)
    assert json.loads((again.run_dir / "config.json").read_text())["from_run"] == str(first.run_dir)
    # without from_run the same training starts from a fresh head
    fresh = _train(split_folder, tmp_path, cache_dir, "fresh", lr=1e-12, epochs=1, optimizer="adamw")
    assert fresh.history[0]["val_loss"] > 2 * again.history[0]["val_loss"]


def test_from_run_continues_a_fine_tuned_backbone(split_folder, tmp_path, cache_dir):
    first = _train(split_folder, tmp_path, cache_dir, "first", mode="finetune", epochs=1)
    again = _train(split_folder, tmp_path, cache_dir, "again", mode="finetune", epochs=1, lr=1e-12,
                   from_run=first.run_dir)
    assert [row["stage"] for row in again.history] == ["finetune"]  # no new first stage: the head is trained
    old, new = _tensors(first.run_dir, "backbone."), _tensors(again.run_dir, "backbone.")
    assert old.keys() == new.keys()
    assert all(np.allclose(old[k].float().numpy(), new[k].float().numpy(), atol=1e-6) for k in old)
    # a probe on top of the fine-tuned backbone keeps that backbone, so the run loads as trained
    probe = _train(split_folder, tmp_path, cache_dir, "probe", from_run=first.run_dir, lr=1e-12, epochs=1,
                   optimizer="adamw")
    assert _tensors(probe.run_dir, "backbone.").keys() == old.keys()
    assert Classifier.load(probe.run_dir).predict(sorted(split_folder.glob("val/*/*.jpg"))[:1])[0].label


def test_from_run_refuses_other_classes_and_backbones(split_folder, tmp_path, cache_dir):
    first = _train(split_folder, tmp_path, cache_dir, "first")
    other = make_image_folder(tmp_path / "other", per_class=6,
                              classes={"circles": ("ellipse", (220, 40, 40)), "dots": ("ellipse", (0, 0, 0))})
    for data, options, message in [(other, {}, "classes"),
                                   (split_folder, {"backbone": "efficientnet_lite1"}, "backbone"),
                                   (split_folder, {"head": "mlp"}, "head"),
                                   (split_folder, {"mode": "scratch"}, "scratch")]:
        with pytest.raises(DataError, match=message) as error:
            _train(data, tmp_path, cache_dir, "again", from_run=first.run_dir, **options)
        assert "\n" not in str(error.value)
        assert not (tmp_path / "again").exists() and not staging_dir(tmp_path / "again").exists()


# item 20: Python options are checked before any work, in the words of the Python API


@pytest.mark.parametrize("option, value, message", [
    ("epochs", -1, r"epochs \(--epochs\) must be 1 or more"),
    ("batch_size", 0, r"batch_size \(--batch-size\) must be 1 or more"),
    ("dropout", 1.5, r"dropout \(--dropout\) must be"),
    ("patience", 0, r"patience \(--patience\)"),
    ("val_percent", 150, r"val_percent \(--val-percent\)"),
    ("workers", -2, r"workers \(--workers\)"),
    ("epochs", "10", r"epochs \(--epochs\) must be a whole number"),
])
def test_bad_numbers_fail_before_any_folder_is_written(option, value, message, image_folder, tmp_path, cache_dir):
    with pytest.raises(DataError, match=message):
        _train(image_folder, tmp_path, cache_dir, **{option: value})
    assert not (tmp_path / "run").exists() and not staging_dir(tmp_path / "run").exists()
    assert not list(cache_dir.glob("*.sqlite"))  # not a feature was computed


def test_messages_name_python_parameters(image_folder, tmp_path, cache_dir):
    with pytest.raises(DataError, match="time_limit") as error:
        _train(image_folder, tmp_path, cache_dir, time_limit="1m", epochs=3)
    assert "epochs" in str(error.value)


@pytest.fixture
def probe_run(split_folder, tmp_path, cache_dir):
    return _train(split_folder, tmp_path, cache_dir)


def test_predict_takes_numpy_arrays_and_pil_images(probe_run, split_folder, tmp_path):
    classifier = Classifier.load(probe_run.run_dir)
    source = sorted(split_folder.glob("val/*/*.jpg"))[0]
    png = tmp_path / "image.png"
    Image.open(source).save(png)
    pixels = np.asarray(Image.open(png).convert("RGB"))
    grey = np.asarray(Image.open(png).convert("L"))
    grey_png = tmp_path / "grey.png"
    Image.fromarray(grey).save(grey_png)
    by_path, by_array, by_image, grey_by_path, grey_by_array = classifier.predict(
        [png, pixels, Image.open(png), grey_png, grey], top_k=3)
    assert by_array.labels == by_path.labels == by_image.labels
    assert by_array.probabilities == pytest.approx(by_path.probabilities, abs=1e-5)
    assert grey_by_array.probabilities == pytest.approx(grey_by_path.probabilities, abs=1e-5)
    assert by_array.source == "<image 1>"
    assert classifier.predict(pixels)[0].labels == by_path.labels  # one array alone is one image
    with pytest.raises(DataError, match=r"HxW.*not .*float64"):
        classifier.predict([np.zeros((8, 8, 3))])


def test_reprs_say_what_a_notebook_user_needs(probe_run, split_folder, cache_dir):
    classifier = Classifier.load(probe_run.run_dir)
    text = repr(classifier)
    assert text.startswith("Classifier(") and "efficientnet_lite0" in text and "probe" in text
    assert "circles" in text and f"{probe_run.val_accuracy:.3f}" in text
    html = classifier._repr_html_()
    assert "<table" in html and "efficientnet_lite0" in html and "stripes" in html
    result = repr(probe_run)
    assert str(probe_run.run_dir) in result and f"{probe_run.val_accuracy:.3f}" in result and len(result) < 400
    prediction = classifier.predict(sorted(split_folder.glob("val/*/*.jpg"))[:1], top_k=2)[0]
    assert prediction.label in repr(prediction) and f"{prediction.probability:.3f}" in repr(prediction)
    assert len(repr(prediction)) < 200
    report = transferkit.evaluate(probe_run.run_dir, split_folder, cache_dir=cache_dir, progress=False)
    assert f"{report.accuracy:.3f}" in repr(report) and "val" in repr(report) and len(repr(report)) < 300
