"""The command line on synthetic data: train --json, predict formats, evaluate, and one-line errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import fresh_cache, make_image_folder
from transferkit.cli import app
from transferkit.features import resolve_device

runner = CliRunner()


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    """train/ + val/ of the synthetic shapes, shared by this module's tests (none of them changes it)."""
    root = tmp_path_factory.mktemp("cli") / "layout"
    make_image_folder(root / "train", per_class=12, seed=1)
    make_image_folder(root / "val", per_class=5, seed=2)
    return root


@pytest.fixture(scope="module")
def trained(layout, tmp_path_factory):
    run, cache = tmp_path_factory.mktemp("cli-run") / "run", fresh_cache(tmp_path_factory.mktemp("cli-cache"))
    result = runner.invoke(app, ["train", str(layout), "--out", str(run), "--cache-dir", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    return run, json.loads(result.stdout)


def test_train_json_summary(trained):
    run, summary = trained
    assert summary["run_dir"] == str(run) and summary["val_accuracy"] >= 0.9
    assert summary["images"] == {"train": 36, "val": 15} and summary["features_computed"] == 51


def test_predict_table_json_csv_and_unreadable_input(trained, layout, tmp_path):
    run, _ = trained
    image = next((layout / "val" / "stripes").glob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_text("no pixels here")
    as_json = runner.invoke(app, ["predict", str(run), str(image), str(broken), "--format", "json", "--top-k", "2"])
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)
    assert rows[0]["predictions"][0]["label"] == "stripes" and len(rows[0]["predictions"]) == 2
    assert rows[1]["error"].startswith("not an image")
    as_csv = runner.invoke(app, ["predict", str(run), str(layout / "val"), "--format", "csv", "--top-k", "1"])
    records = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(records) == 15 and sum(r["label"] == r["input"].split("/")[-2] for r in records) >= 14
    neutral = tmp_path / "photo.jpg"  # the label must come from the model, not from the file's path
    neutral.write_bytes(image.read_bytes())
    table = runner.invoke(app, ["predict", str(run), str(neutral)])
    assert table.exit_code == 0 and "stripes" in table.stdout
    only_bad = runner.invoke(app, ["predict", str(run), str(broken)])
    assert only_bad.exit_code == 1


def test_evaluate_json(trained, layout, tmp_path):
    run, summary = trained
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"round": ["circles"]}))
    result = runner.invoke(app, ["evaluate", str(run), str(layout), "--json", "--groups", str(groups)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["accuracy"] == pytest.approx(summary["val_accuracy"]) and metrics["groups"]["round"]["n"] == 5
    text = runner.invoke(app, ["evaluate", str(run), str(layout)])
    assert "confusion matrix" in text.stdout and "circles" in text.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "/no/such/folder"], "does not exist"),
    (["train", ".", "--backbone", "nonexistent_net_xyz"], "unknown backbone"),
    (["train", ".", "--time-limit", "soon"], "--time-limit"),
    (["train", ".", "--mode", "warp"], "'warp' is not one of 'auto', 'probe'"),
    (["evaluate", "/no/such/run", "."], "is not a run folder"),
    (["predict", "/no/such/run", "a/x.png"], "is not a run folder"),
    (["export", "/no/such/run"], "is not a run folder"),
    (["report", "/no/such/run"], "is not a run folder"),
    (["summary", "not_a_model_name"], "not_a_model_name"),
    (["doctor", "/no/such/folder"], "does not exist"),
    (["download", "no-such-set"], "no-such-set"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (16, 16), "white").save(tmp_path / name / "x.png")
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert message in result.stderr


def test_command_log_lines_reach_stderr(trained, layout, tmp_path):
    """What a command logs (here: a warning about unreadable inputs) is on its stderr, even where the root logger
    already has handlers (pytest's, a notebook's) and logging.basicConfig would do nothing."""
    run, _ = trained
    broken = tmp_path / "broken.jpg"
    broken.write_text("no pixels here")
    image = next((layout / "val" / "circles").glob("*.jpg"))
    result = runner.invoke(app, ["predict", str(run), str(image), str(broken)])
    assert result.exit_code == 0 and "warning: 1 of 2 inputs could not be read" in result.stderr


def test_engines_from_the_command_line(trained, layout, tmp_path):
    run, summary = trained
    assert json.loads((run / "config.json").read_text())["extractor"]["device"] == resolve_device("auto").type
    torch_run = runner.invoke(app, ["evaluate", str(run), str(layout), "--json", "--engine", "torch",
                                    "--no-cache"])
    assert torch_run.exit_code == 0, torch_run.output
    assert json.loads(torch_run.stdout)["accuracy"] == pytest.approx(summary["val_accuracy"], abs=0.07)
    onnx = runner.invoke(app, ["predict", str(run), str(layout / "val"), "--engine", "onnxruntime",
                               "--format", "json", "--top-k", "1"])
    assert onnx.exit_code == 0, onnx.output
    rows = json.loads(onnx.stdout)
    assert sum(r["predictions"][0]["label"] == r["input"].split("/")[-2] for r in rows) >= 14
    bad = runner.invoke(app, ["train", str(layout), "--engine", "tensorrt", "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "'tensorrt' is not one of 'auto', 'torch', 'onnxruntime'" in bad.output
