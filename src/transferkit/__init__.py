"""transferkit: labelled photos -> pretrained backbone -> cached features -> trained head -> deployable classifier.

The names below are imported when first used (PEP 562), so `import transferkit` and `transferkit --version` or
`--help` do not pay PyTorch's import (~2 s); without PyTorch (a production install that only runs exported models)
the runtime names work and the others say what to install.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# name -> the module that defines it
_WHERE = {
    "download": "download", "download_url": "download",
    "BackboneError": "errors", "DataError": "errors", "DownloadError": "errors", "RunError": "errors",
    "StorageError": "errors", "TransferkitError": "errors",
    "ExportedClassifier": "runtime", "Prediction": "runtime",
    "EMBEDDED_BACKBONES": "backbone", "Backbone": "backbone", "open_backbone": "backbone",
    "Classifier": "classifier", "predict_imagenet": "classifier",
    "Dataset": "data", "load_dataset": "data",
    "Comparison": "compare", "compare": "compare",
    "EvaluationReport": "evaluate", "evaluate": "evaluate",
    "export_run": "export",
    "report": "report",
    "RunSummary": "runs", "list_runs": "runs",
    "ModelSummary": "summary", "list_backbones": "summary", "summarize": "summary",
    "TrainConfig": "train", "TrainResult": "train", "find_lr": "train", "resume": "train", "train": "train",
    "track_run": "tracking",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(f"transferkit.{_WHERE[name]}"), name)
    except ModuleNotFoundError as err:
        if err.name != "torch":
            raise
        raise ImportError(f"transferkit.{name} needs PyTorch, which this runtime-only install lacks: "
                          "pip install transferkit") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


class _Package(types.ModuleType):
    """Importing a submodule binds it on the package under its own name; where a function has that name
    (transferkit.train, .report, .evaluate, .download) the function keeps it, as an eager `from transferkit.train
    import train` here would have left it."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _WHERE.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
