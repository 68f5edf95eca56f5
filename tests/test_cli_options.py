"""Every option of every command reaches the Python function that does the work, with the value the user gave.

The command line is a thin layer: each command hands its options to one API function (train, evaluate, ...). Here
those functions are replaced by recorders, and every option the commands declare (read from the CLI itself, so an
option added later is checked too) is given a value other than its default. The test fails when that changes
nothing the API is asked to do, or when the value is not among the arguments the API receives. What each option
then does inside the API is checked by the behaviour tests (test_options.py and the others).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from transferkit.cli import app

class Reached(Exception):
    """Raised by a recorder: the command got as far as the API."""


class Result:
    """What a recorded API function returns: using any attribute of it records that and stops the command."""

    def __init__(self, name: str, calls: list):
        self._name, self._calls = name, calls

    def __getattr__(self, attribute: str):
        self._calls.append((f"{self._name}().{attribute}", (), {}))
        raise Reached(attribute)

    def __eq__(self, other) -> bool:
        return isinstance(other, Result) and other._name == self._name

    __hash__ = None


# module, function, what the recorder returns: "raise" stops at the call, "result" returns a Result, else the value.
ENTRY_POINTS = [
    ("transferkit.train", "train", "raise"), ("transferkit.train", "find_lr", "raise"),
    ("transferkit.train", "resume", "raise"), ("transferkit.distributed", "launch", "raise"),
    ("transferkit.evaluate", "evaluate", "result"),
    ("transferkit.classifier", "predict_imagenet", []), ("transferkit.export", "export_run", "result"),
    ("transferkit.serve", "serve", "raise"), ("transferkit.report", "report", "raise"),
    ("transferkit.summary", "list_backbones", []), ("transferkit.summary", "summarize", "result"),
    ("transferkit.doctor", "diagnose", "result"), ("transferkit.doctor", "write_html", "raise"),
    ("transferkit.download", "download", "raise"), ("transferkit.download", "download_url", "raise"),
    ("transferkit.demo", "run_demo", "raise"), ("transferkit.make_shards", "write_shards", "result"),
    ("transferkit.compare", "compare", "raise"), ("transferkit.tracking", "track_run", "raise"),
]

# The arguments each command is called with; an option that only means something with another gets that one too.
BASE = {"train": ["data"], "evaluate": ["run", "data"], "predict": ["run", "IMAGE"], "export": ["run"],
        "serve": ["model"], "report": ["run"], "models": [], "summary": ["target"], "doctor": ["data"],
        "download": ["hymenoptera"], "demo": [], "runs": [], "shard": ["data", "out"], "compare": ["run_a", "run_b"],
        "track": ["run", "--to", "mlflow"]}
CONTEXT = {("train", "--resume"): [], ("predict", "--backbone"): ["--imagenet", "IMAGE"],
           ("predict", "--weights"): ["--imagenet", "IMAGE"], ("download", "--sha256"): ["--url", "https://x/y.zip"]}
# Values the CLI itself checks or converts: (what is typed, what the API must receive).
VALUES = {("train", "--lr-steps"): ("3,5", (3, 5)), ("train", "--unfreeze-from"): ("blocks.5", "from:blocks.5"),
          ("train", "--time-limit"): ("5m", "5m"), ("predict", "--format"): ("json", None),
          ("export", "--format"): ("torchscript", "torchscript"), ("export", "--quantize"): ("int8", "int8")}
# Options that only shape what is printed; the tests named here parse that output.
PRINTING = {("train", "--json"): "test_cli.py::test_train_json_summary",
            ("evaluate", "--json"): "test_cli.py::test_evaluate_json",
            ("download", "--list"): "test_download.py::test_registry_and_cli",
            ("predict", "--json"): "test_newcomer_cli.py::test_predict_json_flag_and_report_no_cache",
            ("download", "--json"): "test_newcomer_cli.py::test_download_json",
            ("runs", "--json"): "test_newcomer_cli.py::test_runs_lists_runs",
            ("shard", "--json"): "test_shards.py::test_shard_then_train_on_the_shards_gives_the_folder_model",
            ("predict", "--ood-report"): "test_unknown.py::test_cli_predict_evaluate_and_report_say_unknown",
            ("compare", "--json"): "test_compare.py::test_cli_prints_the_table_and_writes_the_page"}


@dataclass(frozen=True)
class Option:
    command: str
    flag: str
    kind: type
    default: object
    upper: float | None

    def __str__(self) -> str:
        return f"{self.command} {self.flag}"


def _options() -> list[Option]:
    """Every option of every command, read from the command functions' typer declarations."""
    found = []
    for registered in app.registered_commands:
        function = inspect.unwrap(registered.callback)
        hints = typing.get_type_hints(function)
        for name, parameter in inspect.signature(function).parameters.items():
            declared = parameter.default
            if not isinstance(declared, typer.models.OptionInfo):
                continue
            kind = hints[name] if typing.get_origin(hints[name]) is typing.Literal else next(
                (t for t in typing.get_args(hints[name]) if t is not type(None)), hints[name])
            flag = declared.param_decls[0] if declared.param_decls else f"--{name.replace('_', '-')}"
            if kind is bool and declared.default and not declared.param_decls:
                flag = f"--no-{name.replace('_', '-')}"
            found.append(Option(registered.name or function.__name__, flag, kind, declared.default, declared.max))
    return found


