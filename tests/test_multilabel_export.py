"""Multi-label exports and serving (issue 27): the exported model gives one sigmoid per class, its thresholds travel
in thresholds.json, and the torch-free runtime and the server give the same label sets as the PyTorch Classifier."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from transferkit import Classifier, ExportedClassifier
from transferkit.export import export_run
from transferkit.multilabel import sigmoid

from test_serve import _start_server


@pytest.fixture(scope="module")
def exported(mosaic_run, tmp_path_factory) -> Path:
    """The run's ONNX export (its parity check on 16 of the run's validation/test images, to keep the test quick)."""
    return export_run(mosaic_run, out=tmp_path_factory.mktemp("multilabel-export") / "onnx", parity_images=16,
                      progress=False).folder


@pytest.fixture(scope="module")
def images(mosaic_run, mosaics) -> list[Path]:
    """20 of the run's validation/test mosaics (images it was not trained on), first those that its per-class
    thresholds label otherwise than a flat 0.5 would (by the probabilities in its predictions.csv): on these, a
    model that ignored its thresholds would answer differently."""
    from transferkit.evaluate import PREDICTIONS_FILE, read_predictions

    config = json.loads((mosaic_run / "config.json").read_text())
    thresholds = np.array([config["thresholds"]["per_class"][c] for c in config["labels"]])
    parts = read_predictions(mosaic_run / PREDICTIONS_FILE, config["labels"], thresholds).values()
    scored = [(bool(((row >= thresholds) != (row >= 0.5)).any()), Path(path)) for part in parts
              for path, row in zip(part.paths, part.probabilities)]
    chosen = [path for _, path in sorted(scored, key=lambda item: not item[0])][:20]
    assert len(chosen) == 20 and all(path.parent == mosaics.parent / "images" for path in chosen)
    return chosen


@pytest.fixture(scope="module")
def reference(mosaic_run, images) -> list:
    """What the PyTorch Classifier predicts for `images` (every class ranked: the mosaics have 5), in fp32: torch's
    CPU default, bf16 autocast where the CPU has it, moves these probabilities by up to 0.07."""
    return Classifier.load(mosaic_run, engine="torch", precision="fp32").predict(images, top_k=5)


def _by_class(predictions, classes: list[str]) -> np.ndarray:
    """(images, classes) probabilities from top-k predictions that rank every class."""
    return np.array([[dict(zip(p.labels, p.probabilities))[name] for name in classes] for p in predictions])


def test_onnx_export_gives_sigmoids_thresholds_and_the_same_label_sets(mosaic_run, exported, images, reference):
    config = json.loads((mosaic_run / "config.json").read_text())
    manifest = json.loads((exported / "export.json").read_text())
    assert manifest["multi_label"] is True and manifest["parity"]["label_set_agreement"] == 1.0
    assert manifest["parity"]["max_abs_probability_difference"] <= 1e-4 and not manifest["parity"]["synthetic"]
    assert json.loads((exported / "thresholds.json").read_text()) == config["thresholds"]

    model = ExportedClassifier(exported)
    classes = model.classes
    assert model.multi_label and classes == config["labels"]
    assert model.thresholds.tolist() == pytest.approx([config["thresholds"]["per_class"][c] for c in classes])

    # The graph's probabilities are the sigmoids of its logits: no softmax, no temperature.
    pixels = np.stack([model.preprocessing.pixels(Image.open(path).convert("RGB")) for path in images])
    probabilities, logits = model.session.run(["probabilities", "logits"], {"pixels": pixels})
    assert np.abs(probabilities - sigmoid(logits)).max() <= 1e-5
    assert np.abs(probabilities.sum(1) - 1).max() > 0.1  # not a softmax: rows do not sum to 1
    expected = _by_class(reference, classes)
    assert np.abs(probabilities - expected).max() <= 1e-4

    answers = model.predict(images, top_k=5)
    assert [a.chosen for a in answers] == [r.chosen for r in reference]
    assert [a.passed for a in answers] == [r.passed for r in reference]
    assert [a.answer for a in answers] == [r.answer for r in reference]
    # not a vacuous comparison: the images get different label sets, several of them more than one label
    assert len({tuple(r.chosen) for r in reference}) >= 5 and sum(len(r.chosen) >= 2 for r in reference) >= 3
    assert [a.chosen for a in answers] == [[classes[j] for j in np.argsort(-row, kind="stable")
                                            if row[j] >= model.thresholds[j]] for row in probabilities]
    flat = [[classes[j] for j in np.argsort(-row, kind="stable") if row[j] >= 0.5] for row in probabilities]
    assert sum(a.chosen != f for a, f in zip(answers, flat)) >= 2  # the run's own thresholds decide these images

    overridden = model.predict(images, top_k=5, threshold=0.9)
    assert [a.chosen for a in overridden] == [[classes[j] for j in np.argsort(-row, kind="stable") if row[j] >= 0.9]
                                              for row in probabilities]


@pytest.fixture(scope="module")
def server(exported):
    process, url = _start_server([sys.executable, "-m", "transferkit", "serve", str(exported)])
    yield url
    process.terminate()
    process.wait(timeout=20)


def test_server_answers_the_label_sets(server, exported, images, reference):
    info = httpx.get(f"{server}/v1/model").json()
    thresholds = json.loads((exported / "thresholds.json").read_text())["per_class"]
    assert info["multi_label"] is True and info["thresholds"] == pytest.approx(thresholds)

    files = [("files", (path.name, path.read_bytes(), "image/png")) for path in images]
    results = httpx.post(f"{server}/v1/predict/batch", params={"top_k": 5}, files=files, timeout=120).json()["results"]
    assert [[label["label"] for label in r["labels"]] for r in results] == [p.chosen for p in reference]
    for result, expected in zip(results, reference):
        assert [label["probability"] for label in result["labels"]] == pytest.approx(expected.chosen_probabilities,
                                                                                    abs=1e-4)
        assert [row["label"] for row in result["predictions"]] == expected.labels
        assert [row["passed"] for row in result["predictions"]] == expected.passed

    one = httpx.post(f"{server}/v1/predict", content=images[0].read_bytes(), timeout=60).json()
    assert [label["label"] for label in one["labels"]] == reference[0].chosen and "predictions" in one

    # ?threshold= decides every class at one threshold, as ExportedClassifier.predict(threshold=...) does
    strict = ExportedClassifier(exported).predict(images[:4], top_k=5, threshold=0.9)
    answers = httpx.post(f"{server}/v1/predict/batch", params={"threshold": 0.9}, files=files[:4],
                         timeout=60).json()["results"]
    assert [[label["label"] for label in a["labels"]] for a in answers] == [p.chosen for p in strict]
    assert httpx.post(f"{server}/v1/predict", params={"threshold": 1.5}, content=images[0].read_bytes(),
                      timeout=60).status_code == 422


def test_page_shows_the_labels_that_passed(server, images, reference, browser):
    position = next(i for i, p in enumerate(reference) if p.chosen and not all(p.passed))
    expected = reference[position]
    page = browser.new_page()
    try:
        page.goto(server)
        page.set_input_files("#file", str(images[position]))
        page.wait_for_selector("#result .row .label", timeout=30_000)
        passed = page.locator("#result .row.passed .label").all_text_contents()
        below = page.locator("#result .row.below .label").all_text_contents()
        assert passed == expected.chosen
        assert below == [label for label, ok in zip(expected.labels, expected.passed) if not ok]
        assert set(page.locator("#result .row.below .mark").all_text_contents()) == {"below threshold"}
        shown = page.locator("#result .row.passed .value").all_text_contents()
        assert shown == [f"{100 * p:.1f}%" for p in expected.chosen_probabilities]
    finally:
        page.close()


def test_a_multi_label_run_folder_is_served_and_a_single_label_model_refuses_threshold(mosaic_run, exported, images,
                                                                                        reference):
    from fastapi.testclient import TestClient

    from transferkit.serve import ServeConfig, ServedModel, create_app, load_model

    with TestClient(create_app(load_model(mosaic_run), ServeConfig(max_batch=4))) as client:
        answer = client.post("/v1/predict", content=images[1].read_bytes()).json()
        info = client.get("/v1/model").json()
    assert [label["label"] for label in answer["labels"]] == reference[1].chosen
    assert info["format"] == "run" and info["multi_label"] is True

    served = load_model(exported)
    single = ServedModel("single", served.classes, served.preprocessing, served.outputs, {}, served.threshold)
    with TestClient(create_app(single)) as client:
        plain = client.post("/v1/predict", content=images[1].read_bytes())
        refused = client.post("/v1/predict", params={"threshold": 0.5}, content=images[1].read_bytes())
        assert "passed" not in client.get("/").text
    assert plain.status_code == 200 and "labels" not in plain.json()
    assert "passed" not in plain.json()["predictions"][0]
    assert refused.status_code == 400 and "multi-label" in refused.json()["detail"]
