"""A newcomer's data mistakes (issue 17): which images evaluate scores, CSV splits, delimiters and line numbers,
unreadable classes in the doctor and in training, and image folders laid out the wrong way."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import transferkit
from conftest import fresh_cache, make_image_folder
from transferkit.cli import app
from transferkit.data import load_dataset
from transferkit.doctor import diagnose
from transferkit.errors import DataError

FAST = dict(image_size=96, workers=2)
TWO = {"circles": ("ellipse", (220, 40, 40)), "squares": ("rectangle", (40, 60, 220))}


# ---------------------------------------------------------------------------------------------- item 1: evaluate


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """A probe run trained on a flat folder (hash-split into train/val/test), and a folder it never saw."""
    root = tmp_path_factory.mktemp("newcomer")
    own = make_image_folder(root / "own", per_class=12, seed=3)
    other = make_image_folder(root / "other", per_class=10, seed=4)
    cache = fresh_cache(root / "cache")
    result = transferkit.train(own, out=root / "run", cache_dir=str(cache), progress=False, report=False,
                               doctor=False, **FAST)
    return result.run_dir, own, other, cache


def test_evaluate_scores_a_folder_the_run_never_saw_whole(probe_run):
    run, _, other, cache = probe_run
    report = transferkit.evaluate(run, other, cache_dir=cache, progress=False)
    assert report.split == "all" and report.metrics["n"] == 30
    assert report.scored == f"all 30 images of {other} (not the run's training data)"


def test_evaluate_keeps_the_split_of_the_runs_own_data(probe_run, monkeypatch):
    run, own, _, cache = probe_run
    test_images = len(load_dataset(own).splits["test"])
    monkeypatch.chdir(own.parent)  # the same folder named another way is still the run's own data
    report = transferkit.evaluate(run, Path("own"), cache_dir=cache, progress=False)
    assert report.split == "test" and report.metrics["n"] == test_images
    assert "the run's test split" in report.scored


def test_evaluate_and_report_say_which_images_were_scored(probe_run, tmp_path):
    run, _, other, cache = probe_run
    runner = CliRunner()
    text = runner.invoke(app, ["evaluate", str(run), str(other), "--cache-dir", str(cache)])
    assert text.exit_code == 0, text.output
    assert "all 30 images of" in text.stdout and "not the run's training data" in text.stdout
    as_json = runner.invoke(app, ["evaluate", str(run), str(other), "--cache-dir", str(cache), "--json"])
    assert json.loads(as_json.stdout)["n"] == 30
    page = transferkit.report(run, data=other, out=tmp_path / "page.html", cache_dir=cache, progress=False)
    assert "n=30" in page.read_text() and "Scored all 30 images of" in page.read_text()


# ---------------------------------------------------------------------------------------------- items 2, 13: CSVs


def _csv(folder: Path, lines: list[str], name: str = "labels.csv") -> Path:
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rows(folder: Path, delimiter: str = ",") -> list[str]:
    return [f"{p.relative_to(folder)}{delimiter}{p.parent.name}" for p in sorted(folder.glob("*/*.jpg"))]


@pytest.mark.parametrize("value", ["tset", "x", "trainn"])
def test_unknown_csv_split_is_an_error_naming_value_and_line(image_folder, value):
    rows = [f"{row},train" for row in _rows(image_folder)]
    rows[2] = rows[2].rsplit(",", 1)[0] + f",{value}"
    csv_path = _csv(image_folder, ["path,label,split", *rows])
    with pytest.raises(DataError, match=rf"'{value}'.*line 4|line 4.*'{value}'"):
        load_dataset(csv_path)


def test_csv_split_accepts_the_folder_spellings_in_any_case(image_folder):
    spellings = {"train": ["Training", " TRAIN"], "val": ["valid", "Validation "], "test": ["Testing ", "TEST"]}
    rows, expected = [], {}
    for i, row in enumerate(_rows(image_folder)):
        split = ("train", "train", "val", "test")[i % 4]
        rows.append(f'{row},"{spellings[split][i // 4 % 2]}"')
        expected[row.split(",")[0]] = split
    dataset = load_dataset(_csv(image_folder, rows))
    found = {str(s.path.relative_to(image_folder)): name for name, samples in dataset.splits.items() for s in samples}
    assert found == expected


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_csv_delimiter_is_detected(image_folder, delimiter):
    csv_path = _csv(image_folder, [f"path{delimiter}label", *_rows(image_folder, delimiter)])
    dataset = load_dataset(csv_path, val_percent=0, test_percent=0)
    assert dataset.classes == ["circles", "squares", "stripes"] and len(dataset.splits["train"]) == 36


def test_swapped_csv_columns_are_named(image_folder):
    swapped = [f"{p.parent.name},{p.relative_to(image_folder)}" for p in sorted(image_folder.glob("*/*.jpg"))]
    with pytest.raises(DataError, match="label,path.*path,label"):
        load_dataset(_csv(image_folder, ["label,path", *swapped]))


def test_csv_problems_carry_real_file_line_numbers(image_folder):
    good = _rows(image_folder)
    lines = ["path,label",                        # line 1
             good[0],                             # 2
             "",                                  # 3
             f'"{good[1].split(",")[0]}","two',   # 4: a quoted label over two lines
             'lines"',                            # 5
             good[2],                             # 6
             "only_a_path.jpg",                   # 7: malformed
             "circles/gone.jpg,circles",          # 8: missing file
             *good[3:]]
    dataset = load_dataset(_csv(image_folder, lines), val_percent=0, test_percent=0)
    malformed = [s for s in dataset.skipped if "expected path,label" in s.reason]
    assert [s.path for s in malformed] == [f"{image_folder / 'labels.csv'}:7"]
    missing = [s for s in dataset.skipped if s.path.endswith("gone.jpg")]
    assert len(missing) == 1 and "line 8" in missing[0].reason and "not found" in missing[0].reason


# ---------------------------------------------------------------------------------------------- item 16: unreadable


@pytest.fixture
def unreadable_class(tmp_path: Path) -> Path:
    data = make_image_folder(tmp_path / "data", per_class=12, seed=5, classes=TWO)
    (data / "broken").mkdir()
    for i in range(3):
        (data / "broken" / f"b{i}.jpg").write_text("not a picture")
    return data


def test_doctor_counts_only_readable_images_and_names_a_class_without_any(unreadable_class):
    report = diagnose(unreadable_class, use_features=False)
    assert report.summary().startswith("doctor: 24 images in 3 classes")
    assert sum(report.counts[split].get("broken", 0) for split in report.counts) == 0
    empty = report.of_kind("no_images")
    assert [f.path for f in empty] == ["broken"] and "3 files" in empty[0].detail and "none" in empty[0].detail
    assert not [f for f in report.of_kind("few_images") if f.path == "broken"]
    assert not report.of_kind("duplicate")  # three copies of one unreadable file are unreadable, not duplicates


def test_training_lists_the_unreadable_files_before_saying_so(unreadable_class, tmp_path, caplog, cache_dir):
    with caplog.at_level(logging.WARNING, logger="transferkit"), pytest.raises(DataError, match="listed above"):
        transferkit.train(unreadable_class, out=tmp_path / "run", cache_dir=str(cache_dir), progress=False,
                          report=False, doctor=False, val_percent=0, test_percent=0, **FAST)
    listed = caplog.text
    for i in range(3):
        assert f"{unreadable_class / 'broken' / f'b{i}.jpg'}: not an image" in listed


# ---------------------------------------------------------------------------------------------- item 18: layouts


def test_loose_images_beside_class_folders_are_reported(image_folder, caplog):
    for i in range(3):
        Image.new("RGB", (16, 16), "red").save(image_folder / f"loose{i}.png")
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        load_dataset(image_folder)
    assert f"3 images directly in {image_folder} are not in a class subfolder and are ignored" in caplog.text


def test_a_folder_of_loose_images_says_they_need_class_subfolders(tmp_path):
    for i in range(4):
        Image.new("RGB", (16, 16), "red").save(tmp_path / f"photo{i}.png")
    with pytest.raises(DataError, match=r"one subfolder per class.*e\.g\.") as raised:
        load_dataset(tmp_path)
    assert "4 images" in str(raised.value) and "found 0 class" not in str(raised.value)


def test_a_parent_folder_with_one_class_suggests_the_folder_inside(tmp_path):
    make_image_folder(tmp_path / "data" / "flowers", per_class=3, classes=TWO)
    with pytest.raises(DataError, match=r"found 1 class, 'flowers'.*did you mean .*data/flowers\?"):
        load_dataset(tmp_path / "data")
    single = tmp_path / "single"
    make_image_folder(single, per_class=3, classes={"only": TWO["circles"]})
    with pytest.raises(DataError, match=r"found 1 class, 'only'.*at least 2") as raised:
        load_dataset(single)
    assert "did you mean" not in str(raised.value)
