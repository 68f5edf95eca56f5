"""Run folders as a newcomer meets them (issue 17): used from another directory or after a move, damaged files,
two runs started in the same second, an interrupted run given to the commands that read runs."""

from __future__ import annotations

import csv
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

import transferkit
from conftest import fresh_cache, make_image_folder
from transferkit import runs
from transferkit.cli import app
from transferkit.evaluate import PREDICTIONS_FILE, read_predictions
from transferkit.runs import CHECKPOINT, StagedRun, read_run_config, staging_dir

runner = CliRunner()


def _train_here(folder: Path, cache: Path, **options) -> transferkit.TrainResult:
    return transferkit.train(folder, cache_dir=str(cache), progress=False, report=False, doctor=False, **options)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A project folder with data/ and a run trained from inside it with relative paths, as a newcomer does."""
    root = tmp_path_factory.mktemp("project")
    make_image_folder(root / "data", per_class=10)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        _train_here(Path("data"), fresh_cache(root / "cache"), out="run")
    return root


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def _prediction_paths(run: Path) -> list[str]:
    with (run / PREDICTIONS_FILE).open(newline="", encoding="utf-8") as handle:
        return [row["path"] for row in csv.DictReader(handle)]


def _one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: "), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


# ------------------------------------------------------------------ 5: a run works from anywhere, moved or not


def test_a_run_stores_absolute_paths_and_reports_from_another_directory(workspace, tmp_path, elsewhere):
    run = tmp_path / "moved-run"
    shutil.copytree(workspace / "run", run)  # a run folder moved elsewhere: its data did not move
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["source"] == str(workspace / "data")
    paths = _prediction_paths(run)
    assert paths and all(Path(p).is_absolute() and Path(p).is_file() for p in paths)

    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "missing" not in result.stderr and "not shown" not in (run / "report.html").read_text()


def test_old_runs_with_relative_paths_are_still_read(workspace, tmp_path, elsewhere):
    """Runs from before paths were stored absolute hold them relative to the folder training ran in."""
    project = tmp_path / "project"
    shutil.copytree(workspace / "data", project / "data")
    run = project / "runs" / "old"
    shutil.copytree(workspace / "run", run)
    config = json.loads((run / "config.json").read_text())
    config["data"]["source"] = "data"
    (run / "config.json").write_text(json.dumps(config))
    text = (run / PREDICTIONS_FILE).read_text().replace(str(workspace / "data"), "data")
    (run / PREDICTIONS_FILE).write_text(text)

    assert read_run_config(run)["data"]["source"] == str(project / "data")
    predictions = read_predictions(run / PREDICTIONS_FILE, config["labels"])
    paths = [p for part in predictions.values() for p in part.paths]
    assert paths and all(Path(p).is_file() and Path(p).is_relative_to(project / "data") for p in paths)


def test_images_really_gone_are_named_in_one_warning(workspace, tmp_path, elsewhere):
    project = tmp_path / "project"
    shutil.copytree(workspace / "data", project / "data")
    result = _train_here(project / "data", workspace / "cache", out=project / "run")
    shutil.rmtree(project / "data")
    count = len(_prediction_paths(result.run_dir))

    reported = runner.invoke(app, ["report", str(result.run_dir)])
    assert reported.exit_code == 0, reported.output
    warnings = [line for line in reported.stderr.splitlines() if "missing" in line]
    assert len(warnings) == 1, reported.stderr
    assert warnings[0].startswith("warning: ") and f"{count} of {count} images" in warnings[0]
    assert str(project / "data") in warnings[0]


# ------------------------------------------------------------------ 6: a damaged run is one line, naming the file


def _truncate_model(run: Path) -> str:
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    return "model.safetensors"


def _model_missing_a_tensor(run: Path) -> str:
    state = safetensors.torch.load_file(str(run / "model.safetensors"))
    state.pop(next(k for k in state if k.endswith("weight")))
    safetensors.torch.save_file(state, str(run / "model.safetensors"))
    return "model.safetensors"


def _garbage_config(run: Path) -> str:
    (run / "config.json").write_bytes(b"\x00\xff garbage {")
    return "config.json"


def _config_without_head(run: Path) -> str:
    config = json.loads((run / "config.json").read_text())
    del config["head"]
    (run / "config.json").write_text(json.dumps(config))
    return "config.json"


def _config_without_input_size(run: Path) -> str:
    config = json.loads((run / "config.json").read_text())
    del config["preprocessing"]["input_size"]
    (run / "config.json").write_text(json.dumps(config))
    return "config.json"


DAMAGES = [_truncate_model, _model_missing_a_tensor, _garbage_config, _config_without_head,
           _config_without_input_size]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda damage: damage.__name__.strip("_"))
@pytest.mark.parametrize("command", ["predict", "evaluate", "report", "summary", "export"])
def test_a_damaged_run_is_one_line_naming_the_file(command, damage, workspace, tmp_path, elsewhere):
    run = tmp_path / "run"
    shutil.copytree(workspace / "run", run)
    damaged = damage(run)
    image = next((workspace / "data" / "circles").iterdir())
    args = {"predict": [str(run), str(image)], "evaluate": [str(run), str(workspace / "data")],
            "report": [str(run)], "summary": [str(run)], "export": [str(run), "--format", "torchscript"]}[command]
    result = runner.invoke(app, [command, *args])
    _one_line_error(result, f"{run / damaged} is damaged", "restore it")


# ------------------------------------------------------------------ 8: default run names are unique


class _SameSecond(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5)


def test_runs_started_in_the_same_second_get_their_own_folders(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "datetime", _SameSecond)
    first = Path("runs") / "20260102-030405"
    with StagedRun(first):  # another process, still writing the run that took this second's name
        result = _train_here(workspace / "data", workspace / "cache")
    assert result.run_dir == Path("runs") / "20260102-030405-2" and (result.run_dir / "config.json").is_file()
    again = _train_here(workspace / "data", workspace / "cache")
    assert again.run_dir == Path("runs") / "20260102-030405-3"


# ------------------------------------------------------------------ 10: an interrupted run says how to resume


@pytest.mark.parametrize("command", ["predict", "evaluate", "report", "summary", "export"])
def test_an_interrupted_run_says_it_is_unfinished_and_how_to_resume(command, workspace, tmp_path, elsewhere):
    run = tmp_path / "run"
    staging_dir(run).mkdir()
    torch.save({"arguments": {}}, staging_dir(run) / CHECKPOINT)
    image = next((workspace / "data" / "circles").iterdir())
    args = {"predict": [str(run), str(image)], "evaluate": [str(run), str(workspace / "data")],
            "report": [str(run)], "summary": [str(run)], "export": [str(run)]}[command]
    result = runner.invoke(app, [command, *args])
    _one_line_error(result, f"{run} is an unfinished run", f"transferkit train --resume {run}")
