"""ONNX export of the frozen backbone for the feature engine, and `export_run`: a whole trained classifier as ONNX
or TorchScript for deployment, checked against PyTorch.

The backbone export is cached, checked against PyTorch, with ONNX Runtime sessions for it.

An export is made once per (architecture, weights, preprocessing) and kept in ``<cache>/onnx/<name>-<key>/``
beside an ``export.json`` that records how far its features are from PyTorch's. Exports that fail or disagree are
recorded too, so `--engine auto` stops trying them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferkit.backbone import Backbone
from transferkit.runtime import onnx_session as runtime_session

log = logging.getLogger("transferkit")

EXPORT_FORMAT = 1
MIN_EXPORT_COSINE = 0.9999
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ExportError(Exception):
    """The backbone cannot run in ONNX Runtime (export failed, or its features disagree with PyTorch)."""


def onnxruntime_installed() -> bool:
    """ONNX Runtime plus what the exporter needs (the `onnx` extra)."""
    return all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnx", "onnxscript"))


def onnxruntime_provider(device: torch.device) -> str | None:
    """The execution provider for `device`, or None when this ONNX Runtime build has none."""
    import onnxruntime

    provider = _PROVIDERS.get(device.type)
    return provider if provider in onnxruntime.get_available_providers() else None


def export_folder(backbone: Backbone, root: Path) -> Path:
    key = {"format": EXPORT_FORMAT, "architecture": backbone.architecture, "weights_id": backbone.weights_id,
           "preprocessing": backbone.preprocessing.to_dict()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    safe_name = "".join(c if c.isalnum() or c in "._-" else "_" for c in backbone.architecture)
    return root / f"{safe_name}-{digest}"


def recorded_failure(backbone: Backbone, root: Path) -> str | None:
    """Why an earlier export of this backbone was rejected, if one was."""
    try:
        info = json.loads((export_folder(backbone, root) / "export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return None if info.get("ok") else info.get("reason", "unknown reason")


def export_pixel_model(module: torch.nn.Module, example: torch.Tensor, path: Path, output: str = "features",
                       external_data: bool = True) -> None:
    """torch.export-based ONNX export with a dynamic batch dimension; the exporter's chatter is silenced."""
    exporter_logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in exporter_logs]
    for logger in exporter_logs:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["pixels"],
                              output_names=[output], dynamic_shapes=({0: torch.export.Dim("batch")},),
                              verbose=False, external_data=external_data)
    finally:
        for logger, level in zip(exporter_logs, levels):
            logger.setLevel(level)


