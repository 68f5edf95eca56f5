"""Several labels an image: label sets and one-hot CSVs, one sigmoid per class trained in the probe and on images,
per-class thresholds kept with the run and used by every prediction, multi-label metrics; on real flower mosaics."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import transferkit
from transferkit import Classifier
from transferkit.cli import app
from transferkit.data import load_dataset
from transferkit.errors import DataError
from transferkit.multilabel import (average_precision, choose_thresholds, detect_separator,
                                    multilabel_metrics, split_labels)

from conftest import draw_sample

runner = CliRunner()


def _images(folder: Path, count: int) -> list[str]:
    """`count` small real images (drawn shapes) in `folder`; their names."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        draw_sample("ellipse", (200, 40, 40), rng, 48).save(folder / f"{i:03d}.png")
        names.append(f"{i:03d}.png")
    return names


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- reading label sets


def test_label_fields_detect_their_separator_and_keep_single_label_csvs_as_they_were(tmp_path: Path, caplog):
    names = _images(tmp_path, 40)
    tags = ["beach|people|dog", "beach", "people|dog", "", "dog|beach"]
    piped = _csv(tmp_path / "piped.csv", [f"{n},{tags[i % 5]}" for i, n in enumerate(names)])
    with caplog.at_level(logging.INFO):
        dataset = load_dataset(piped, val_percent=0, test_percent=0)
    assert dataset.multi_label and dataset.label_sep == "|" and dataset.classes == ["beach", "dog", "people"]
    targets = dataset.targets("train")
    by_name = {s.path.name: row for s, row in zip(dataset.splits["train"], targets)}
    assert by_name["000.png"].tolist() == [1, 1, 1] and by_name["003.png"].tolist() == [0, 0, 0]
    assert dataset.counts()["train"] == {"beach": 24, "people": 16, "dog": 24}
    assert any("multi-label data" in r.message and "8 with none" in r.message for r in caplog.records)

    # the Kaggle / fastai form: space-separated tags in a column named tags
    spaced = _csv(tmp_path / "tags.csv", ["image_name,tags", *(f"{n},{t.replace('|', ' ')}" for n, t in
                                                              zip(names, tags * 8))])
    assert load_dataset(spaced, val_percent=0, test_percent=0).targets("train").sum() == targets.sum()
    # a space in a single-label CSV is part of the class name, and one label a row stays single-label
    single = _csv(tmp_path / "single.csv", [f"{n},{'golden retriever' if i % 2 else 'cat'}" for i, n in
                                            enumerate(names)])
    plain = load_dataset(single, val_percent=0, test_percent=0)
    assert not plain.multi_label and plain.classes == ["cat", "golden retriever"]
    assert plain.targets("train").dtype == np.int64
    # --multi-label forces label sets on one-label rows; --label-sep ; splits there
    forced = load_dataset(single, val_percent=0, test_percent=0, multi_label=True)
    assert forced.classes == ["cat", "golden retriever"] and forced.targets("train").shape == (40, 2)
    semi = _csv(tmp_path / "semi.csv", [f"{n},\"a;b\"" if i % 2 else f"{n},a" for i, n in enumerate(names)])
    assert load_dataset(semi, val_percent=0, test_percent=0, label_sep=";").targets("train").sum() == 60


def test_one_hot_columns_and_their_splits(tmp_path: Path, caplog):
    names = _images(tmp_path, 30)
    rows = ["path,sky,water,never,split"]
    rows += [f"{n},{i % 2},{1 if i % 3 == 0 else 0},0,{'val' if i >= 24 else 'train'}" for i, n in enumerate(names)]
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset(_csv(tmp_path / "onehot.csv", rows))
    assert dataset.multi_label and dataset.classes == ["sky", "water"]
    assert len(dataset.splits["train"]) == 24 and len(dataset.splits["val"]) == 6
    assert dataset.targets("train")[:, 0].tolist() == [i % 2 for i in range(24)]
    assert any("never occur in the training images" in r.message and "never" in r.message for r in caplog.records)
    # a label column with an unusual name is still path,label when its values are not 0/1
    named = _csv(tmp_path / "named.csv", ["image,species,split", *(f"{n},{'cat' if i % 2 else 'dog'},train"
                                                                  for i, n in enumerate(names))])
    assert load_dataset(named, val_percent=0).classes == ["cat", "dog"]


