"""The ONNX Runtime engine for the frozen backbone: its ONNX export (made once per architecture, weights and
preprocessing, kept in ``<cache>/onnx/<name>-<key>/`` beside an ``export.json`` that records how far its features
are from PyTorch's) and the sessions that run it. Exports that fail or disagree are recorded too, so `--engine
auto` stops trying them. `export` builds deployable artefacts on the same exporter.
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
    if backbone.feature_kind == "blocks":
        key["features"] = "blocks"
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


def export_pixel_model(module: torch.nn.Module, example: torch.Tensor, path: Path,
                       output: str | list[str] = "features", external_data: bool = True) -> None:
    """torch.export-based ONNX export with a dynamic batch dimension (`output`: the output's name, or a list of names
    for a model with several); the exporter's chatter is silenced."""
    exporter_logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in exporter_logs]
    for logger in exporter_logs:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["pixels"],
                              output_names=[output] if isinstance(output, str) else output,
                              dynamic_shapes=({0: torch.export.Dim("batch")},),
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