def probe_pixels(height: int, width: int, count: int = 3) -> torch.Tensor:
    """Smooth random pictures (uint8 NHWC), closer to photos than noise, to compare engines on."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, 7, 7, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def _export_and_check(backbone: Backbone, folder: Path) -> dict:
    model = backbone.pixel_model().cpu().float().eval()
    probe = probe_pixels(*backbone.preprocessing.input_size)
    try:
        export_pixel_model(model, probe[:2], folder / "model.onnx")
    except Exception as err:  # the exporter raises many types; any of them means "not exportable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return {"ok": False, "reason": f"ONNX export failed: {type(err).__name__}: {reason[:300]}"}
    with torch.inference_mode():
        reference = model(probe).numpy()
    session = runtime_session.__wrapped__(str(folder / "model.onnx"), "CPUExecutionProvider", 1)
    cosine = float(cosine_rows(reference, session.run(None, {"pixels": probe.numpy()})[0]).min())
    if not cosine >= MIN_EXPORT_COSINE:
        return {"ok": False, "cosine": cosine,
                "reason": f"ONNX Runtime features disagree with PyTorch (cosine {cosine:.4f})"}
    return {"ok": True, "cosine": cosine, "torch": torch.__version__}


def backbone_onnx(backbone: Backbone, root: Path) -> Path:
    """The ONNX file of `backbone` (uint8 NHWC pixels -> features), exported and checked on first use."""
    folder = export_folder(backbone, root)
    info_path = folder / "export.json"
    if not info_path.exists():
        log.info("exporting %s to ONNX for ONNX Runtime (once per backbone; kept in %s)", backbone.name, root)
        staging = root / f".staging-{uuid.uuid4().hex}"
        try:
            staging.mkdir(parents=True)
            info = _export_and_check(backbone, staging)
            (staging / "export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
            try:
                os.rename(staging, folder)
            except OSError:
                if not info_path.exists():  # not a concurrent export that got there first
                    raise
        except OSError as err:
            raise ExportError(f"cannot write the ONNX export to {root}: {err}") from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if not info.get("ok"):
        raise ExportError(f"{backbone.name} cannot run in ONNX Runtime: {info.get('reason')}")
    return folder / "model.onnx"


def onnx_session(path: Path, device: torch.device):
    """An ONNX Runtime session, one per (file, device, thread count) in a process; as many threads as torch uses."""
    return runtime_session(str(path), _PROVIDERS[device.type], torch.get_num_threads())


# ---------------------------------------------------------------------------------------------- whole classifier


EXPORT_FORMATS = ("onnx", "torchscript")
MAX_PROBABILITY_DIFFERENCE = 1e-4
PARITY_IMAGES = 64
CALIBRATION_IMAGES = 128


class ProbabilityModel(torch.nn.Module):
    """uint8 NHWC pixels -> class probabilities: normalisation, backbone, head and softmax in one graph."""

    def __init__(self, pixel_model: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.features, self.head = pixel_model, head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.features(pixels)), dim=1)


@dataclass
class ExportResult:
    folder: Path
    format: str
    model: str
    parity: dict
    quantization: dict | None = None

    def summary(self) -> dict:
        return {"folder": str(self.folder), "format": self.format, "model": self.model, "parity": self.parity,
                "quantization": self.quantization}


def _sample_paths(run: Path, config: dict, classes: list[str], split: str, count: int) -> tuple[list[str], list[int]]:
    """Up to `count` labelled images of the run: its evaluation predictions (val/test), or its training split."""
    from transferkit.evaluate import PREDICTIONS_FILE, read_predictions
    from transferkit.runs import load_run_dataset

    if split in ("val", "test"):
        predictions = read_predictions(run / PREDICTIONS_FILE, classes)
        chosen = predictions.get(split) or next(iter(predictions.values()), None)
        if chosen is None:
            return [], []
        return chosen.paths[:count], chosen.targets[:count].tolist()
    try:
        samples = load_run_dataset(config).splits.get("train", [])
    except Exception:  # noqa: BLE001 - moved or changed data only means no calibration images
        return [], []
    index = {name: i for i, name in enumerate(classes)}
    picked = np.random.default_rng(0).permutation(len(samples))[:count]
    return [str(samples[i].path) for i in picked], [index[samples[i].label] for i in picked]


def _pixels(paths: list[str], targets: list[int], preprocessing) -> tuple[np.ndarray, np.ndarray]:
    from transferkit.data import default_workers, iter_prepared, make_preparer

    pixels, kept = [], []
    for batch in iter_prepared(paths, make_preparer(preprocessing), 32, default_workers()):
        for i, prepared in batch:
            if prepared.pixels is not None:
                pixels.append(prepared.pixels)
                kept.append(targets[i])
    return (np.stack(pixels) if pixels else np.empty((0, *preprocessing.input_size, 3), np.uint8),
            np.array(kept, dtype=np.int64))


def _run_batches(run_model, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([run_model(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])


def _parity(reference: np.ndarray, exported: np.ndarray) -> dict:
    return {"images": int(len(reference)),
            "top1_agreement": float(np.mean(reference.argmax(1) == exported.argmax(1))) if len(reference) else None,
            "max_abs_probability_difference": float(np.abs(reference - exported).max()) if len(reference) else None}


def _quantize_int8(fp32: Path, int8: Path, calibration: np.ndarray) -> None:
    """Static QDQ quantisation (int8 weights per channel, uint8 activations) calibrated on training images.

    7-bit weight range (`reduce_range`), which ONNX Runtime advises on x86: on hymenoptera (lite0 probe, 153 val
    images) full-range int8 lost 1.3 points of accuracy with min-max, moving-average, percentile or symmetric
    calibration alike; reduce_range lost 0.65 (one image).
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"pixels": calibration[i:i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.batches, None)

    import onnx

    prepared = int8.with_name("prepared.onnx")
    quantizer_log = logging.getLogger()  # the quantiser reports every rescaled weight at INFO on the root logger
    level = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            # Softmax stays float, so probabilities are not rounded to steps of 1/255.
            softmax = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Softmax"]
            quantize_static(str(prepared), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
                            nodes_to_exclude=softmax)
    finally:
        quantizer_log.setLevel(level)
    prepared.unlink()