@pytest.mark.parametrize("rows, says", [
    (["path,sky,water", "000.png,1,0", "001.png,yes,1"], "line 3, column 'sky': 'yes' is not 0 or 1"),
    (["000.png,\"'rock|roll'|jazz\"", "001.png,jazz"], "also occurs inside the quoted label name"),
])
def test_bad_label_fields_are_refused_in_one_line(tmp_path: Path, rows, says):
    _images(tmp_path, 2)
    with pytest.raises(DataError, match=None) as refused:
        load_dataset(_csv(tmp_path / "bad.csv", rows), val_percent=0, test_percent=0)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_an_empty_label_is_refused_where_every_image_has_one_and_skipped_otherwise(tmp_path: Path):
    names = _images(tmp_path, 6)
    listing = _csv(tmp_path / "l.csv", [f"{n},{'' if i == 2 else 'ab'[i % 2]}" for i, n in enumerate(names)])
    with pytest.raises(DataError, match="line 3: the label field is empty"):
        load_dataset(listing, val_percent=0, test_percent=0, multi_label=False)
    dataset = load_dataset(listing, val_percent=0, test_percent=0)
    assert not dataset.multi_label and len(dataset.splits["train"]) == 5
    assert "empty label" in dataset.skipped[0].reason
    result = runner.invoke(app, ["train", str(listing), "--label-sep", "|", "--single-label"])
    assert result.exit_code == 2 and "label_sep (--label-sep)" in result.output


def test_detect_and_split_labels():
    assert detect_separator(["a|b", "c"]) == "|" and detect_separator(["a b", "c"]) is None
    assert detect_separator(["a b"], "tags") == " " and detect_separator(["a,b"]) is None
    assert split_labels(" a | b |a|", "|") == ("a", "b") and split_labels("  ", "|") == ()


# ---------------------------------------------------------------------------------------------- decisions and metrics


def test_metrics_match_scikit_learn():
    from sklearn.metrics import average_precision_score, f1_score, hamming_loss

    rng = np.random.default_rng(0)
    targets = (rng.random((200, 6)) < 0.3).astype(np.float32)
    probabilities = np.clip(targets * 0.35 + rng.random((200, 6)) * 0.65, 0, 1).round(2).astype(np.float32)
    thresholds = np.array([0.3, 0.4, 0.5, 0.5, 0.6, 0.7], dtype=np.float32)
    metrics = multilabel_metrics(targets, probabilities, thresholds, list("abcdef"))
    predicted = probabilities >= thresholds
    assert metrics["map_macro"] == pytest.approx(average_precision_score(targets, probabilities, average="macro"))
    assert metrics["map_micro"] == pytest.approx(average_precision_score(targets, probabilities, average="micro"))
    assert metrics["hamming_loss"] == pytest.approx(hamming_loss(targets, predicted))
    assert metrics["f1_micro"] == pytest.approx(f1_score(targets, predicted, average="micro"))
    assert metrics["per_class"]["c"]["f1"] == pytest.approx(f1_score(targets[:, 2], predicted[:, 2]))
    assert metrics["exact_match"] == pytest.approx(np.mean((predicted == targets.astype(bool)).all(1)))
    assert average_precision(np.zeros(5), np.ones(5)) is None


def test_thresholds_maximise_each_class_f1_with_a_floor():
    rng = np.random.default_rng(1)
    truth = np.zeros((300, 3), dtype=np.float32)
    truth[:, 0] = rng.random(300) < 0.5
    truth[:150, 1] = 1  # a class the model scores low: its best F1 threshold is low
    truth[:2, 2] = 1  # too rare to choose for
    probabilities = np.stack([np.clip(truth[:, 0] * 0.5 + rng.random(300) * 0.5, 0, 1),
                              np.clip(truth[:, 1] * 0.04 + rng.random(300) * 0.1, 0, 1),
                              rng.random(300)], axis=1).astype(np.float32)
    thresholds = choose_thresholds(probabilities, truth)
    grid = np.linspace(0.01, 0.99, 99)
    best = max(grid, key=lambda t: _f1(truth[:, 0] > 0, probabilities[:, 0] >= t))
    assert _f1(truth[:, 0] > 0, probabilities[:, 0] >= thresholds[0]) >= _f1(truth[:, 0] > 0,
                                                                             probabilities[:, 0] >= best) - 1e-9
    assert 0.1 <= thresholds[1] < 0.11 and thresholds[2] == 0.5  # the floor, not the F1-best 0.04


def _f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    hits = (truth & predicted).sum()
    return 2 * hits / max(truth.sum() + predicted.sum(), 1)


# ---------------------------------------------------------------------------------------------- training on mosaics


def _truth(mosaics: Path) -> dict[str, set[str]]:
    with open(mosaics, encoding="utf-8") as handle:
        return {str(mosaics.parent / path): set(labels.split("|")) for path, labels in csv.reader(handle)}


