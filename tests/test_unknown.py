"""Knowing when not to answer: calibrated probabilities and "unknown" verdicts for images unlike the training data,
everywhere a prediction is made (Python, CLI, evaluate, report, export/runtime, server), on real photos."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

import transferkit
from transferkit import Classifier, ExportedClassifier
from transferkit.calibration import expected_calibration_error, fit_temperature, softmax
from transferkit.data import list_images
from transferkit.demo import write_digits
from transferkit.errors import DataError, RunError
from transferkit.export import export_run
from transferkit.novelty import NOVELTY_FILE, auroc, fit_novelty, neighbour_distance

from conftest import fresh_cache, make_image_folder, shared_dataset
from test_serve import _start_server

OUTSIDERS = 40


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> dict:
    """A hymenoptera probe (train/ and val/ as given, 160 px), its ONNX export, and outsiders: fixed-seed samples of
    flowers100's photos and of the demo digits."""
    hymenoptera, flowers = shared_dataset("hymenoptera"), shared_dataset("flowers100")
    root = tmp_path_factory.mktemp("unknown")
    run = transferkit.train(hymenoptera, out=root / "run", cache_dir=str(fresh_cache(root / "cache")),
                            progress=False, report=False, doctor=False, image_size=160).run_dir
    pool = sorted(list_images([str(flowers)]))
    random.Random(0).shuffle(pool)
    digits = sorted(list_images([str(write_digits(root / "digits"))]))
    random.Random(0).shuffle(digits)
    return {"run": run, "export": export_run(run, progress=False).folder, "flowers": pool[:OUTSIDERS],
            "digits": digits[:OUTSIDERS // 2], "own": sorted(list_images([str(hymenoptera / "val")]))}


def test_outsiders_are_unknown_and_the_run_accepts_its_own(honest):
    classifier = Classifier.load(honest["run"])
    config = json.loads((honest["run"] / "config.json").read_text())
    assert config["unknown"]["accept"] == 0.95 and config["unknown"]["scored_on"] == "val"
    own = classifier.predict(honest["own"])
    flowers = classifier.predict(honest["flowers"])
    digits = classifier.predict(honest["digits"])
    # measured: 5 % of its own validation photos, 77 % of the flowers and every digit called unknown
    assert np.mean([p.unknown for p in own]) <= 0.08
    assert np.mean([p.unknown for p in flowers]) >= 0.6
    assert all(p.unknown for p in digits)
    assert all(p.answer == "unknown" and p.label in classifier.classes for p in digits)
    assert auroc(np.array([p.ood_score for p in own]), np.array([p.ood_score for p in flowers + digits])) >= 0.9
    # the verdict follows the chosen share: accepting every validation image lets more outsiders in, rejection off
    # lets all in (and keeps the scores)
    loose = classifier.predict(honest["flowers"], accept=0.999)
    assert sum(p.unknown for p in loose) < sum(p.unknown for p in flowers)
    free = classifier.predict(honest["flowers"], reject=False)
    assert all(p.unknown is None and p.ood_score is not None for p in free)


def test_calibrated_probabilities_are_what_every_prediction_uses(honest):
    run = honest["run"]
    classifier = Classifier.load(run)
    temperature = classifier.calibration.temperature
    assert temperature != pytest.approx(1.0, abs=0.02) and classifier.calibration.fitted_on == "val (153 images)"
    image = honest["own"][:4]
    calibrated = classifier.predict(image, top_k=2)
    raw = classifier.predict(image, top_k=2, calibrated=False)
    for c, r in zip(calibrated, raw):
        expected = softmax(np.log(np.array([r.probabilities[0], 1 - r.probabilities[0]]))[None], temperature)[0]
        assert c.probabilities[0] == pytest.approx(expected[0], abs=1e-4)
    stored = (run / "predictions.csv").read_text().splitlines()[1].split(",")  # calibrated, then the model's own
    assert float(stored[4]) == pytest.approx(float(softmax(np.log([[float(stored[6]), 1 - float(stored[6])]]),
                                                           temperature)[0, 0]), abs=1e-4)
    # the export bakes the temperature in, and the runtime gives the same verdicts and scores as PyTorch
    exported = ExportedClassifier(honest["export"]).predict(image + honest["digits"][:4], top_k=2)
    reference = classifier.predict(image + honest["digits"][:4], top_k=2)
    assert [e.unknown for e in exported] == [r.unknown for r in reference] == [False] * 4 + [True] * 4
    assert np.allclose([e.probabilities for e in exported], [r.probabilities for r in reference], atol=1e-4)
    assert np.allclose([e.ood_score for e in exported], [r.ood_score for r in reference], atol=1e-4)


def test_the_temperature_tames_an_overconfident_head(honest):
    """The run's own head with its logits multiplied by 6: as sure of itself as a long fine-tuning, far more than
    it is right. The temperature fitted on validation brings it back."""
    classifier = Classifier.load(honest["run"])
    with torch.no_grad():
        for parameter in classifier.head.parameters():
            parameter.mul_(6.0)
    (raw, _), kept, _ = classifier.outputs_of_files(honest["own"], calibrated=False, progress=False)
    targets = np.array([classifier.classes.index(honest["own"][i].parent.name) for i in kept])
    halves = np.arange(len(targets)) % 2 == 0  # fitted on one half, measured on the other
    calibration = fit_temperature(raw[halves], targets[halves])
    before = expected_calibration_error(raw[~halves], targets[~halves])
    after = expected_calibration_error(calibration.apply(raw[~halves]), targets[~halves])
    assert calibration.temperature > 3 and after < before, (calibration, before, after)

    def log_loss(probabilities: np.ndarray) -> float:
        return float(-np.log(np.clip(probabilities[np.arange(len(probabilities)), targets[~halves]], 1e-12, 1)).mean())

    assert log_loss(calibration.apply(raw[~halves])) < 0.7 * log_loss(raw[~halves])


def test_no_validation_split_means_no_verdicts_unless_asked(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data", per_class=10, seed=3)
    run = transferkit.train(data, out=tmp_path / "run", cache_dir=str(fresh_cache(tmp_path / "cache")),
                            progress=False, report=False, doctor=False, image_size=96, val_percent=0,
                            test_percent=0).run_dir
    config = json.loads((run / "config.json").read_text())
    assert config["calibration"]["temperature"] == 1.0 and "no validation split" in config["calibration"]["note"]
    assert config["unknown"]["accept"] is None and config["unknown"]["scored_on"] == "train"
    assert "give --accept" in caplog.text
    classifier = Classifier.load(run)
    images = sorted(data.rglob("*.jpg"))[:3]
    assert all(p.unknown is None and p.ood_score is not None for p in classifier.predict(images))
    asked = classifier.predict(images, accept=0.9)
    assert [p.unknown for p in asked] == [False] * 3
    with pytest.raises(DataError, match="between 0 and 1"):
        classifier.predict(images, accept=1.0)
    with pytest.raises(DataError, match="between 0 and 1"):
        transferkit.train(data, out=tmp_path / "other", accept=0.0)


def test_runs_and_exports_from_before_keep_working(honest, tmp_path, caplog):
    """A run and an export as the previous version wrote them: no novelty.npz, no calibration in config.json, no
    score columns in predictions.csv. They load and predict (never unknown, said once), report and evaluate."""
    old_run = tmp_path / "old-run"
    shutil.copytree(honest["run"], old_run)
    (old_run / NOVELTY_FILE).unlink()
    config = json.loads((old_run / "config.json").read_text())
    del config["calibration"], config["unknown"]
    (old_run / "config.json").write_text(json.dumps(config))
    lines = (old_run / "predictions.csv").read_text().splitlines()
    (old_run / "predictions.csv").write_text("\n".join(",".join(line.split(",")[:6]) for line in lines) + "\n")
    classifier = Classifier.load(old_run)
    assert classifier.calibration.temperature == 1.0 and classifier.novelty is None
    for _ in range(2):
        answers = classifier.predict(honest["digits"][:2])
        assert all(p.unknown is None and p.ood_score is None and p.label for p in answers)
    assert caplog.text.count("written before transferkit scored unknown images") == 1
    with pytest.raises(RunError, match="--accept cannot apply"):
        classifier.predict(honest["digits"][:2], accept=0.9)
    page = transferkit.report(old_run)
    assert "keeps no unknown scores" in page.read_text()

    damaged = tmp_path / "damaged"
    shutil.copytree(honest["run"], damaged)
    for broken in (b"garbage", (honest["run"] / NOVELTY_FILE).read_bytes()[:100]):  # not an npz; a truncated one
        (damaged / NOVELTY_FILE).write_bytes(broken)
        with pytest.raises(RunError, match="cannot be read.*delete the file"):
            Classifier.load(damaged)

    old_export = tmp_path / "old-export"
    shutil.copytree(honest["export"], old_export)
    (old_export / NOVELTY_FILE).unlink()
    answers = ExportedClassifier(old_export).predict(honest["digits"][:2])
    assert all(p.unknown is None and p.label for p in answers)


def _cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transferkit", *arguments], capture_output=True, text=True,
                          timeout=300)


def test_cli_predict_evaluate_and_report_say_unknown(honest):
    run, digit = honest["run"], honest["digits"][0]
    table = _cli("predict", str(run), str(digit), str(honest["own"][0]), "--format", "csv")
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()
    assert rows[0].split(",")[5:7] == ["unknown", "ood_score"]
    assert rows[1].split(",")[5] == "true" and rows[-1].split(",")[5] == "false"
    off = _cli("predict", str(run), str(digit), "--no-reject", "--format", "json")
    assert json.loads(off.stdout)[0]["unknown"] is None
    folder = honest["flowers"][0].parent
    report = _cli("predict", str(honest["export"]), str(folder), "--ood-report")
    assert report.returncode == 0 and "AUROC" in report.stdout and "accepted as known" in report.stdout
    bad = _cli("predict", str(run), str(digit), "--accept", "1.5")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "between 0 and 1" in bad.stderr
    evaluated = transferkit.evaluate(run, shared_dataset("hymenoptera"))
    assert evaluated.metrics["unknown"]["unknown_share"] <= 0.08 and evaluated.metrics["ece"] is not None
    page = transferkit.report(run).read_text()
    assert "Risk-coverage" in page and "The most unfamiliar images" in page and "Reliability" in page


@pytest.fixture(scope="module")
def honest_server(honest):
    process, url = _start_server([sys.executable, "-m", "transferkit", "serve", str(honest["export"])])
    yield url
    process.terminate()
    process.wait(timeout=20)


def test_the_server_answers_unknown_for_an_outsider(honest, honest_server):
    digit, ant = honest["digits"][0], honest["own"][0]
    answer = httpx.post(f"{honest_server}/v1/predict", content=digit.read_bytes(), timeout=60).json()
    assert answer["unknown"] is True and answer["ood_score"] > 0 and answer["predictions"]
    known = httpx.post(f"{honest_server}/v1/predict", content=ant.read_bytes(), timeout=60).json()
    assert known["unknown"] is False
    forced = httpx.post(f"{honest_server}/v1/predict", params={"reject": "false"}, content=digit.read_bytes(),
                        timeout=60).json()
    assert forced["unknown"] is None


def test_the_page_says_it_does_not_know(honest, honest_server, browser):
    digit, ant = honest["digits"][0], honest["own"][0]
    page = browser.new_page()
    try:
        page.goto(honest_server)
        page.set_input_files("#file", str(digit))
        page.wait_for_selector("#result .row .label", timeout=30_000)
        assert "I don't know this" in page.locator("#unknown").text_content()
        page.set_input_files("#file", str(ant))
        page.wait_for_function("!document.getElementById('unknown') && document.querySelector('#result .row')",
                               timeout=30_000)
    finally:
        page.close()


def test_novelty_without_validation_scores_each_training_image_against_the_others():
    rng = np.random.default_rng(0)
    train = (rng.normal(size=(50, 8)) + 3).astype(np.float32)  # features of one kind: all in one direction
    logits = np.zeros((50, 3))
    logits[:, 0] = 6 + rng.normal(size=50)  # a head sure of class 0
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    alone = [neighbour_distance(unit[i:i + 1], np.delete(unit, i, axis=0))[0] for i in range(50)]
    assert np.allclose(neighbour_distance(unit, unit, first_self=0), alone, atol=1e-6)  # never its own neighbour
    model = fit_novelty(train, logits, None, None, None, None)
    assert model.scored_on == "train" and model.accept is None and model.threshold() is None
    assert model.scales["distance"][0] == pytest.approx(np.mean(alone), abs=1e-3)
    assert abs(model.reference_scores.mean()) < 1e-3  # each part standardised on the images it was scored on
    far = model.scores(-train[:5], logits[:5])
    assert np.all(far > model.reference_scores.max())
    unsure = model.scores(train[:5], np.zeros((5, 3)))  # familiar features, but the head likes no class
    assert np.all(unsure > model.scores(train[:5], logits[:5]))
