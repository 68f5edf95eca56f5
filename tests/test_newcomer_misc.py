"""Issue 17 (a newcomer's first hour): ONNX export of any run, progress in log files, the demo, small wording."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import transferkit
from conftest import fresh_cache, make_image_folder
from transferkit.cli import app
from transferkit.export import export_run
from transferkit.runtime import ExportedClassifier

runner = CliRunner()
QUICK = dict(image_size=64, workers=2, engine="torch", report=False, doctor=False, progress=False)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "transferkit", *args]


def _logged(command: list[str], log: Path) -> tuple[int, str]:
    """Run `command` with stderr to a file, as `2> log` does; its return code and the log."""
    with log.open("w") as stderr:
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=stderr)
    return done.returncode, log.read_text()


@pytest.fixture(scope="module")
def one_val_run(tmp_path_factory) -> Path:
    """A probe run whose validation split is a single image (and no test split)."""
    root = tmp_path_factory.mktemp("one-val")
    make_image_folder(root / "data" / "train", per_class=6, seed=1)
    make_image_folder(root / "data" / "val", per_class=1, seed=2, classes={"circles": ("ellipse", (220, 40, 40))})
    cache = fresh_cache(root / "cache")
    return transferkit.train(root / "data", out=root / "run", cache_dir=str(cache), **QUICK).run_dir


# ---------------------------------------------------------------------------------------------- item 3: export


def test_onnx_export_of_a_run_with_one_validation_image(one_val_run, tmp_path):
    result = export_run(one_val_run, out=tmp_path / "onnx")
    assert result.parity["images"] == 1 and result.parity["synthetic"] is False  # the run's own image
    exported = ExportedClassifier(tmp_path / "onnx")
    for batch in (1, 3):
        probabilities = exported.probabilities(np.zeros((batch, 64, 64, 3), np.uint8))
        assert probabilities.shape == (batch, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torchscript = export_run(one_val_run, "torchscript", out=tmp_path / "ts")
    assert torchscript.parity["images"] == 1
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]


def test_export_says_when_parity_fell_back_to_synthetic_images(one_val_run, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(one_val_run, moved)
    (moved / "predictions.csv").unlink()  # no validation/test images known to the run
    result = runner.invoke(app, ["export", str(moved), "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert "synthetic" in result.stdout
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["parity"]["synthetic"] is True


# ---------------------------------------------------------------------------------------------- item 7: progress


def test_predict_and_export_write_plain_progress_lines_to_a_log(one_val_run, tmp_path):
    images = make_image_folder(tmp_path / "new", per_class=4, seed=5)
    code, text = _logged(_cli("predict", str(one_val_run), str(images)), tmp_path / "predict.log")
    assert code == 0 and "\r" not in text
    assert "Predicting: 12/12 img" in text, text
    code, text = _logged(_cli("export", str(one_val_run), "--quantize", "int8", "--out", str(tmp_path / "q")),
                         tmp_path / "export.log")
    assert code == 0 and "\r" not in text
    assert "calibrating on 18 training images" in text, text
    assert "few calibration images" in text  # 18 images do not cover what a model sees


def test_head_mode_logs_epoch_lines_without_carriage_returns(tmp_path, cache_dir):
    data = make_image_folder(tmp_path / "data", per_class=6)
    code, text = _logged(_cli("train", str(data), "--mode", "head", "--epochs", "2", "--image-size", "64",
                              "--out", str(tmp_path / "run"), "--cache-dir", str(cache_dir), "--no-report",
                              "--no-doctor"), tmp_path / "train.log")
    assert code == 0 and "\r" not in text
    assert "head epoch 1/2: train loss" in text and "Checking images: 18/18 img" in text, text


# ---------------------------------------------------------------------------------------------- item 17: the demo


def test_demo_shows_a_mix_of_classes_and_a_mistake(tmp_path, monkeypatch, cache_dir):
    import transferkit.demo

    data = make_image_folder(tmp_path / "data", per_class=20)
    result = transferkit.train(data, out=tmp_path / "run", cache_dir=str(cache_dir), **QUICK)
    predictions = result.run_dir / "predictions.csv"
    with predictions.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    planted = next(row for row in rows if row["split"] == "test")  # a mistake among the test predictions
    planted["predicted"] = next(name for name in result.classes if name != planted["label"])
    with predictions.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.setattr(transferkit.demo, "run_demo", lambda *args, **kwargs: result)
    shown = runner.invoke(app, ["demo"])
    assert shown.exit_code == 0, shown.output
    table = shown.stdout[shown.stdout.index("a few test predictions"):]
    cells = [[cell.strip() for cell in line.split("│")[1:4]] for line in table.splitlines() if ".jpg" in line]
    assert {label for _, label, _ in cells} == set(result.classes), table  # one per class, not five of the first
    assert [planted["path"], planted["label"], planted["predicted"]] in cells, table


def test_doctor_finds_little_in_clean_small_digits(tmp_path, cache_dir):
    from transferkit.demo import write_digits
    from transferkit.doctor import diagnose

    digits = write_digits(tmp_path / "all")
    subset = tmp_path / "digits"
    for folder in sorted(digits.iterdir()):
        (subset / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:40]:
            shutil.copy(image, subset / folder.name / image.name)
    report = diagnose(subset, image_size=96, cache_dir=cache_dir, progress=False, engine="torch")
    totals = report.totals()
    assert totals.get("label_error", 0) <= 8, report.summary()  # 2 % of 400; 42 before the doctor was fixed
    assert totals.get("near_duplicate", 0) + totals.get("leak_near", 0) == 0, report.summary()


# ---------------------------------------------------------------------------------------------- item 22: wording


def test_plural_helper():
    from transferkit.text import plural

    assert [plural(1, "image"), plural(2, "image"), plural(1, "class"), plural(3, "class")] == \
        ["1 image", "2 images", "1 class", "3 classes"]


def test_train_output_says_1_image_and_omits_empty_feature_counts(tmp_path, cache_dir):
    data = make_image_folder(tmp_path / "data", per_class=6)
    done = runner.invoke(app, ["train", str(data), "--mode", "head", "--epochs", "1", "--image-size", "64",
                               "--out", str(tmp_path / "run"), "--cache-dir", str(cache_dir), "--no-report",
                               "--no-doctor", "--workers", "2"])
    assert done.exit_code == 0, done.output
    assert "features:" not in done.stdout  # head mode computes no cached features
    assert "(1 image)" in done.stdout and "1 images" not in done.stdout, done.stdout  # this split's test: 1 image


def test_summary_of_a_missing_folder_says_neither_run_nor_backbone():
    done = runner.invoke(app, ["summary", "runs/nope"])
    assert done.exit_code == 2
    assert "neither a run folder" in done.output and "nor a backbone" in done.output


def test_download_suggests_a_close_name_and_says_nothing_of_zero_kept_bytes(tmp_path):
    from transferkit.download import download_url
    from transferkit.errors import DownloadError

    done = runner.invoke(app, ["download", "flower", "--to", str(tmp_path)])
    assert done.exit_code == 2 and "Did you mean flowers?" in done.output, done.output
    with pytest.raises(DownloadError) as offline:
        download_url("http://127.0.0.1:9/data.zip", tmp_path / "data", retries=0)
    assert "cannot reach" in str(offline.value) and "bytes are kept" not in str(offline.value)


def test_report_split_without_data_is_honoured_or_refused(one_val_run, tmp_path):
    page = transferkit.report(one_val_run, out=tmp_path / "val.html", split="val")
    assert page.is_file()
    refused = runner.invoke(app, ["report", str(one_val_run), "--split", "test", "--out", str(tmp_path / "t.html")])
    assert refused.exit_code == 2 and "without data" in refused.output and "test split" in refused.output


def test_models_table_has_top1_figures_and_backbone_parameters():
    from transferkit.summary import describe_backbone

    lite0, resnet = describe_backbone("efficientnet_lite0"), describe_backbone("resnet50")
    assert lite0.parameters == 4_652_008 and lite0.backbone_parameters == 3_371_008  # what `summary RUN` counts
    assert resnet.imagenet_top1 == 81.2 and "results-imagenet.csv" in resnet.top1_source
