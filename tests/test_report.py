"""Reports, the backbone table and model summaries: pictures a person looks at, checked in a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transferkit
from transferkit.backbone import open_backbone
from transferkit.evaluate import read_predictions
from transferkit.plots import confusion_view, plot_confusion
from transferkit.report import confused_pairs
from transferkit.summary import list_backbones, summarize

from conftest import make_image_folder

FAST = dict(image_size=96, workers=2)


def _open(browser, page_path: Path) -> dict:
    """What a person would see: every image's natural width and every key number, read by the browser."""
    page = browser.new_page()
    try:
        page.goto(page_path.resolve().as_uri())
        page.wait_for_load_state("load")
        return page.evaluate("""() => ({
            images: Array.from(document.images).map(i => ({alt: i.alt, width: i.naturalWidth, complete: i.complete})),
            metrics: Object.fromEntries(Array.from(document.querySelectorAll('[data-metric]')).map(
                e => [e.dataset.metric, {value: e.dataset.value, text: e.textContent.trim()}])),
            headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent.trim()),
            perClassRows: document.querySelectorAll('#per-class tbody tr').length,
            firstClassAfterSort: (() => { const th = document.querySelectorAll('#per-class thead th')[4];
                                         th.click(); th.click();
                                         return document.querySelector('#per-class tbody tr td').textContent; })(),
        })""")
    finally:
        page.close()


def _imbalanced_shapes(root: Path) -> Path:
    """Two classes, one hard to tell apart from the other at 96 px, so the report has mistakes to show."""
    classes = {"circles": ("ellipse", (200, 60, 60)), "squares": ("rectangle", (190, 70, 70))}
    make_image_folder(root / "train", per_class=14, seed=1, classes=classes)
    make_image_folder(root / "val", per_class=8, seed=2, classes=classes)
    for extra in sorted((root / "val" / "circles").glob("*.jpg"))[:3]:  # 5 circles, 8 squares: sorting moves rows
        extra.unlink()
    return root


def test_train_writes_a_report_that_renders_in_chromium(browser, tmp_path, cache_dir):
    data = _imbalanced_shapes(tmp_path / "data")
    result = transferkit.train(data, out=tmp_path / "run", cache_dir=str(cache_dir), progress=False, **FAST)
    page_path = result.report
    assert page_path == result.run_dir / "report.html" and page_path.is_file()
    pngs = sorted(p.name for p in (result.run_dir / "report_files").glob("*.png"))
    assert {"curves.png", "samples.png", "predictions.png", "confusion.png"} <= set(pngs)

    seen = _open(browser, page_path)
    assert len(seen["images"]) == len(pngs)
    assert all(image["complete"] and image["width"] > 0 for image in seen["images"]), seen["images"]
    val = json.loads((result.run_dir / "metrics.json").read_text())["val"]
    for key in ("accuracy", "macro_f1", "loss"):
        assert float(seen["metrics"][key]["value"]) == pytest.approx(val[key], abs=1e-12)
        assert seen["metrics"][key]["text"] == f"{val[key]:.4f}"
    assert int(seen["metrics"]["skipped"]["value"]) == 0
    assert seen["perClassRows"] == 2
    assert [c["support"] for c in val["per_class"].values()] == [5, 8]
    assert seen["firstClassAfterSort"] == "squares"  # sorted by support, descending: no longer the first row
    for heading in ("Learning curves", "Training images as the model sees them", "Predictions on the val split",
                    "Confusion matrix", "Per class (val)", "Model", "Data"):
        assert heading in seen["headings"]
    if val["accuracy"] < 1:
        assert "Top losses: the most confident mistakes" in seen["headings"]
        assert "Most confused pairs" in seen["headings"]

    # The same page from the command line, evaluated afresh on other data, into a file of the user's choosing.
    other = make_image_folder(tmp_path / "other", per_class=4, seed=9,
                              classes={"circles": ("ellipse", (200, 60, 60)), "squares": ("rectangle", (190, 70, 70))})
    out = tmp_path / "elsewhere" / "mine.html"
    done = subprocess.run([sys.executable, "-m", "transferkit", "report", str(result.run_dir), "--data", str(other),
                           "--split", "all", "--out", str(out), "--cache-dir", str(cache_dir)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "elsewhere" / "mine_files" / "confusion.png").is_file()
    seen = _open(browser, out)
    assert seen["images"] and all(image["width"] > 0 for image in seen["images"])
    expected = transferkit.evaluate(result.run_dir, other, split="all", cache_dir=cache_dir).metrics
    assert float(seen["metrics"]["accuracy"]["value"]) == pytest.approx(expected["accuracy"])
    assert "Per class (all)" in seen["headings"] and seen["perClassRows"] == 2


def test_predictions_file_matches_the_metrics(split_folder, tmp_path, cache_dir):
    result = transferkit.train(split_folder, out=tmp_path / "run", cache_dir=str(cache_dir), progress=False,
                               report=False, **FAST)
    assert not (result.run_dir / "report.html").exists()
    predictions = read_predictions(result.run_dir / "predictions.csv", result.classes)["val"]
    metrics = result.metrics["val"]
    assert len(predictions.paths) == metrics["n"]
    assert predictions.correct.mean() == pytest.approx(metrics["accuracy"])
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (predictions.targets, predictions.predicted), 1)
    assert confusion.tolist() == metrics["confusion_matrix"]
    assert np.all(predictions.confidence >= predictions.label_probability - 1e-9)