def export_run(run: str | Path, format: str = "onnx", quantize: str | None = None, out: str | Path | None = None,
               overwrite: bool = False, parity_images: int = PARITY_IMAGES) -> ExportResult:
    """Write RUN's whole classifier (backbone + head + softmax; uint8 NHWC pixels in, probabilities out, any batch
    size) as ONNX or TorchScript into `out` (default RUN/export-FORMAT[-int8]), with labels.txt,
    preprocessing.json and export.json.

    Before the folder is written, the export is run on up to `parity_images` of the run's validation/test images
    and compared with PyTorch: the top-1 classes must agree and the probabilities differ by at most 1e-4.
    `quantize="int8"` (ONNX only) adds static int8 quantisation calibrated on training images, and records its
    accuracy change on the validation split and its size against fp32.
    """
    from transferkit import __version__
    from transferkit.classifier import Classifier
    from transferkit.errors import DataError, RunError
    from transferkit.runs import StagedRun, read_metrics

    if format not in EXPORT_FORMATS:
        raise DataError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}.")
    if quantize not in (None, "int8"):
        raise DataError(f"--quantize takes int8, not {quantize!r}.")
    if quantize and format != "onnx":
        raise DataError("--quantize int8 needs --format onnx (ONNX Runtime runs the quantised model).")
    if format == "onnx" and not onnxruntime_installed():
        raise DataError("ONNX export needs the onnx extra: pip install 'transferkit[onnx]'.")
    run = Path(run)
    classifier = Classifier.load(run, engine="torch")
    config, classes, preprocessing = classifier.config, classifier.classes, classifier.backbone.preprocessing
    model = ProbabilityModel(classifier.backbone.pixel_model(), classifier.head).cpu().float().eval()
    paths, targets = _sample_paths(run, config, classes, "val", parity_images)
    pixels, _ = _pixels(paths, targets, preprocessing)
    if not len(pixels):
        pixels = probe_pixels(*preprocessing.input_size, count=4).numpy()
    with torch.inference_mode():
        reference = _run_batches(lambda batch: model(torch.from_numpy(batch)).numpy(), pixels)
    out = Path(out) if out else run / f"export-{format}{'-int8' if quantize else ''}"
    model_file = {"onnx": "model.onnx", "torchscript": "model.pt"}[format]
    quantization = None
    with StagedRun(out, overwrite) as staged:
        example = torch.from_numpy(pixels[:2].copy())
        if format == "onnx":
            export_pixel_model(model, example, staged.path(model_file), output="probabilities", external_data=False)
            session = runtime_session.__wrapped__(str(staged.path(model_file)))
            exported = _run_batches(lambda batch: session.run(None, {"pixels": batch})[0], pixels)
        else:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(model, example)
            traced.save(str(staged.path(model_file)))
            loaded = torch.jit.load(str(staged.path(model_file)))
            with torch.inference_mode():
                exported = _run_batches(lambda batch: loaded(torch.from_numpy(batch)).numpy(), pixels)
        parity = _parity(reference, exported)
        if parity["top1_agreement"] != 1.0 or parity["max_abs_probability_difference"] > MAX_PROBABILITY_DIFFERENCE:
            raise RunError(f"the {format} export disagrees with PyTorch on {parity['images']} images (top-1 "
                           f"agreement {parity['top1_agreement']:.3f}, max probability difference "
                           f"{parity['max_abs_probability_difference']:.2g}); nothing was written.")
        if quantize:
            quantization = _quantize(run, config, classes, preprocessing, staged.path(model_file),
                                     staged.path("model.int8.onnx"))
            model_file = "model.int8.onnx"
        staged.write_text("labels.txt", "\n".join(classes) + "\n")
        staged.write_json("preprocessing.json", {**preprocessing.to_dict(), "resize_size": preprocessing.resize_size,
                                                 "input": "uint8 RGB pixels, N x H x W x 3 (NHWC), resized so the "
                                                          "short side is resize_size, centre-cropped to input_size",
                                                 "normalisation": "inside the model"})
        staged.write_json("export.json", {
            "format": format, "model": model_file, "inputs": {"pixels": ["batch", *preprocessing.input_size, 3]},
            "outputs": {"probabilities": ["batch", len(classes)]}, "backbone": config["backbone"]["name"],
            "run": str(run.resolve()), "metrics": {k: v.get("accuracy") for k, v in read_metrics(run).items()},
            "parity": parity, "quantization": quantization, "transferkit_version": __version__,
            "torch": torch.__version__})
    return ExportResult(out, format, model_file, parity, quantization)


def _quantize(run: Path, config: dict, classes: list[str], preprocessing, fp32: Path, int8: Path) -> dict:
    """Quantise, then measure both models on the validation split: accuracy change and size ratio."""
    from transferkit.errors import RunError

    calibration, _ = _pixels(*_sample_paths(run, config, classes, "train", CALIBRATION_IMAGES), preprocessing)
    if not len(calibration):
        raise RunError("int8 quantisation calibrates on the run's training images, and none could be read; "
                       "check that the run's data folder is still there.")
    _quantize_int8(fp32, int8, calibration)
    val_pixels, val_targets = _pixels(*_sample_paths(run, config, classes, "val", 100_000), preprocessing)
    accuracy = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        session = runtime_session.__wrapped__(str(path))
        probabilities = _run_batches(lambda batch: session.run(None, {"pixels": batch})[0], val_pixels)
        accuracy[name] = float(np.mean(probabilities.argmax(1) == val_targets)) if len(val_targets) else None
    change = None if accuracy["fp32"] is None else accuracy["int8"] - accuracy["fp32"]
    return {"calibration_images": int(len(calibration)), "validation_images": int(len(val_targets)),
            "accuracy_fp32": accuracy["fp32"], "accuracy_int8": accuracy["int8"], "accuracy_change": change,
            "size_fp32_bytes": fp32.stat().st_size, "size_int8_bytes": int8.stat().st_size,
            "size_ratio": int8.stat().st_size / fp32.stat().st_size}
