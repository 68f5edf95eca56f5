"""The report of a multi-label run (issue 27): its numbers, pictures and captions checked against what the test works
out itself from labels.csv, predictions.csv and the run's thresholds, not from the report's code."""

from __future__ import annotations

import base64
import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import transferkit
from transferkit.multilabel import average_precision
from transferkit.plots import GRID_CAPTION, GRID_GAP, precision_recall_points

GREEN, RED, GREY = (0x1a, 0x7f, 0x37), (0xcf, 0x22, 0x2e), (0x6e, 0x77, 0x81)


class _Node:
    def __init__(self, tag: str, attrs: list[tuple[str, str | None]]):
        self.tag, self.attrs, self.children = tag, dict(attrs), []

    def find_all(self, tag: str, **attrs: str) -> list[_Node]:
        found = []
        for child in self.children:
            if isinstance(child, _Node):
                if child.tag == tag and all(child.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items()):
                    found.append(child)
                found.extend(child.find_all(tag, **attrs))
        return found

    def find(self, tag: str, **attrs: str) -> _Node:
        (node,) = self.find_all(tag, **attrs)
        return node

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children).strip()


class _Page(HTMLParser):
    """The page as a tree of elements (the standard library has no DOM for HTML)."""

    VOID = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self, text: str):
        super().__init__()
        self.root = _Node("document", [])
        self._open = [self.root]
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = _Node(tag, attrs)
        self._open[-1].children.append(node)
        if tag not in self.VOID:
            self._open.append(node)

    def handle_endtag(self, tag):
        while len(self._open) > 1 and self._open.pop().tag != tag:
            pass

    def handle_data(self, data):
        self._open[-1].children.append(data)


@pytest.fixture(scope="module")
def reported(mosaic_run, tmp_path_factory) -> Path:
    """A copy of the session's multi-label run with its report written (the session's run stays untouched)."""
    run = tmp_path_factory.mktemp("multilabel-report") / "run"
    shutil.copytree(mosaic_run, run)
    page = transferkit.report(run)
    assert page == run / "report.html"
    return run


def _truth(mosaics: Path) -> dict[str, set[str]]:
    """Each image's labels, read from labels.csv (path -> labels)."""
    with mosaics.open(newline="", encoding="utf-8") as handle:
        return {str((mosaics.parent / path).resolve()): set(field.split("|")) for path, field in csv.reader(handle)}


def _prediction_rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "predictions.csv").read_text(encoding="utf-8").splitlines()))


def _stored(run: Path) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """predictions.csv's probabilities (path -> class -> probability) and config.json's thresholds."""
    probabilities = {row["path"]: {key.split(":", 1)[1]: float(value) for key, value in row.items()
                                   if key.startswith("probability:")} for row in _prediction_rows(run)}
    thresholds = json.loads((run / "config.json").read_text())["thresholds"]["per_class"]
    return probabilities, thresholds


def _expected_verdicts(path: str, truth: dict, probabilities: dict, thresholds: dict) -> set[tuple[str, str]]:
    given = {name for name, p in probabilities[path].items() if p >= thresholds[name]}
    true = truth[path]
    return ({(n, "right") for n in given & true} | {(n, "wrong") for n in given - true}
            | {(n, "missed") for n in true - given})


def _shown_verdicts(page: _Node, table_id: str) -> list[tuple[str, set[tuple[str, str]]]]:
    return [(row.attrs["data-path"], {(s.attrs["data-label"], s.attrs["data-verdict"]) for s in row.find_all("span")})
            for row in page.find("table", id=table_id).find_all("tr") if "data-path" in row.attrs]


def _has_colour(pixels: np.ndarray, colour: tuple[int, int, int]) -> bool:
    """Whether text of exactly this colour is drawn here (glyph cores carry the colour itself; anti-aliased edges,
    mixed with white, are far from it)."""
    return bool((np.abs(pixels.astype(int) - colour).max(-1) <= 10).any())


def test_report_shows_the_numbers_training_measured(reported):
    page = _Page((reported / "report.html").read_text(encoding="utf-8")).root
    test = json.loads((reported / "metrics.json").read_text())["test"]
    for key in ("map_macro", "map_micro", "exact_match", "hamming_loss", "f1_micro"):
        card = page.find("div", data_metric=key)
        assert float(card.attrs["data-value"]) == pytest.approx(test[key], abs=1e-12)
        assert card.text == f"{test[key]:.4f}"
    classes = json.loads((reported / "config.json").read_text())["labels"]
    rows = page.find("table", id="per-class").find_all("tr")[1:]
    assert [row.attrs["data-class"] for row in rows] == classes
    for row in rows:
        expected = test["per_class"][row.attrs["data-class"]]
        cells = [cell.text for cell in row.find_all("td")]
        assert cells[1] == f"{expected['ap']:.3f}"
        assert cells[2:] == [f"{expected['precision']:.3f}", f"{expected['recall']:.3f}", f"{expected['f1']:.3f}",
                             str(expected["support"]), f"{expected['threshold']:.3f}"]


