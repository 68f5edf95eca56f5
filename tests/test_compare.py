"""`transferkit compare` on real photos: its numbers worked out again here from the two runs' predictions.csv (read
with the csv module, not transferkit's reader), McNemar's p-value from a hand count of the discordant images, and
the page's pictures checked tile by tile against the images that should be on them."""

from __future__ import annotations

import base64
import csv
import importlib
import io
import json
import logging
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import transferkit
from conftest import fresh_cache, shared_dataset
from transferkit.backbone import Preprocessing
from transferkit.cli import app
from transferkit.compare import GRID_IMAGES, Comparison, Disagreement, mcnemar_p
from transferkit.plots import GRID_CAPTION, GRID_GAP
from transferkit.report import _view
from transferkit.runs import read_run_config

FAST = dict(image_size=96, workers=2, progress=False, report=False, doctor=False)
TILE, COLUMNS = 200, 4
runner = CliRunner()


def _link(source: Path, target: Path, count: int, skip: int = 0) -> None:
    """`count` photos of `source` as symbolic links in `target` (the shared photos are never copied)."""
    target.mkdir(parents=True, exist_ok=True)
    for photo in sorted(source.iterdir())[skip:skip + count]:
        (target / photo.name).symlink_to(photo)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Runs on hymenoptera at 96 px, sharing one validation folder of 30 ants and 30 bees:
    A: a probe on 20 training photos a class; B: a probe on 4 a class (right and wrong on other images);
    C: a probe that also knows daisies (flowers100), trained from a CSV whose validation rows are the same files
       in reverse order (so matching them by position would pair the wrong images);
    D: a probe whose held-out images are carved from its own training folder (none of them in common with A's);
    M1, M2: multi-label runs (label sets of one label each, forced) on A's and C's data: different labels."""
    hymenoptera, flowers = shared_dataset("hymenoptera"), shared_dataset("flowers100")
    root = tmp_path_factory.mktemp("compare")
    for name in ("ants", "bees"):
        _link(hymenoptera / "train" / name, root / "big" / name, 20)
        _link(hymenoptera / "train" / name, root / "small" / name, 4)
        _link(hymenoptera / "val" / name, root / "val" / name, 30)
    _link(flowers / "daisy", root / "daisies", 20)
    rows = [(path, path.parent.name, "train") for path in sorted((root / "big").glob("*/*"))]
    rows += [(path, "daisy", "train") for path in sorted((root / "daisies").iterdir())[:12]]
    rows += [(path, path.parent.name, "val") for path in sorted((root / "val").glob("*/*"), reverse=True)]
    rows += [(path, "daisy", "val") for path in sorted((root / "daisies").iterdir())[12:]]
    with (root / "three.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "split"), *rows])
    cache = str(fresh_cache(root / "cache"))
    with pytest.MonkeyPatch.context() as patch:
        # A probe under 0.9 on validation times fine-tuning to advise it (~15 s a run); nothing here reads that.
        patch.setattr(importlib.import_module("transferkit.train"), "HARD_BELOW", 0.0)
        transferkit.train(root / "big", val=root / "val", test_percent=0, out=root / "A", cache_dir=cache, **FAST)
        transferkit.train(root / "small", val=root / "val", test_percent=0, out=root / "B", cache_dir=cache, **FAST)
        transferkit.train(root / "three.csv", out=root / "C", cache_dir=cache, **FAST)
        transferkit.train(root / "big", out=root / "D", cache_dir=cache, **FAST)
        transferkit.train(root / "big", val=root / "val", test_percent=0, multi_label=True, out=root / "M1",
                          cache_dir=cache, **FAST)
        transferkit.train(root / "three.csv", multi_label=True, out=root / "M2", cache_dir=cache, **FAST)
    return {"root": root, "cache": Path(cache), **{name: root / name for name in ("A", "B", "C", "D", "M1", "M2")}}


def _stored(run: Path, split: str = "val") -> dict[str, dict]:
    """A run's predictions.csv rows of `split`, by path."""
    with (run / "predictions.csv").open(newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle) if row["split"] == split}