def test_a_multi_label_probe_learns_mosaics_and_its_thresholds_decide_predictions(mosaic_run: Path, mosaics: Path):
    config = json.loads((mosaic_run / "config.json").read_text())
    metrics = json.loads((mosaic_run / "metrics.json").read_text())
    assert config["head"]["multi_label"] and config["data"]["multi_label"] and config["data"]["label_sep"] == "|"
    assert metrics["test"]["multi_label"] and metrics["test"]["map_macro"] > 0.7, metrics["test"]["map_macro"]
    assert metrics["test"]["hamming_loss"] < 0.3
    stored = config["thresholds"]["per_class"]
    assert set(stored) == set(config["labels"]) and config["thresholds"]["chosen_by"].startswith("validation")
    thresholds = np.array([stored[c] for c in config["labels"]])
    assert not np.allclose(thresholds, 0.5)

    classifier = Classifier.load(mosaic_run)
    assert classifier.multi_label and np.allclose(classifier.thresholds, thresholds)
    truth = _truth(mosaics)
    paths = sorted(truth)[:40]
    predictions = classifier.predict(paths, top_k=5, reject=False)
    probabilities = np.array([[dict(zip(p.labels, p.probabilities))[c] for c in config["labels"]]
                              for p in predictions])
    assert not np.allclose(probabilities.sum(1), 1.0, atol=0.05)  # one sigmoid per class, not a softmax
    with torch.inference_mode():  # the head's own logits through a sigmoid
        features = classifier.extractor.features(np.stack([classifier.backbone.preprocessing.pixels(
            transferkit.data.decode_image(Path(p).read_bytes())) for p in paths[:4]]))
        logits = classifier.head(torch.as_tensor(features)).numpy()
    assert np.allclose(probabilities[:4], 1 / (1 + np.exp(-logits)), atol=1e-4)
    for prediction, row in zip(predictions, probabilities):
        expected = {c for c, p, t in zip(config["labels"], row, thresholds) if p >= t}
        assert set(prediction.chosen) == expected
        assert prediction.passed == [dict(zip(config["labels"], row >= thresholds))[c] for c in prediction.labels]
    right = np.mean([set(p.chosen) == truth[p.source] for p in predictions])
    assert right > 0.25, right
    # --threshold 0.5 overrides every class's threshold
    overridden = classifier.predict(paths[:10], threshold=0.5, reject=False)
    assert [set(p.chosen) for p in overridden] == [{lb for lb, pr in zip(p.labels, p.probabilities) if pr >= 0.5}
                                                   for p in overridden]
    with pytest.raises(DataError, match="--threshold must be between 0 and 1"):
        classifier.predict(paths[:1], threshold=1.5)


def test_predict_and_evaluate_on_the_command_line(mosaic_run: Path, mosaics: Path):
    truth = _truth(mosaics)
    image = sorted(truth)[0]
    result = runner.invoke(app, ["predict", str(mosaic_run), image, "--json", "--top-k", "3"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)[0]
    chosen = Classifier.load(mosaic_run).predict([image], reject=False)[0].chosen
    assert [entry["label"] for entry in answer["labels"]] == chosen
    assert len(answer["predictions"]) == 3 and all("passed" in entry for entry in answer["predictions"])
    table = runner.invoke(app, ["predict", str(mosaic_run), image, "--threshold", "0.001"])
    assert table.exit_code == 0 and table.output.count("yes") == 5  # every class passes a threshold that low
    evaluated = runner.invoke(app, ["evaluate", str(mosaic_run), str(mosaics), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    stored = json.loads((mosaic_run / "metrics.json").read_text())["test"]
    assert metrics["map_macro"] == pytest.approx(stored["map_macro"], abs=1e-4)
    text = runner.invoke(app, ["evaluate", str(mosaic_run), str(mosaics)])
    assert "macro mAP" in text.output and "threshold" in text.output


def test_fine_tuning_on_label_sets_early_stops_on_validation_map(mosaics: Path, tmp_path: Path):
    result = transferkit.train(mosaics, out=tmp_path / "run", mode="finetune", epochs=2, head_epochs=20,
                               image_size=128, unfreeze="top-blocks:2", report=False, doctor=False, progress=False,
                               cache_dir=str(tmp_path / "cache"))
    history = result.history
    assert [row["stage"] for row in history].count("finetune") == 2
    assert all("val_map" in row and "val_accuracy" not in row for row in history)
    assert result.metrics["test"]["map_macro"] > 0.6
    kept = next(row for row in history if row["epoch"] == result.best_epoch)
    assert kept["stage"] == "finetune"
    assert kept["val_map"] == max(row["val_map"] for row in history if row["stage"] == "finetune")
    classifier = Classifier.load(result.run_dir)
    assert classifier.multi_label and classifier.config["mode"] == "finetune"
    copied = shutil.copytree(result.run_dir, tmp_path / "copy")
    from_run = transferkit.train(mosaics, out=tmp_path / "more", mode="probe", from_run=copied, report=False,
                                 doctor=False, progress=False, cache_dir=str(tmp_path / "cache"))
    assert from_run.metrics["test"]["multi_label"]
