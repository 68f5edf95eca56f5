"""The command line as a newcomer meets it (issue 17): brackets in names, choices in any case, consistent flags,
readable help, URLs / stdin / globs as inputs, `transferkit runs`, and what Ctrl-C says."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import http.server
import inspect
import json
import threading

import pytest
import typer
from typer.testing import CliRunner

import transferkit
from conftest import CLASS_STYLES, make_image_folder
from transferkit.cli import app
from transferkit.config import TrainConfig
from transferkit.errors import BackboneError, DataError

runner = CliRunner()
CLASSES = {"[old] cat": CLASS_STYLES["circles"], "dog": CLASS_STYLES["squares"]}
COMMANDS = [c.name or c.callback.__name__ for c in app.registered_commands]


@pytest.fixture(scope="module")
def bracketed(tmp_path_factory):
    """A probe run on classes `[old] cat` and `dog`, written to a folder named `[exp1]`."""
    root = tmp_path_factory.mktemp("newcomer")
    data = make_image_folder(root / "data", per_class=10, classes=CLASSES)
    run = root / "runs" / "[exp1]"
    cache = root / "cache"  # a plain folder: the test of --cache-dir checks that the ONNX export lands in it
    result = runner.invoke(app, ["train", str(data), "--out", str(run), "--cache-dir", str(cache),
                                 "--no-report", "--no-doctor", "--val-percent", "30", "--test-percent", "0"])
    assert result.exit_code == 0, result.output
    return run, data, result.stdout


# ---------------------------------------------------------------------------------------------- item 4: brackets


def test_brackets_in_paths_and_class_names_are_printed(bracketed):
    run, data, printed = bracketed
    assert f"Run written to {run}" in " ".join(printed.split())
    table = runner.invoke(app, ["evaluate", str(run), str(data), "--split", "all"])
    assert table.exit_code == 0, table.output
    assert "[old] cat" in table.stdout and table.stdout.count("[old] cat") >= 3  # per class, both matrix axes
    image = next((data / "[old] cat").glob("*.jpg"))
    predicted = runner.invoke(app, ["predict", str(run), str(image), "--top-k", "1"])
    assert "[old] cat" in predicted.stdout and str(image.parent) in " ".join(predicted.stdout.split()), \
        predicted.stdout


def test_help_keeps_bracketed_defaults():
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout
    assert "[default: runs/<timestamp>]" in text and "[default: probe 100" in text
    assert "[256, 512]" in text


# ---------------------------------------------------------------------------------------------- item 12


def test_fp16_on_cpu_is_refused(image_folder, tmp_path):
    with pytest.raises(BackboneError, match="fp16 .*CUDA"):
        transferkit.train(image_folder, out=tmp_path / "py", precision="fp16", device="cpu", engine="torch")
    result = runner.invoke(app, ["train", str(image_folder), "--out", str(tmp_path / "cli"), "--precision", "fp16",
                                 "--device", "cpu"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "CUDA" in result.stderr, result.output
    assert not (tmp_path / "cli").exists() and not (tmp_path / "py").exists()


def test_zero_learning_rate_is_refused(image_folder, tmp_path):
    with pytest.raises(DataError, match="lr must be more than 0"):
        transferkit.train(image_folder, out=tmp_path / "run", lr=0)
    result = runner.invoke(app, ["train", str(image_folder), "--out", str(tmp_path / "run"), "--lr", "0"])
    assert result.exit_code == 2 and "more than 0" in result.stderr and result.stderr.count("\n") == 1


def test_choices_in_any_case(monkeypatch):
    config = TrainConfig(head="MLP", optimizer="SGD", mode="Probe", schedule="Cosine", balance="Weights",
                         monitor="VAL_ACCURACY", augment="Light", precision="FP32", engine="Torch").resolved()
    assert (config.head, config.optimizer, config.mode, config.schedule, config.balance, config.monitor,
            config.augment, config.precision, config.engine) == ("mlp", "sgd", "probe", "cosine", "weights",
                                                                "val_accuracy", "light", "fp32", "torch")
    seen = {}

    def fake_train(data, **options):
        seen.update(options)
        raise typer.Exit(0)

    monkeypatch.setattr(importlib.import_module("transferkit.train"), "train", fake_train)
    result = runner.invoke(app, ["train", ".", "--head", "MLP", "--optimizer", "SGD", "--precision", "BF16"])
    assert result.exit_code == 0, result.output
    assert (seen["head"], seen["optimizer"], seen["precision"]) == ("mlp", "sgd", "bf16")


# ---------------------------------------------------------------------------------------------- item 14


def test_predict_json_flag_and_report_no_cache(bracketed, monkeypatch):
    run, data, _ = bracketed
    image = next((data / "dog").glob("*.jpg"))
    rows = json.loads(runner.invoke(app, ["predict", str(run), str(image), "--json"]).stdout)
    assert rows[0]["predictions"][0]["label"] == "dog"
    seen = {}
    monkeypatch.setattr(importlib.import_module("transferkit.report"), "report",
                        lambda *args, **options: seen.update(options) or run / "report.html")
    assert runner.invoke(app, ["report", str(run), "--no-cache"]).exit_code == 0
    assert seen["use_cache"] is False


def test_cache_dir_holds_all_of_transferkits_cache(bracketed, tmp_path):
    run, _, _ = bracketed
    cache = run.parent.parent / "cache"  # the fixture's train --cache-dir
    assert list(cache.glob("*.sqlite")), "the features"
    if importlib.util.find_spec("onnxruntime"):
        assert not (cache / "onnx").is_symlink() and list(cache.glob("onnx/*/export.json")), "the ONNX backbone"
    assert runner.invoke(app, ["summary", str(run), "--cache-dir", str(tmp_path)]).exit_code == 0
    assert list(tmp_path.glob("summaries/*.json"))


def test_download_json(monkeypatch, tmp_path):
    from transferkit.download import Downloaded

    done = Downloaded("hymenoptera", tmp_path / "hymenoptera", tmp_path / "hymenoptera" / "data", fetched=True)
    monkeypatch.setattr(importlib.import_module("transferkit.download"), "download", lambda name, **options: done)
    result = runner.invoke(app, ["download", "hymenoptera", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"name": "hymenoptera", "folder": str(done.folder), "data": str(done.data),
                                         "fetched": True}


# ---------------------------------------------------------------------------------------------- item 15: help


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_an_example_and_short_help(command):
    text = runner.invoke(app, [command, "-h"], env={"COLUMNS": "80"}).stdout
    assert f"Example: transferkit {command}" in " ".join(text.split()), text
    assert not any(kind in text for kind in ("<bool>", "<str>", "<list[str]>", "TEXT", "BOOLEAN"))
    assert "…" not in text  # nothing cut off at 80 columns


def test_every_option_has_help_text_and_choices_are_listed():
    for registered in app.registered_commands:
        for name, parameter in inspect.signature(inspect.unwrap(registered.callback)).parameters.items():
            info = parameter.default
            if isinstance(info, (typer.models.OptionInfo, typer.models.ArgumentInfo)):
                assert info.help, f"{registered.callback.__name__} {name} has no help text"
    text = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "80"}).stdout.split())
    wide = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout  # long lists wrap at 80
    for choices in ("linear|mlp", "lbfgs|adamw|adam|sgd|rmsprop", "auto|fp32|bf16|fp16"):
        assert choices in wide
    for panel in ("Data", "Model", "Training", "Fine-tuning", "Output", "Speed"):
        assert f"─ {panel} " in text


def test_version_and_one_line_usage_errors():
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.strip() == f"transferkit {transferkit.__version__}"
    for args in (["predict", "x", "--bogus"], ["evaluate"], ["train", ".", "--head", "tree"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: ") and "-h" in result.stderr


# ---------------------------------------------------------------------------------------------- item 21


@pytest.fixture
def web(tmp_path):
    """A local HTTP server over tmp_path/www (no internet)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_predict_a_url(bracketed, web, monkeypatch):
    run, data, _ = bracketed
    folder, url = web
    (folder / "dog.jpg").write_bytes(next((data / "dog").glob("*.jpg")).read_bytes())
    classifier = transferkit.Classifier.load(run)
    good, missing = classifier.predict([f"{url}/dog.jpg", f"{url}/nothing.jpg"])
    assert good.label == "dog" and good.source == f"{url}/dog.jpg"
    assert missing.error.startswith("cannot download") and "404" in missing.error
    monkeypatch.setattr(importlib.import_module("transferkit.data"), "URL_MAX_BYTES", 100)
    [too_big] = classifier.predict(f"{url}/dog.jpg")
    assert "larger than" in too_big.error
    monkeypatch.undo()
    result = runner.invoke(app, ["predict", str(run), f"{url}/dog.jpg", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["predictions"][0]["label"] == "dog"


def test_predict_stdin_and_quoted_globs(bracketed):
    run, data, _ = bracketed
    image = next((data / "dog").glob("*.jpg"))
    result = runner.invoke(app, ["predict", str(run), "-", "--json"], input=image.read_bytes())
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["input"] == "-" and row["predictions"][0]["label"] == "dog"
    globbed = runner.invoke(app, ["predict", str(run), str(data / "dog" / "*.jpg"), "--json"])
    assert globbed.exit_code == 0, globbed.output
    assert len(json.loads(globbed.stdout)) == 10
    nothing = runner.invoke(app, ["predict", str(run), str(data / "dog" / "*.png")])
    assert nothing.exit_code == 2 and "no image files" in nothing.stderr


def test_runs_lists_runs(bracketed):
    run, _, _ = bracketed
    [listed] = transferkit.list_runs(run.parent)
    assert listed.path == run and listed.mode == "probe" and listed.backbone == "efficientnet_lite0"
    assert 0.0 <= listed.accuracy <= 1.0 and "[old] cat" not in listed.options
    rows = json.loads(runner.invoke(app, ["runs", str(run.parent), "--json"]).stdout)
    assert rows[0]["path"] == str(run) and rows[0]["mode"] == "probe"
    table = " ".join(runner.invoke(app, ["runs", str(run.parent)]).stdout.split())
    assert "[exp1]" in table and "probe" in table and "efficientnet_lite0" in table
    empty = runner.invoke(app, ["runs", str(run.parent.parent / "nothing-here")])
    assert empty.exit_code == 2 and "no runs" in empty.stderr


def test_ctrl_c_hint_names_the_run_only_where_resume_applies(monkeypatch, tmp_path):
    from transferkit.errors import TrainingInterrupted

    def interrupted_training(data, **options):
        raise TrainingInterrupted(tmp_path / "runs" / "x")

    monkeypatch.setattr(importlib.import_module("transferkit.train"), "train", interrupted_training)
    result = runner.invoke(app, ["train", "."])
    assert result.exit_code == 130 and f"--resume {tmp_path / 'runs' / 'x'}" in result.stderr

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("transferkit.evaluate"), "evaluate", interrupted)
    result = runner.invoke(app, ["evaluate", "run", "."])
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted."


def test_an_interrupted_run_with_a_checkpoint_names_its_folder(tmp_path):
    from transferkit.errors import TrainingInterrupted
    from transferkit.runs import CHECKPOINT, StagedRun

    with pytest.raises(TrainingInterrupted) as caught:
        with StagedRun(tmp_path / "run") as staged:
            staged.write_text(CHECKPOINT, "saved")
            raise KeyboardInterrupt
    assert caught.value.run == tmp_path / "run"
    with pytest.raises(KeyboardInterrupt) as plain, StagedRun(tmp_path / "probe"):
        raise KeyboardInterrupt
    assert not isinstance(plain.value, TrainingInterrupted)