def _exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar by hand: twice the binomial(b + c, 1/2) tail at the smaller count, at most 1."""
    n = b + c
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


class _Page(HTMLParser):
    """What the tests read from compare.html: each table's rows' data-path, the key numbers, the notes and the
    images (alt -> PNG bytes)."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[str]] = {}
        self.metrics: dict[str, str] = {}
        self.images: dict[str, bytes] = {}
        self.notes: list[str] = []
        self.classes: list[str] = []
        self._table: str | None = None
        self._in_note = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and "data-path" in attrs:
            self.tables[self._table].append(attrs["data-path"])
        elif tag == "tr" and "data-class" in attrs:
            self.classes.append(attrs["data-class"])
        if "data-metric" in attrs:
            self.metrics[attrs["data-metric"]] = attrs["data-value"]
        if tag == "img":
            self.images[attrs["alt"]] = base64.b64decode(attrs["src"].split(",", 1)[1])
        self._in_note = tag == "p" and attrs.get("class") == "note"
        if self._in_note:
            self.notes.append("")

    def handle_data(self, data):
        if self._in_note:
            self.notes[-1] += data

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        if tag == "p":
            self._in_note = False


def _tiles(png: bytes, count: int) -> list[np.ndarray]:
    """The `count` picture tiles of an image grid (plots.plot_label_grid's layout)."""
    grid = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    rows = math.ceil(count / COLUMNS)
    assert grid.shape[:2] == (rows * (TILE + GRID_CAPTION + GRID_GAP) + GRID_GAP,
                              COLUMNS * (TILE + GRID_GAP) + GRID_GAP)
    tiles = []
    for index in range(count):
        row, column = divmod(index, COLUMNS)
        left, top = GRID_GAP + column * (TILE + GRID_GAP), GRID_GAP + row * (TILE + GRID_CAPTION + GRID_GAP)
        tiles.append(grid[top + GRID_CAPTION:top + GRID_CAPTION + TILE, left:left + TILE])
    return tiles


def _discordant(a: dict[str, dict], b: dict[str, dict]) -> tuple[list[str], list[str]]:
    """The paths A gets right and B wrong, and the reverse, each ordered as the page must order them: by the wrong
    run's probability of its wrong answer, highest first (ties in A's order)."""
    right = {run: {p for p, row in rows.items() if row["label"] == row["predicted"]} for run, rows in (("a", a),
                                                                                                     ("b", b))}
    order = list(a)
    a_only = [p for p in order if p in right["a"] and p not in right["b"]]
    b_only = [p for p in order if p in right["b"] and p not in right["a"]]
    return (sorted(a_only, key=lambda p: -float(b[p]["probability"])),
            sorted(b_only, key=lambda p: -float(a[p]["probability"])))


def test_numbers_come_from_the_two_runs_predictions(runs, tmp_path):
    a, b = _stored(runs["A"]), _stored(runs["B"])
    assert set(a) == set(b) and len(a) == 60  # the same validation images, matched by path
    a_only, b_only = _discordant(a, b)
    assert a_only and b_only, "the runs must disagree both ways for this test to mean anything"

    result = transferkit.compare(runs["A"], runs["B"], out=tmp_path / "cmp")
    assert isinstance(result, Comparison) and result.page == tmp_path / "cmp" / "compare.html"
    assert result.n == 60 and "val split" in result.scored
    assert result.correct_a == sum(r["label"] == r["predicted"] for r in a.values())
    assert result.correct_b == sum(r["label"] == r["predicted"] for r in b.values())
    assert [d.path for d in result.a_only] == a_only and [d.path for d in result.b_only] == b_only
    assert result.p_value == pytest.approx(_exact_mcnemar(len(a_only), len(b_only)), rel=1e-12)
    assert result.significant == (result.p_value < 0.05)
    for row in result.per_class:
        paths = [p for p, r in a.items() if r["label"] == row.name]
        assert row.support == len(paths) == 30
        assert row.accuracy_a == pytest.approx(np.mean([a[p]["predicted"] == row.name for p in paths]))
        assert row.accuracy_b == pytest.approx(np.mean([b[p]["predicted"] == row.name for p in paths]))
        assert row.difference == pytest.approx(row.accuracy_b - row.accuracy_a)
    assert [row.name for row in result.per_class] == ["ants", "bees"] and not result.notes

    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["mcnemar"]["p_value"] == result.p_value and saved["n"] == 60
    assert saved["mcnemar"]["a_right_b_wrong"] == len(a_only) and saved["mcnemar"]["b_right_a_wrong"] == len(b_only)
    assert saved["mcnemar"]["both_right"] + saved["mcnemar"]["both_wrong"] + len(a_only) + len(b_only) == 60
    assert [d["path"] for d in saved["b_right_a_wrong"]] == b_only
    assert saved["per_class"][0]["accuracy_a"] == result.per_class[0].accuracy_a


