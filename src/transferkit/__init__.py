"""transferkit: labelled photos -> pretrained backbone -> cached features -> trained head -> deployable classifier."""

import importlib.util

__version__ = "0.1.0"

from transferkit.download import download, download_url  # noqa: E402
from transferkit.errors import (BackboneError, DataError, DownloadError, RunError, StorageError,  # noqa: E402
                                TransferkitError)
from transferkit.runtime import ExportedClassifier, Prediction  # noqa: E402

__all__ = ["BackboneError", "DataError", "DownloadError", "ExportedClassifier", "Prediction", "RunError",
           "StorageError", "TransferkitError", "download", "download_url"]

# Without PyTorch (a production install that only runs exported models) the package offers the runtime alone.
if importlib.util.find_spec("torch") is not None:
    from transferkit.backbone import EMBEDDED_BACKBONES, Backbone, open_backbone  # noqa: E402
    from transferkit.classifier import Classifier, predict_imagenet  # noqa: E402
    from transferkit.data import Dataset, load_dataset  # noqa: E402
    from transferkit.evaluate import EvaluationReport, evaluate  # noqa: E402
    from transferkit.export import export_run  # noqa: E402
    from transferkit.report import report  # noqa: E402
    from transferkit.runs import RunSummary, list_runs  # noqa: E402
    from transferkit.summary import ModelSummary, list_backbones, summarize  # noqa: E402
    from transferkit.train import TrainConfig, TrainResult, find_lr, resume, train  # noqa: E402

    __all__ += [
        "EMBEDDED_BACKBONES", "Backbone", "Classifier", "Dataset", "EvaluationReport", "ModelSummary", "TrainConfig",
        "TrainResult", "evaluate", "export_run", "find_lr", "list_backbones", "load_dataset", "open_backbone",
        "predict_imagenet", "report", "resume", "summarize", "train", "RunSummary", "list_runs",
    ]