def test_precision_recall_figure_is_a_real_picture(reported):
    path = reported / "report_files" / "pr_curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels < 200).any(axis=-1).mean() > 0.01  # axes, curves and text, not a blank canvas
    page = _Page((reported / "report.html").read_text(encoding="utf-8")).root
    (img,) = [i for i in page.find_all("img") if i.attrs["data-file"] == "report_files/pr_curves.png"]
    assert base64.b64decode(img.attrs["src"].split(",", 1)[1]) == path.read_bytes()
    assert (reported / "report_files" / "curves.png").is_file()  # history with val_map, not val_accuracy


def test_labels_are_coloured_by_what_is_true_and_what_is_predicted(reported, mosaics):
    """Each shown image's labels in the HTML, and the colours in its caption in the picture, are the ones the test
    derives from labels.csv, the stored probabilities and the run's thresholds."""
    page = _Page((reported / "report.html").read_text(encoding="utf-8")).root
    truth = _truth(mosaics)
    probabilities, thresholds = _stored(reported)
    shown = _shown_verdicts(page, "label-predictions")
    assert len(shown) == min(16, json.loads((reported / "metrics.json").read_text())["test"]["n"])
    for path, verdicts in shown:
        assert verdicts == _expected_verdicts(path, truth, probabilities, thresholds), path
    every = {verdict for _, verdicts in shown for _, verdict in verdicts}
    assert every == {"right", "wrong", "missed"}
    # The run's thresholds are not 0.5, and some shown label lies between the two: a 0.5 cut would show it otherwise.
    assert any(min(t, 0.5) <= probabilities[path][name] < max(t, 0.5)
               for path, _ in shown for name, t in thresholds.items())

    with Image.open(reported / "report_files" / "label_predictions.png") as image:
        grid = np.asarray(image.convert("RGB"))
    tile = (grid.shape[1] - GRID_GAP) // 4 - GRID_GAP
    for index, (path, verdicts) in enumerate(shown):
        row, column = divmod(index, 4)
        left, top = GRID_GAP + column * (tile + GRID_GAP), GRID_GAP + row * (tile + GRID_CAPTION + GRID_GAP)
        caption = grid[top:top + GRID_CAPTION, left:left + tile]
        kinds = {verdict for _, verdict in verdicts}
        assert _has_colour(caption, RED) == ("wrong" in kinds), path
        assert _has_colour(caption, GREY) == ("missed" in kinds), path
        assert _has_colour(caption, GREEN) == ("right" in kinds or not kinds), path


def test_top_losses_are_the_worst_images_by_cross_entropy(reported, mosaics):
    page = _Page((reported / "report.html").read_text(encoding="utf-8")).root
    truth = _truth(mosaics)
    probabilities, thresholds = _stored(reported)
    classes = json.loads((reported / "config.json").read_text())["labels"]
    test_paths = [row["path"] for row in _prediction_rows(reported) if row["split"] == "test"]
    p = np.clip([[probabilities[path][c] for c in classes] for path in test_paths], 1e-7, 1 - 1e-7)
    y = np.array([[c in truth[path] for c in classes] for path in test_paths], dtype=float)
    losses = -(y * np.log(p) + (1 - y) * np.log1p(-p)).sum(1)
    worst = [test_paths[i] for i in np.argsort(-losses, kind="stable")[:8]]
    shown = _shown_verdicts(page, "label-top-losses")
    assert [path for path, _ in shown] == worst
    for path, verdicts in shown:
        assert verdicts == _expected_verdicts(path, truth, probabilities, thresholds), path
    assert (reported / "report_files" / "label_top_losses.png").is_file()


def test_cooccurrence_counts_the_training_split(reported, mosaics):
    """The training split is every image of labels.csv that predictions.csv does not list (those are val and test)."""
    truth = _truth(mosaics)
    evaluated = {row["path"] for row in _prediction_rows(reported)}
    config = json.loads((reported / "config.json").read_text())
    classes = config["labels"]
    training = np.array([[c in labels for c in classes] for path, labels in truth.items() if path not in evaluated],
                        dtype=int)
    page = _Page((reported / "report.html").read_text(encoding="utf-8")).root
    rows = page.find("table", id="cooccurrence").find_all("tr")
    assert [cell.text for cell in rows[0].find_all("th")][1:] == classes
    assert [row.find("th").text for row in rows[1:]] == classes
    shown = np.array([[int(cell.text) for cell in row.find_all("td")] for row in rows[1:]])
    np.testing.assert_array_equal(shown, training.T @ training)
    assert np.diag(shown).tolist() == [config["data"]["class_counts"]["train"][c] for c in classes]
    assert (reported / "report_files" / "cooccurrence.png").is_file()


def test_precision_recall_points_match_scikit_learn():
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(0)
    truth = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.4 * truth, 1)  # rounded: many ties
    recall, precision = precision_recall_points(truth, scores)
    sk_precision, sk_recall, _ = precision_recall_curve(truth, scores)
    np.testing.assert_allclose(recall, sk_recall[::-1])
    np.testing.assert_allclose(precision, sk_precision[::-1])
    assert np.sum(np.diff(recall) * precision[1:]) == pytest.approx(average_precision(truth, scores))
    assert len(precision_recall_points(np.zeros(5), np.arange(5))[0]) == 0