def test_page_shows_exactly_the_discordant_images(runs, tmp_path):
    a, b = _stored(runs["A"]), _stored(runs["B"])
    a_only, b_only = _discordant(a, b)
    result = transferkit.compare(runs["A"], runs["B"], out=tmp_path / "cmp")
    page = _Page(result.page.read_text(encoding="utf-8"))
    assert page.tables["a-right-b-wrong"] == a_only and page.tables["b-right-a-wrong"] == b_only
    assert page.classes == ["ants", "bees"]
    assert float(page.metrics["p_value"]) == pytest.approx(_exact_mcnemar(len(a_only), len(b_only)))
    assert int(page.metrics["a_right_b_wrong"]) == len(a_only) and int(page.metrics["b_right_a_wrong"]) == len(b_only)
    assert float(page.metrics["accuracy_a"]) == pytest.approx(result.correct_a / 60)
    preprocessing = Preprocessing.from_dict(read_run_config(runs["A"])["preprocessing"])
    for title, paths in (("A right, B wrong", a_only), ("B right, A wrong", b_only)):
        shown = paths[:GRID_IMAGES]
        for tile, path in zip(_tiles(page.images[title], len(shown)), shown):
            thumbnail = _view(path, preprocessing)  # 96 px: pasted unscaled in the middle of its 200 px tile
            offset = (TILE - thumbnail.shape[0]) // 2
            assert np.array_equal(tile[offset:offset + thumbnail.shape[0], offset:offset + thumbnail.shape[1]],
                                  thumbnail), path
    assert Image.open(io.BytesIO(page.images["Accuracy per class"])).width > 300
    assert sorted(p.name for p in (tmp_path / "cmp" / "compare_files").iterdir()) == [
        "a_right_b_wrong.png", "b_right_a_wrong.png", "class_accuracy.png"]


def test_data_option_scores_both_runs_afresh_with_the_same_answers(runs, tmp_path):
    """Scored again on the validation folder through the cache, the runs answer as training recorded."""
    stored = transferkit.compare(runs["A"], runs["B"], out=tmp_path / "stored")
    fresh = transferkit.compare(runs["A"], runs["B"], data=runs["root"] / "val", out=tmp_path / "fresh",
                                cache_dir=runs["cache"], progress=False)
    assert "all 60 images" in fresh.scored
    assert fresh.n == stored.n and fresh.p_value == pytest.approx(stored.p_value)
    assert [d.path for d in fresh.a_only] == [d.path for d in stored.a_only]
    assert [d.path for d in fresh.b_only] == [d.path for d in stored.b_only]


