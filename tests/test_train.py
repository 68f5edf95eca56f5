"""train -> run folder -> Classifier.load -> predict / evaluate, on synthetic images drawn in the tests."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

import transferkit
from transferkit import Classifier, DataError, RunError
from transferkit.evaluate import classification_metrics


def _train(data, tmp_path, cache_dir, name="run", **options):
    """A probe run; without its report.html (2 s of plotting) unless the test looks at it."""
    return transferkit.train(data, out=tmp_path / name, cache_dir=str(cache_dir), progress=False,
                             **{"report": False, **options})


def test_train_writes_a_complete_run(split_folder, tmp_path, cache_dir):
    result = _train(split_folder, tmp_path, cache_dir, report=True)
    run = result.run_dir
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "history.csv", "labels.txt", "metrics.json",
                                                     "model.safetensors", "novelty.npz", "predictions.csv",
                                                     "report.html", "report_files", "skipped.txt"]
    assert result.val_accuracy >= 0.9
    config = json.loads((run / "config.json").read_text())
    assert config["labels"] == ["circles", "squares", "stripes"] == (run / "labels.txt").read_text().split()
    assert config["backbone"]["name"] == "efficientnet_lite0" and config["head"]["kind"] == "linear"
    history = list(csv.DictReader((run / "history.csv").open()))
    assert len(history) == len(result.history) and float(history[0]["val_loss"]) > 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] == result.val_accuracy and metrics["val"]["n"] == 15
    assert not list(tmp_path.glob(".run.partial*"))


def test_loaded_classifier_predicts_paths_and_pil_images(split_folder, tmp_path, cache_dir):
    run = _train(split_folder, tmp_path, cache_dir).run_dir
    classifier = Classifier.load(run)
    val_paths = sorted((split_folder / "val").glob("*/*.jpg"))
    predictions = classifier.predict(val_paths + [Image.open(val_paths[0])], top_k=2)
    assert [len(p.labels) for p in predictions] == [2] * (len(val_paths) + 1)
    correct = sum(p.label == path.parent.name for p, path in zip(predictions, val_paths))
    assert correct / len(val_paths) >= 0.9
    assert predictions[-1].label == predictions[0].label and predictions[-1].source == f"<image {len(val_paths)}>"
    assert all(abs(sum(p.probabilities) - 1) < 1e-3 for p in classifier.predict(val_paths[:3], top_k=3))


def test_evaluate_matches_training_metrics_and_groups(split_folder, tmp_path, cache_dir):
    result = _train(split_folder, tmp_path, cache_dir)
    groups = {"round": ["circles"], "angular": ["squares", "stripes"]}
    report = transferkit.evaluate(result.run_dir, split_folder, groups=groups, cache_dir=cache_dir, progress=False)
    assert report.split == "val"
    assert report.accuracy == pytest.approx(result.val_accuracy)
    assert report.metrics["groups"]["round"]["n"] == 5 and report.metrics["groups"]["angular"]["n"] == 10
    with pytest.raises(DataError, match="groups name classes"):
        transferkit.evaluate(result.run_dir, split_folder, groups={"x": ["dragons"]}, cache_dir=cache_dir)


def test_same_seed_same_run_and_cache_reused(image_folder, tmp_path, cache_dir):
    first = _train(image_folder, tmp_path, cache_dir, "a", head="mlp", balance=True, label_smoothing=0.1)
    second = _train(image_folder, tmp_path, cache_dir, "b", head="mlp", balance=True, label_smoothing=0.1)
    assert first.features_computed == 36 and second.features_computed == 0
    assert first.history == second.history
    assert set(first.images) == {"train", "val", "test"} and "test" in first.metrics


def test_bad_images_are_skipped_and_listed(image_folder, tmp_path, cache_dir):
    good = next((image_folder / "circles").glob("*.jpg")).read_bytes()
    bad = {"truncated.jpg": good[: len(good) // 3], "empty.png": b"", "text.jpg": b"hello, I am text\n" * 20}
    for name, data in bad.items():
        (image_folder / "squares" / name).write_bytes(data)
    Image.new("CMYK", (64, 64), (0, 0, 255, 0)).save(image_folder / "squares" / "cmyk.jpg")
    result = _train(image_folder, tmp_path, cache_dir, val_percent=0, test_percent=0)
    listed = dict(line.split("\t") for line in (result.run_dir / "skipped.txt").read_text().splitlines())
    assert {p.rsplit("/", 1)[-1] for p in listed} == set(bad)
    assert result.images["train"] == 36 + 1  # the CMYK image is fine
    assert result.val_accuracy is None and result.best_epoch == len(result.history)


def test_class_with_only_unreadable_images_fails_and_leaves_no_run(image_folder, tmp_path, cache_dir):
    (image_folder / "ghosts").mkdir()
    (image_folder / "ghosts" / "a.jpg").write_bytes(b"not a picture")
    with pytest.raises(DataError, match="no readable training images left for class.*ghosts"):
        _train(image_folder, tmp_path, cache_dir, val_percent=0, test_percent=0)
    assert not any(tmp_path.glob("run")) and not list(tmp_path.glob(".run.partial*"))


def test_existing_run_is_not_overwritten_by_accident(image_folder, tmp_path, cache_dir):
    _train(image_folder, tmp_path, cache_dir)
    with pytest.raises(RunError, match="already exists"):
        _train(image_folder, tmp_path, cache_dir)
    assert _train(image_folder, tmp_path, cache_dir, overwrite=True, seed=3).run_dir.is_dir()
    with pytest.raises(RunError, match="not a complete transferkit run"):
        Classifier.load(tmp_path)


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support, top_k_accuracy_score

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 6, 300)
    targets[targets == 5] = 4  # class 5 never occurs: zero-division paths
    probabilities = rng.dirichlet(np.ones(6), 300)
    m = classification_metrics(targets, probabilities, [f"c{i}" for i in range(6)])
    p, r, f, s = precision_recall_fscore_support(targets, probabilities.argmax(1), labels=range(6), zero_division=0)
    assert [c["precision"] for c in m["per_class"].values()] == pytest.approx(p)
    assert [c["recall"] for c in m["per_class"].values()] == pytest.approx(r)
    assert [c["f1"] for c in m["per_class"].values()] == pytest.approx(f)
    assert [c["support"] for c in m["per_class"].values()] == s.tolist()
    assert m["confusion_matrix"] == confusion_matrix(targets, probabilities.argmax(1), labels=range(6)).tolist()
    assert m["top5_accuracy"] == pytest.approx(top_k_accuracy_score(targets, probabilities, k=5, labels=range(6)))
    assert m["loss"] == pytest.approx(log_loss(targets, probabilities, labels=range(6)), rel=1e-6)
