"""Runs on record in trackers: a real MLflow server on loopback (read back through MLflow's client, the logged model
loaded and asked), W&B's offline files read back, TensorBoard's event files read back."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import transferkit
from transferkit import tracking
from transferkit.cli import app
from transferkit.errors import DataError

mlflow = pytest.importorskip("mlflow")


def _history(run: Path) -> list[dict]:
    with (run / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


def _train(data, tmp_path, cache_dir, name="run", **options):
    return transferkit.train(data, out=tmp_path / name, cache_dir=str(cache_dir), progress=False, doctor=False,
                             **options)


def _mlflow_run(experiment: str, run_name: str):
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    (run,) = client.search_runs([found.experiment_id], f"attributes.run_name = '{run_name}'")
    return client, run


def _series(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artefacts(client, run_id: str, path: str = "") -> set[str]:
    names = set()
    for entry in client.list_artifacts(run_id, path):
        names |= _artefacts(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return names


def test_mlflow_gets_parameters_epochs_metrics_the_run_folder_and_a_model_that_loads(split_folder, tmp_path,
                                                                                  cache_dir, mlflow_uri):
    result = _train(split_folder, tmp_path, cache_dir, "shapes-run", track=["mlflow"], experiment="shapes")
    client, logged = _mlflow_run("shapes", "shapes-run")
    assert logged.info.status == "FINISHED"
    params = logged.data.params
    assert params["mode"] == "probe" and params["optimizer"] == "lbfgs" and params["backbone"] == "efficientnet_lite0"
    assert params["data"] == str(split_folder)
    # every epoch of history.csv, at its step, with its value
    rows = _history(result.run_dir)
    assert len(rows) > 1
    for key in ("train_loss", "val_accuracy"):
        steps, values = zip(*_series(client, logged.info.run_id, key))
        assert steps == tuple(range(1, len(rows) + 1))
        assert values == pytest.approx([float(row[key]) for row in rows])
    # the final metrics are metrics.json's
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert logged.data.metrics["final/val_accuracy"] == pytest.approx(metrics["val"]["accuracy"])
    assert logged.data.metrics["final/val_ece"] == pytest.approx(metrics["val"]["ece"])
    # the run folder, report included, byte for byte
    artefacts = _artefacts(client, logged.info.run_id)
    assert {"run/report.html", "run/metrics.json", "run/config.json", "run/model.safetensors"} <= artefacts
    copy = Path(client.download_artifacts(logged.info.run_id, "run/metrics.json", str(tmp_path / "copy")))
    assert copy.read_bytes() == (result.run_dir / "metrics.json").read_bytes()
    # the model: MLflow loads it and it answers as the run does
    (model,) = mlflow.search_logged_models(experiment_ids=[logged.info.experiment_id], output_format="list",
                                           filter_string=f"source_run_id = '{logged.info.run_id}'")
    loaded = mlflow.pyfunc.load_model(model.model_uri)
    images = sorted(str(p) for p in (split_folder / "val").rglob("*") if p.is_file())[:6]
    assert images
    answers = loaded.predict(__import__("pandas").DataFrame({"image": images}))
    expected = transferkit.Classifier.load(result.run_dir).predict(images)
    assert list(answers["label"]) == [p.label for p in expected]
    assert np.allclose(answers["probability"], [p.probability for p in expected], atol=1e-5)
    assert list(answers["input"]) == images


def test_mlflow_experiment_from_the_environment(image_folder, tmp_path, cache_dir, mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-environment")
    _train(image_folder, tmp_path, cache_dir, "env-run", track="mlflow", report=False)
    _, logged = _mlflow_run("from-environment", "env-run")
    assert logged.data.metrics["final/val_accuracy"] > 0.5


def test_a_server_down_mid_run_costs_a_warning_and_nothing_is_lost(split_folder, tmp_path, cache_dir, monkeypatch,
                                                                   mlflow_uri, caplog):
    from mlflow_server import MlflowServer

    epochs = []
    with MlflowServer(tmp_path / "short-lived") as doomed:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", doomed.uri)
        logged_epoch = tracking.Trackers.epoch

        def epoch_then_server_down(self, row):  # the server goes down after the first epoch is logged
            logged_epoch(self, row)
            epochs.append(row)
            if len(epochs) == 1:
                for worker in self.workers.values():
                    worker.calls.join()  # that epoch reached the server
                doomed.stop()

        monkeypatch.setattr(tracking.Trackers, "epoch", epoch_then_server_down)
        with caplog.at_level(logging.WARNING, logger="transferkit"):
            result = _train(split_folder, tmp_path, cache_dir, "kept-run", track="mlflow", experiment="down")
    assert len(epochs) > 1 and result.val_accuracy is not None
    for name in ("config.json", "metrics.json", "model.safetensors", "report.html", "history.csv"):
        assert (result.run_dir / name).is_file(), name
    warnings = [r.getMessage() for r in caplog.records if r.name == "transferkit" and "mlflow" in r.getMessage()]
    assert len(warnings) == 1 and f"transferkit track {result.run_dir} --to mlflow" in warnings[0]
    # logged afterwards to a server that is up: the whole run is there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    outcome = CliRunner().invoke(app, ["track", str(result.run_dir), "--to", "mlflow", "--experiment", "afterwards"])
    assert outcome.exit_code == 0, outcome.output
    client, logged = _mlflow_run("afterwards", "kept-run")
    assert len(_series(client, logged.info.run_id, "train_loss")) == len(_history(result.run_dir))
    assert logged.data.metrics["final/val_accuracy"] == pytest.approx(result.metrics["val"]["accuracy"])
    assert "run/report.html" in _artefacts(client, logged.info.run_id)


def test_wandb_offline_run_holds_config_history_summary_pictures_and_the_run(split_folder, tmp_path, cache_dir,
                                                                           monkeypatch):
    wandb = pytest.importorskip("wandb")
    from wandb_records import read_offline_run

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = _train(split_folder, tmp_path, cache_dir, "wandb-run", track=["wandb"], experiment="shapes")
    wandb.teardown()  # W&B's service process buffers the offline file until it shuts down (as at the end of a CLI run)
    (folder,) = (tmp_path / "wandb-files" / "wandb").glob("offline-run-*")
    logged = read_offline_run(folder)
    assert logged.name == "wandb-run" and logged.project == "shapes" and logged.exit_code == 0
    assert logged.config["mode"] == "probe" and logged.config["data"] == str(split_folder)
    epochs = [row for row in logged.history if "val_accuracy" in row]
    assert [row["val_accuracy"] for row in epochs] == pytest.approx(
        [float(row["val_accuracy"]) for row in _history(result.run_dir)])
    assert logged.summary["final/val_accuracy"] == pytest.approx(result.metrics["val"]["accuracy"])
    pictures = {"/".join(key.split("/")[:2]) for row in logged.history for key in row if key.startswith("report/")}
    assert {"report/confusion", "report/curves"} <= pictures
    (files,) = logged.artifacts.values()
    assert {"report.html", "metrics.json", "model.safetensors"} <= set(files)


def test_tensorboard_scalars_are_the_history(split_folder, tmp_path, cache_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # image training (the fine-tuning loop reports its own epochs)
    result = _train(split_folder, tmp_path, cache_dir, mode="head", epochs=2, track=["tensorboard"], report=False)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    rows = _history(result.run_dir)
    assert [e.step for e in events.Scalars("val_accuracy")] == list(range(1, len(rows) + 1))
    assert [e.value for e in events.Scalars("val_accuracy")] == pytest.approx([float(r["val_accuracy"]) for r in rows])
    assert events.Scalars("final/val_accuracy")[0].value == pytest.approx(result.metrics["val"]["accuracy"])


def test_unknown_or_missing_trackers_are_one_line(image_folder, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown tracker 'neptune': choose from tensorboard, mlflow, wandb"):
        tracking.parse_trackers("mlflow,neptune")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    outcome = CliRunner().invoke(app, ["train", str(image_folder), "--out", str(tmp_path / "r"), "--track", "wandb"])
    assert outcome.exit_code == 2
    assert "--track wandb needs wandb: pip install 'transferkit[wandb]'" in outcome.output
    assert not (tmp_path / "r").exists()


def test_track_names_combine_and_the_old_tensorboard_flag_still_works():
    assert tracking.parse_trackers(["mlflow,wandb", "mlflow"]) == ("mlflow", "wandb")
    config = transferkit.TrainConfig(tensorboard=True, track=("mlflow",)).resolved()
    assert config.track == ("mlflow", "tensorboard")


def test_cli_train_with_two_trackers(split_folder, tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    outcome = CliRunner().invoke(app, ["train", str(split_folder), "--out", str(tmp_path / "shapes"), "--track",
                                       "mlflow,wandb", "--experiment", "cli-shapes", "--no-doctor", "--no-report",
                                       "--json"])
    assert outcome.exit_code == 0, outcome.output
    _, logged = _mlflow_run("cli-shapes", "shapes")
    assert logged.data.metrics["final/val_accuracy"] > 0.5
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")), outcome.output
    assert "logged to MLflow: http://127.0.0.1" in outcome.output and "wandb sync" in outcome.output