def test_runs_with_different_classes_compare_the_shared_ones_and_say_so(runs, tmp_path, caplog):
    a, c = _stored(runs["A"]), _stored(runs["C"])
    daisies = [p for p, row in c.items() if row["label"] == "daisy"]
    assert len(daisies) == 8
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        result = transferkit.compare(runs["A"], runs["C"], out=tmp_path / "cmp")
    assert result.classes == ["ants", "bees"] and result.only_b == ["daisy"] and not result.only_a
    assert result.n == 60 and {d.path for d in result.a_only + result.b_only} <= set(a)
    right_c = sum(c[p]["label"] == c[p]["predicted"] for p in a)
    assert result.correct_b == right_c  # on the shared images only: C's daisies do not count
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "8 images of daisy" in warnings[0] and str(runs["C"]) in warnings[0]
    assert warnings[0] in _Page(result.page.read_text(encoding="utf-8")).notes

    # Scoring a folder with daisies: A cannot judge them, so both leave them out, and say so.
    folder = tmp_path / "mixed"
    _link(runs["root"] / "val" / "ants", folder / "ants", 5)
    _link(runs["root"] / "daisies", folder / "daisy", 3, skip=12)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        scored = transferkit.compare(runs["A"], runs["C"], data=folder, out=tmp_path / "mixed-cmp",
                                     cache_dir=runs["cache"], progress=False)
    assert scored.n == 5 and [row.support for row in scored.per_class] == [5, 0]
    assert "3 images of daisy" in caplog.records[-1].getMessage()