def test_report_survives_moved_images_and_keeps_the_numbers(split_folder, tmp_path, cache_dir):
    result = transferkit.train(split_folder, out=tmp_path / "run", cache_dir=str(cache_dir), progress=False,
                               report=False, **FAST)
    shutil.rmtree(split_folder)
    page = transferkit.report(result.run_dir).read_text()
    assert "Training samples not shown" in page and "Pass --data" in page
    assert f'data-value="{result.metrics["val"]["accuracy"]}"' in page


def test_finetune_report_marks_where_fine_tuning_started(split_folder, tmp_path, cache_dir):
    result = transferkit.train(split_folder, out=tmp_path / "run", cache_dir=str(cache_dir), progress=False,
                               mode="finetune", epochs=1, unfreeze="top-blocks:1", batch_size=12, **FAST)
    page = result.report.read_text()
    first_finetune_epoch = next(row["epoch"] for row in result.history if row["stage"] == "finetune")
    assert f"fine-tuning started at epoch {first_finetune_epoch}" in page
    summary = summarize(result.run_dir)
    head_parameters = open_backbone().feature_width * 3 + 3
    assert head_parameters < summary.trainable_parameters < summary.total_parameters
    assert summary.notes["mode"] == "finetune"
    probe = transferkit.train(split_folder, out=tmp_path / "probe", cache_dir=str(cache_dir), progress=False,
                              report=False, **FAST)
    probe_summary = summarize(probe.run_dir)
    assert probe_summary.trainable_parameters == head_parameters
    backbone_parameters = sum(p.numel() for p in open_backbone().trainable_copy().parameters())
    assert probe_summary.total_parameters == backbone_parameters + head_parameters
    assert probe_summary.rows[-1].name == "head" and probe_summary.rows[-1].output_shape == [3]


def test_confusion_matrix_stays_readable_with_many_classes(tmp_path):
    rng = np.random.default_rng(0)
    classes = [f"class_{i:03d}_with_a_long_name" for i in range(150)]
    confusion = np.diag(rng.integers(5, 20, 150))
    for _ in range(60):
        confusion[rng.integers(150), rng.integers(150)] += int(rng.integers(1, 6))
    matrix, names, note = confusion_view(confusion, classes)
    assert matrix.shape == (30, 30) and len(names) == 30 and "30 of 150" in note
    mistakes = confusion.sum(0) + confusion.sum(1) - 2 * np.diag(confusion)
    assert names[0] == classes[int(np.argmax(mistakes))]
    with Image.open(plot_confusion(confusion, classes, tmp_path / "confusion.png")) as image:
        assert max(image.size) <= 1600
    pairs = confused_pairs(confusion.tolist(), classes)
    assert len(pairs) == 15 and pairs == sorted(pairs, key=lambda p: -p["count"])


@pytest.mark.slow
def test_report_with_many_classes(tmp_path, cache_dir):
    rng = np.random.default_rng(3)
    styles = ["ellipse", "rectangle", "stripes"]
    classes = {f"c{i:03d}": (styles[i % 3], tuple(int(v) for v in rng.integers(0, 256, 3))) for i in range(105)}
    data = tmp_path / "many"
    make_image_folder(data / "train", per_class=2, seed=1, classes=classes, size=48)
    make_image_folder(data / "val", per_class=1, seed=2, classes=classes, size=48)
    result = transferkit.train(data, out=tmp_path / "run", cache_dir=str(cache_dir), progress=False, epochs=20,
                               image_size=64, workers=2, groups={"odd": [c for i, c in enumerate(classes) if i % 2],
                                                                "even": [c for i, c in enumerate(classes)
                                                                         if not i % 2]})
    page = result.report.read_text()
    assert page.count("<tr><td>c") >= 2 * 105  # per-class table and data table list every class
    assert (result.run_dir / "report_files" / "groups.png").is_file()
    with Image.open(result.run_dir / "report_files" / "confusion.png") as image:
        assert max(image.size) <= 1600


@pytest.mark.slow
def test_models_table_is_measured_on_the_models():
    rows = list_backbones()
    assert [row.name for row in rows[:3]] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert all(row.embedded for row in rows[:3]) and not any(row.embedded for row in rows[3:])
    lite0 = open_backbone().model
    assert rows[0].parameters == sum(p.numel() for p in lite0.parameters())
    assert rows[0].feature_size == lite0.num_features
    assert rows[0].layers == sum(1 for m in lite0.modules() if next(m.parameters(recurse=False), None) is not None)
    assert rows[0].input_size == 224 and rows[0].test_input_size == 288 and rows[0].imagenet_top1 == 75.1
    resnet = next(row for row in rows if row.name == "resnet18")
    assert resnet.parameters == 11_689_512 and resnet.feature_size == 512 and resnet.imagenet_top1 == 73.2
    assert resnet.backbone_parameters == 11_689_512 - (512 * 1000 + 1000)  # less the ImageNet classifier
    done = subprocess.run([sys.executable, "-m", "transferkit", "models", "convnext_t*", "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {row["name"] for row in json.loads(done.stdout)} >= {"convnext_tiny"}


@pytest.mark.slow
def test_summary_of_a_backbone_name_needs_no_weights():
    summary = summarize("efficientnet_lite0")
    assert summary.total_parameters == sum(p.numel() for p in open_backbone().model.parameters())
    assert summary.trainable_parameters == summary.total_parameters
    assert summary.rows[0].output_shape == [32, 112, 112]
    done = subprocess.run([sys.executable, "-m", "transferkit", "summary", "not_a_model_name"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "not_a_model_name" in done.stderr
    with torch.no_grad():
        features = open_backbone().features(torch.zeros(1, 3, 224, 224))
    assert summary.feature_size == features.shape[1]