def _typed_value(option: Option) -> str | None:
    """A value other than the default, within the option's range (a choice other than the default, in capitals: any
    case is accepted); None for a flag."""
    if typing.get_origin(option.kind) is typing.Literal:
        return next(choice for choice in typing.get_args(option.kind) if choice != option.default).upper()
    if option.kind is bool:
        return None
    if option.kind is int:
        value = (option.default or 0) + 13
    elif option.kind is float:
        value = 0.37
    else:
        return "other"
    return str(value if option.upper is None else min(value, option.upper))


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    calls: list[tuple] = []
    for module_name, function, returns in ENTRY_POINTS:
        def recorder(*args, _name=f"{module_name}.{function}", _returns=returns, **kwargs):
            calls.append((_name, args, kwargs))
            if _returns == "raise":
                raise Reached(_name)
            return Result(_name, calls) if _returns == "result" else _returns
        monkeypatch.setattr(importlib.import_module(module_name), function, recorder)

    classifier = importlib.import_module("transferkit.classifier").Classifier

    def load(source, **kwargs):
        calls.append(("Classifier.load", (source,), kwargs))
        return Loaded()

    class Loaded:
        def predict(self, *args, **kwargs):
            calls.append(("Classifier.predict", args, kwargs))
            return []

    monkeypatch.setattr(classifier, "load", load)
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8), "red").save(image)
    monkeypatch.chdir(tmp_path)

    def run(arguments: list[str]) -> tuple[tuple[list[tuple], str], object]:
        """What the API was asked to do, and what was printed."""
        del calls[:]
        result = CliRunner().invoke(app, [str(image) if a == "IMAGE" else a for a in arguments])
        return (list(calls), result.stdout), result

    return run


def _contains(value, wanted) -> bool:
    if isinstance(value, Result):
        return False
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return any(_contains(v, wanted) for v in value.values())
    if isinstance(value, (list, tuple)) and value != wanted:
        return any(_contains(v, wanted) for v in value)
    if isinstance(value, float) and isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
        return math.isclose(value, wanted)
    return value == wanted or (isinstance(value, (str, Path)) and str(value) == str(wanted))


@pytest.mark.parametrize("option", _options(), ids=str)
def test_option_reaches_the_api(option, recorded):
    command, flag = option.command, option.flag
    if (command, flag) in PRINTING:
        pytest.skip(f"{flag} only shapes the printed output; {PRINTING[command, flag]} checks it")
    context = CONTEXT.get((command, flag), BASE[command])
    typed, wanted = VALUES.get((command, flag), (_typed_value(option), None))
    if wanted is None and (command, flag) not in VALUES:
        wanted = typed.lower() if typing.get_origin(option.kind) is typing.Literal else typed  # as the API gets it
    before, _ = recorded([command, *context])
    after, result = recorded([command, *context, flag, *([] if typed is None else [typed])])
    assert after[0], f"{option} stopped before reaching the API: {result.output}"
    assert isinstance(result.exception, Reached) or result.exit_code in (0, 1), result.output
    assert after != before, f"{option} changed nothing the API was asked to do"
    if wanted is not None:
        assert any(_contains([args, kwargs], _number(wanted)) for _, args, kwargs in after[0]), (wanted, after)


def _number(text):
    """'50' -> 50, '0.37' -> 0.37: the value as the API receives a typed option."""
    if isinstance(text, str):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    return text