def test_cli_prints_the_table_and_writes_the_page(runs, tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(app, ["compare", str(runs["A"]), str(runs["B"]), "--out", str(out), "--split", "val"])
    assert result.exit_code == 0, result.output
    expected = transferkit.compare(runs["A"], runs["B"], out=tmp_path / "api")
    for row in expected.per_class:
        line = next(line for line in result.stdout.splitlines() if f" {row.name} " in line)
        assert f"{row.accuracy_a:.3f}" in line and f"{row.accuracy_b:.3f}" in line
        assert f"{100 * row.difference:+.1f} pt" in line
    assert f"p = {expected.p_value:.3g}" in result.stdout
    assert f"A right, B wrong: {len(expected.a_only)}; B right, A wrong: {len(expected.b_only)}" in result.stdout
    assert str(out / "compare.html") in result.stdout and (out / "compare.json").is_file()

    as_json = runner.invoke(app, ["compare", str(runs["A"]), str(runs["B"]), "--out", str(out), "--json",
                                  "--data", str(runs["root"] / "val"), "--cache-dir", str(runs["cache"]),
                                  "--no-cache", "--engine", "onnxruntime", "--device", "cpu"])
    assert as_json.exit_code == 0, as_json.output
    numbers = json.loads(as_json.stdout)
    assert numbers["mcnemar"]["p_value"] == pytest.approx(expected.p_value) and numbers["n"] == 60

    default = runner.invoke(app, ["compare", str(runs["A"]), str(runs["B"])])
    assert default.exit_code == 0, default.output
    assert (runs["root"] / "compare" / "A-vs-B" / "compare.html").is_file()


@pytest.mark.parametrize("arguments, message", [
    (["{A}", "{root}/missing"], "is not a run folder"),
    (["{A}", "{D}"], "share no evaluated images; pass --data DATA"),
    (["{A}", "{B}", "--split", "train"], "pass --data DATA to score both runs on DATA's train split"),
    (["{A}", "{B}", "--data", "{root}/missing"], "missing"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(runs, arguments, message):
    names = {key: str(value) for key, value in runs.items()}
    result = runner.invoke(app, ["compare", *(argument.format(**names) for argument in arguments)])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert message in result.stderr


def test_mcnemar_p_is_the_exact_binomial_test():
    for b, c in ((0, 0), (5, 0), (0, 6), (3, 9), (20, 11), (40, 40), (1, 60)):
        assert mcnemar_p(b, c) == pytest.approx(_exact_mcnemar(b, c), rel=1e-9)
        assert mcnemar_p(b, c) == pytest.approx(mcnemar_p(c, b), rel=1e-12)


def _label_sets(run: Path, split: str, labels: set[str]) -> dict[str, tuple[set[str], set[str]]]:
    """A multi-label run's (true labels, given labels) by path from its predictions.csv, within `labels`."""
    return {path: (set(row["labels"].split("|")) & labels, set(row["predicted"].split("|")) & labels)
            for path, row in _stored(run, split).items()}


def _check_label_sets(result: Comparison, one: dict, two: dict) -> None:
    """The comparison's counts, p-value and per-label accuracies against the runs' label sets, worked out here."""
    shared = [path for path in one if path in two]
    right = [{path for path in shared if sets[path][0] == sets[path][1]} for sets in (one, two)]
    assert result.multi_label and result.n == len(shared)
    assert (result.correct_a, result.correct_b) == (len(right[0]), len(right[1]))
    discordant = len(right[0] - right[1]), len(right[1] - right[0])
    assert (len(result.a_only), len(result.b_only)) == discordant
    assert {d.path for d in result.a_only} == right[0] - right[1]
    assert result.p_value == pytest.approx(_exact_mcnemar(*discordant), rel=1e-12)
    for row in result.per_class:
        for sets, accuracy in ((one, row.accuracy_a), (two, row.accuracy_b)):
            decided = [(row.name in sets[p][0]) == (row.name in sets[p][1]) for p in shared]
            assert accuracy == pytest.approx(np.mean(decided))
        assert row.support == sum(row.name in one[p][0] for p in shared)


def test_multi_label_runs_with_different_labels_compare_shared_label_sets(runs, tmp_path, caplog):
    """An image is right when its label set over the shared labels is; per label, the share of images whose decision
    on it is right. M2's daisies are not in M1's validation split, so they are not compared either."""
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        result = transferkit.compare(runs["M1"], runs["M2"], out=tmp_path / "cmp")
    shared = {"ants", "bees"}
    _check_label_sets(result, _label_sets(runs["M1"], "val", shared), _label_sets(runs["M2"], "val", shared))
    assert result.n == 60 and result.classes == ["ants", "bees"] and result.only_b == ["daisy"]
    warning = caplog.records[-1].getMessage()
    assert "different labels" in warning and "daisy" in warning and "68" in warning  # M2 scored 60 + 8 daisies
    with pytest.raises(transferkit.DataError, match="multi-label run"):
        transferkit.compare(runs["A"], runs["M1"], out=tmp_path / "mixed")


def test_verdict_names_the_better_run_only_when_more_than_chance():
    one = Disagreement("x.jpg", "ants", "ants 0.9", "bees 0.8")

    def verdict(a_only: int, b_only: int) -> Comparison:
        return Comparison(Path("runs/x"), Path("runs/y"), ("x", "y"), "test", False, 100, 80, 80, [one] * a_only,
                          [one] * b_only, mcnemar_p(a_only, b_only), [])

    assert verdict(1, 11).significant and verdict(1, 11).verdict.startswith("y is more accurate than x")
    assert verdict(9, 0).verdict.startswith("x is more accurate than y")
    assert "could be chance" in verdict(9, 5).verdict and "no outcome" not in verdict(9, 5).verdict
    assert "With only 4 images on which they disagree, no outcome could be significant" in verdict(4, 0).verdict
    assert "exactly the same images" in verdict(0, 0).verdict and verdict(0, 0).p_value == 1.0


@pytest.mark.slow
def test_multi_label_runs_compare_exact_label_sets(mosaic_run, mosaics, tmp_path):
    """Two multi-label runs: an image counts as right when its whole label set is, per class the share of images
    whose decision on that label is right."""
    other = transferkit.train(mosaics, out=tmp_path / "mlp", head="mlp", report=False, doctor=False, progress=False,
                              cache_dir=str(fresh_cache(tmp_path / "cache"))).run_dir
    result = transferkit.compare(mosaic_run, other, out=tmp_path / "cmp")
    split = "test" if _stored(mosaic_run, "test") else "val"
    labels = set(read_run_config(mosaic_run)["labels"])
    _check_label_sets(result, _label_sets(mosaic_run, split, labels), _label_sets(other, split, labels))
