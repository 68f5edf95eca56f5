"""A transferkit classifier as an MLflow model (a pyfunc): `mlflow.pyfunc.load_model(uri).predict(frame)` and
`mlflow models serve -m URI` answer images the way `transferkit predict` does.

The model carries a run's model files (or an export folder) as its one artefact, "classifier", and loads it with
`Classifier.load` (or `ExportedClassifier.load` for an export, which needs only ONNX Runtime). Input: a DataFrame
whose column `image` holds paths or URLs (a list works too). Output: one row an image with the answer ("unknown" for
an image unlike the training data; a multi-label model's label set joined by "|"), the top label and its
probability, the top-k labels and probabilities, the unknown score and, for an input that could not be read, the
error.

This file is the model's code as MLflow stores it ("models from code"): MLflow runs it when loading the model, and
`set_model` at the bottom names the model; nothing is pickled.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import pandas as pd

ARTEFACT = "classifier"
TOP_K = 5


class TransferkitModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from transferkit.runtime import is_export

        folder = Path(context.artifacts[ARTEFACT])
        if is_export(folder):
            from transferkit.runtime import ExportedClassifier

            self.classifier = ExportedClassifier.load(folder)
        else:
            from transferkit.classifier import Classifier

            self.classifier = Classifier.load(folder)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        top_k = int((params or {}).get("top_k", TOP_K))
        predictions = self.classifier.predict(_images(model_input), top_k=top_k)
        return pd.DataFrame([_row(p) for p in predictions])


def _images(model_input) -> list:
    if isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, str):
        return [model_input]
    return list(model_input)


def _row(prediction) -> dict:
    return {"input": prediction.source, "answer": prediction.answer, "label": prediction.label,
            "probability": prediction.probability, "labels": "|".join(prediction.labels),
            "probabilities": "|".join(f"{p:.6g}" for p in prediction.probabilities),
            "unknown": prediction.unknown, "ood_score": prediction.ood_score, "error": prediction.error}


def log_model(folder: Path, name: str = "model"):
    """Log `folder` (a run's model files or an export) as the active MLflow run's model; returns MLflow's
    ModelInfo (`.model_uri` loads it)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from transferkit import __version__

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("string", "input"), ColSpec("string", "answer"), ColSpec("string", "label"),
                        ColSpec("double", "probability"), ColSpec("string", "labels"),
                        ColSpec("string", "probabilities"), ColSpec("boolean", "unknown"),
                        ColSpec("double", "ood_score"), ColSpec("string", "error")]),
        params=ParamSchema([ParamSpec("top_k", "long", TOP_K)]))
    with warnings.catch_warnings():  # advice to add an input example: the signature above says what comes in
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.pyfunc.log_model(name=name, python_model=__file__, artifacts={ARTEFACT: str(folder)},
                                       signature=signature, pip_requirements=[f"transferkit=={__version__}"])


mlflow.models.set_model(TransferkitModel())
