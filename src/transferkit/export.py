"""`export_run`: a whole trained classifier as ONNX or TorchScript for deployment, checked against PyTorch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferkit.head import class_probabilities
from transferkit.multilabel import DEFAULT_THRESHOLD, THRESHOLDS_FILE, decide, label_matrix
from transferkit.onnx_engine import export_pixel_model, onnxruntime_installed, probe_pixels
from transferkit.novelty import NOVELTY_FILE, NoveltyModel
from transferkit.progress import progress_bar
from transferkit.runtime import onnx_session as runtime_session

log = logging.getLogger("transferkit")


EXPORT_FORMATS = ("onnx", "torchscript")
MAX_PROBABILITY_DIFFERENCE = 1e-4
MAX_SCORE_DIFFERENCE = 1e-4
PARITY_IMAGES = 64
CALIBRATION_IMAGES = 128
FEW_CALIBRATION_IMAGES = 50


class ProbabilityModel(torch.nn.Module):
    """uint8 NHWC pixels -> calibrated class probabilities (the logits divided by the run's temperature; a
    multi-label run's: one sigmoid per class): normalisation, backbone, head and softmax in one graph;
    `with_features` also outputs the features and the logits, which the runtime scores for how unlike the training
    images an input is."""

    def __init__(self, pixel_model: torch.nn.Module, head: torch.nn.Module, temperature: float = 1.0,
                 with_features: bool = False, multi_label: bool = False):
        super().__init__()
        self.features, self.head = pixel_model, head
        self.temperature, self.with_features, self.multi_label = temperature, with_features, multi_label

    def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.features(pixels)
        logits = self.head(features)
        probabilities = class_probabilities(logits, self.multi_label, self.temperature)
        return (probabilities, features, logits) if self.with_features else probabilities


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


def _sample_paths(run: Path, config: dict, classes: list[str], split: str, count: int,
                  thresholds: np.ndarray | None = None) -> tuple[list[str], list]:
    """Up to `count` labelled images of the run: its evaluation predictions (val/test; "val+test": both), or its
    training split. Their targets are class indices, or for a multi-label run (`thresholds` given) rows of 0/1 per
    class."""
    from transferkit.evaluate import PREDICTIONS_FILE, read_predictions
    from transferkit.runs import load_run_dataset

    if split in ("val+test", "val", "test"):
        predictions = read_predictions(run / PREDICTIONS_FILE, classes, thresholds)
        if split == "val+test":
            parts = [predictions[name] for name in ("val", "test") if name in predictions]
        else:
            chosen = predictions.get(split) or next(iter(predictions.values()), None)
            parts = [chosen] if chosen is not None else []
        return ([path for part in parts for path in part.paths][:count],
                [target.tolist() for part in parts for target in part.targets][:count])
    try:
        samples = load_run_dataset(config).splits.get("train", [])
    except Exception:  # noqa: BLE001 - moved or changed data only means no calibration images
        return [], []
    picked = np.random.default_rng(0).permutation(len(samples))[:count]
    if thresholds is not None:
        return ([str(samples[i].path) for i in picked],
                label_matrix([samples[i].labels for i in picked], classes).tolist())
    index = {name: i for i, name in enumerate(classes)}
    return [str(samples[i].path) for i in picked], [index[samples[i].label] for i in picked]


def _pixels(paths: list[str], targets: list[int], preprocessing, desc: str,
            progress: bool | None) -> tuple[np.ndarray, np.ndarray]:
    from transferkit.data import default_workers, iter_prepared, make_preparer

    pixels, kept = [], []
    bar = progress_bar(len(paths), desc, "img", progress, quiet_when_empty=True)
    for batch in iter_prepared(paths, make_preparer(preprocessing), 32, default_workers()):
        for i, prepared in batch:
            if prepared.pixels is not None:
                pixels.append(prepared.pixels)
                kept.append(targets[i])
        bar.update(len(batch))
    bar.close()
    return (np.stack(pixels) if pixels else np.empty((0, *preprocessing.input_size, 3), np.uint8),
            np.array(kept, dtype=np.float32 if kept and np.ndim(kept[0]) else np.int64))


def _run_batches(run_model, pixels: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, ...]:
    """The outputs of `pixels` (probabilities, and features and logits for a model that gives them), from a model
    run a batch at a time."""
    parts = [run_model(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
    parts = [tuple(part) if isinstance(part, (tuple, list)) else (part,) for part in parts]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))


def _numpy(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> np.ndarray | tuple[np.ndarray, ...]:
    return tuple(o.numpy() for o in outputs) if isinstance(outputs, tuple) else outputs.numpy()


def _parity(reference: tuple, exported: tuple, synthetic: bool, novelty: NoveltyModel | None) -> dict:
    """`synthetic`: checked on made-up pixels, because the run has no validation/test image that can be read. With
    `novelty`, the unknown verdicts (at the run's threshold) of both are compared too."""
    (reference, *reference_extra), (exported, *exported_extra) = reference, exported
    parity = {"images": int(len(reference)), "synthetic": synthetic,
              "top1_agreement": float(np.mean(reference.argmax(1) == exported.argmax(1))) if len(reference) else None,
              "max_abs_probability_difference": float(np.abs(reference - exported).max()) if len(reference) else None}
    threshold = novelty.threshold() if novelty is not None else None
    if threshold is not None and exported_extra and len(reference):
        reference_scores, exported_scores = novelty.scores(*reference_extra), novelty.scores(*exported_extra)
        # An image scoring within rounding of the threshold may fall either side in either engine: not a disagreement.
        clear = np.abs(reference_scores - threshold) > MAX_SCORE_DIFFERENCE
        parity["unknown_agreement"] = float(np.mean((reference_scores[clear] > threshold)
                                                    == (exported_scores[clear] > threshold))) if clear.any() else 1.0
        parity["max_abs_score_difference"] = float(np.abs(reference_scores - exported_scores).max())
    return parity


def _quantize_int8(fp32: Path, int8: Path, calibration: np.ndarray, progress: bool | None) -> None:
    """Static QDQ quantisation (int8 weights per channel, uint8 activations) calibrated on training images.

    7-bit weight range (`reduce_range`), which ONNX Runtime advises on x86: on hymenoptera (lite0 probe, 153 val
    images) full-range int8 lost 1.3 points of accuracy with min-max, moving-average, percentile or symmetric
    calibration alike; reduce_range lost 0.65 (one image).
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    bar = progress_bar(len(calibration), "int8 calibration", "img", progress)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"pixels": calibration[i:i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            batch = next(self.batches, None)
            if batch is None:
                bar.close()
            else:
                bar.update(len(batch["pixels"]))
            return batch

    import onnx

    prepared = int8.with_name("prepared.onnx")
    quantizer_log = logging.getLogger()  # the quantiser reports every rescaled weight at INFO on the root logger
    level = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            # Softmax (a multi-label model's last Sigmoid) stays float: probabilities are not rounded to 1/255 steps.
            softmax = [node.name for node in onnx.load(str(prepared)).graph.node if _stays_float(node)]
            quantize_static(str(prepared), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
                            nodes_to_exclude=softmax)
    finally:
        quantizer_log.setLevel(level)
    prepared.unlink()


def export_run(run: str | Path, format: str = "onnx", quantize: str | None = None, out: str | Path | None = None,
               overwrite: bool = False, parity_images: int = PARITY_IMAGES,
               progress: bool | None = None) -> ExportResult:
    """Write RUN's whole classifier (backbone + head + softmax, or one sigmoid per class for a multi-label run; uint8
    NHWC pixels in, probabilities out, any batch size) as ONNX or TorchScript into `out` (default
    RUN/export-FORMAT[-int8]), with labels.txt, preprocessing.json, export.json (and thresholds.json: multi-label).

    Before the folder is written, the export is run on up to `parity_images` of the run's validation/test images
    (synthetic pixels when it has none that can be read; `parity["synthetic"]` says so) and compared with PyTorch:
    the top-1 classes (and multi-label sets) must agree and the probabilities differ by at most 1e-4.
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
    novelty = classifier.novelty if format == "onnx" else None  # the torch-free runtime scores ONNX exports
    thresholds, decisions = _run_thresholds(classifier)  # multi-label: thresholds.json, and in class order
    model = ProbabilityModel(classifier.backbone.pixel_model(), classifier.head, classifier.calibration.temperature,
                             with_features=novelty is not None, multi_label=classifier.multi_label).cpu().float().eval()
    pixels, _ = _pixels(*_sample_paths(run, config, classes, "val+test", parity_images, decisions), preprocessing,
                        "Reading validation/test images", progress)
    synthetic = not len(pixels)
    if synthetic:
        pixels = probe_pixels(*preprocessing.input_size, count=4).numpy()
    with torch.inference_mode():
        reference = _run_batches(lambda batch: _numpy(model(torch.from_numpy(batch))), pixels)
    out = Path(out) if out else run / f"export-{format}{'-int8' if quantize else ''}"
    model_file = {"onnx": "model.onnx", "torchscript": "model.pt"}[format]
    quantization = None
    with StagedRun(out, overwrite) as staged:
        # Traced on two images even when the run has one: on a batch of 1 the exporter fixes the batch size.
        example = torch.from_numpy(pixels[np.arange(2) % len(pixels)])
        if format == "onnx":
            outputs = ["probabilities", "features", "logits"] if novelty is not None else ["probabilities"]
            export_pixel_model(model, example, staged.path(model_file), output=outputs, external_data=False)
            session = runtime_session.__wrapped__(str(staged.path(model_file)))
            exported = _run_batches(lambda batch: session.run(None, {"pixels": batch})[:len(outputs)], pixels)
        else:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(model, example)
            traced.save(str(staged.path(model_file)))
            with warnings.catch_warnings():  # torch's notice that TorchScript is deprecated: the user asked for it
                warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
                loaded = torch.jit.load(str(staged.path(model_file)))
            with torch.inference_mode():
                exported = _run_batches(lambda batch: _numpy(loaded(torch.from_numpy(batch))), pixels)
        parity = _parity(reference, exported, synthetic, novelty)
        if decisions is not None:
            parity["top1_agreement"] = _top1_agreement(reference[0], exported[0])
            parity["label_set_agreement"] = _label_set_agreement(reference[0], exported[0], decisions)
        label_sets = parity.get("label_set_agreement")
        if (parity["top1_agreement"] != 1.0 or parity["max_abs_probability_difference"] > MAX_PROBABILITY_DIFFERENCE
                or parity.get("unknown_agreement", 1.0) != 1.0 or label_sets not in (None, 1.0)):
            agreeing = "" if label_sets is None else f", label sets agreeing {label_sets:.3f}"
            raise RunError(f"the {format} export disagrees with PyTorch on {parity['images']} images (top-1 "
                           f"agreement {parity['top1_agreement']:.3f}, max probability difference "
                           f"{parity['max_abs_probability_difference']:.2g}, unknown verdicts agreeing "
                           f"{parity.get('unknown_agreement', 1.0):.3f}{agreeing}); nothing was written.")
        if quantize:
            quantization = _quantize(run, config, classes, preprocessing, staged.path(model_file),
                                     staged.path("model.int8.onnx"), novelty, progress, decisions)
            model_file = "model.int8.onnx"
        staged.write_text("labels.txt", "\n".join(classes) + "\n")
        if thresholds is not None:  # staged with the other files: the export folder appears whole or not at all
            staged.write_json(THRESHOLDS_FILE, thresholds)
        if novelty is not None:
            staged.write_bytes(NOVELTY_FILE, (run / NOVELTY_FILE).read_bytes())
        staged.write_json("preprocessing.json", {**preprocessing.to_dict(), "resize_size": preprocessing.resize_size,
                                                 "input": "uint8 RGB pixels, N x H x W x 3 (NHWC), resized so the "
                                                          "short side is resize_size, centre-cropped to input_size",
                                                 "normalisation": "inside the model"})
        staged.write_json("export.json", {
            "format": format, "model": model_file, "inputs": {"pixels": ["batch", *preprocessing.input_size, 3]},
            "outputs": {"probabilities": ["batch", len(classes)],
                        **({"features": ["batch", int(reference[1].shape[1])], "logits": ["batch", len(classes)]}
                           if novelty is not None else {})},
            "calibration": config.get("calibration"), "unknown": config.get("unknown") if novelty else None,
            "backbone": config["backbone"]["name"],
            "run": str(run.resolve()), "metrics": {k: v.get("accuracy") for k, v in read_metrics(run).items()},
            "parity": parity, "quantization": quantization, "transferkit_version": __version__,
            "torch": torch.__version__,
            **({"multi_label": True, "probabilities": "one sigmoid per class; a class is a label of the image when "
                                                      f"its probability reaches its threshold in {THRESHOLDS_FILE}",
                "thresholds_file": THRESHOLDS_FILE} if thresholds is not None else {})})
    return ExportResult(out, format, model_file, parity, quantization)


def _quantize(run: Path, config: dict, classes: list[str], preprocessing, fp32: Path, int8: Path,
              novelty: NoveltyModel | None, progress: bool | None, thresholds: np.ndarray | None = None) -> dict:
    """Quantise, then measure both models on the validation split: accuracy change, size ratio and (with `novelty`)
    how often their unknown verdicts agree. A multi-label run (`thresholds` given): the accuracy is the exact-match
    ratio (every label of an image right), and `label_set_agreement` how often both give an image the same labels."""
    from transferkit.errors import RunError

    calibration, _ = _pixels(*_sample_paths(run, config, classes, "train", CALIBRATION_IMAGES, thresholds),
                             preprocessing, "Reading calibration images", progress)
    if not len(calibration):
        raise RunError("int8 quantisation calibrates on the run's training images, and none could be read; "
                       "check that the run's data folder is still there.")
    log.info("int8: calibrating on %d training images", len(calibration))
    if len(calibration) < FEW_CALIBRATION_IMAGES:
        log.warning("few calibration images (%d, fewer than %d): the int8 value ranges may not fit new images; "
                    "check the accuracy change it reports", len(calibration), FEW_CALIBRATION_IMAGES)
    _quantize_int8(fp32, int8, calibration, progress)
    val_pixels, val_targets = _pixels(*_sample_paths(run, config, classes, "val", 100_000, thresholds), preprocessing,
                                      "Measuring int8 accuracy", progress)
    accuracy, verdicts, label_sets = {}, {}, {}
    threshold = novelty.threshold() if novelty is not None else None
    for name, path in (("fp32", fp32), ("int8", int8)):
        session = runtime_session.__wrapped__(str(path))
        probabilities, *extra = _run_batches(lambda batch: session.run(None, {"pixels": batch}), val_pixels)
        if thresholds is not None and len(val_targets):
            label_sets[name] = decide(probabilities, thresholds)
            accuracy[name] = float(np.mean((label_sets[name] == (val_targets > 0)).all(1)))
        else:
            accuracy[name] = float(np.mean(probabilities.argmax(1) == val_targets)) if len(val_targets) else None
        if threshold is not None and len(val_targets):
            verdicts[name] = novelty.scores(*extra) > threshold
    change = None if accuracy["fp32"] is None else accuracy["int8"] - accuracy["fp32"]
    agreement = float(np.mean(verdicts["fp32"] == verdicts["int8"])) if verdicts else None
    measured = {"calibration_images": int(len(calibration)), "validation_images": int(len(val_targets)),
                "accuracy_fp32": accuracy["fp32"], "accuracy_int8": accuracy["int8"], "accuracy_change": change,
                "size_fp32_bytes": fp32.stat().st_size, "size_int8_bytes": int8.stat().st_size,
                "size_ratio": int8.stat().st_size / fp32.stat().st_size, "unknown_agreement": agreement}
    if thresholds is not None:  # multi-label: "accuracy" is the exact-match ratio at the run's thresholds
        measured["accuracy"] = "exact match (every label of an image right, at the run's thresholds)"
        measured["label_set_agreement"] = (float(np.mean((label_sets["fp32"] == label_sets["int8"]).all(1)))
                                           if label_sets else None)
    return measured


# ---------------------------------------------------------------------------------------------- multi-label runs


def _run_thresholds(classifier) -> tuple[dict | None, np.ndarray | None]:
    """A multi-label run's thresholds as thresholds.json holds them (config.json's "thresholds": {"per_class": {class:
    threshold}, "chosen_by": ...}; DEFAULT_THRESHOLD for every class when the run kept none), and in class order.
    (None, None) for a single-label run."""
    if not classifier.multi_label:
        return None, None
    stored = classifier.config.get("thresholds") or {
        "per_class": {name: DEFAULT_THRESHOLD for name in classifier.classes},
        "chosen_by": f"default: the run kept no thresholds ({DEFAULT_THRESHOLD} for every class)"}
    return stored, classifier.thresholds


def _top1_agreement(reference: np.ndarray, exported: np.ndarray) -> float | None:
    """The share of images whose most probable class is the same in both, not counting images whose two most
    probable classes are within rounding of each other: independent sigmoids can both saturate (two labels at
    0.99999...), where either engine may rank either first."""
    if not len(reference):
        return None
    top2 = -np.sort(-reference, axis=1)[:, :2]
    clear = (top2[:, 0] - top2[:, -1] > MAX_PROBABILITY_DIFFERENCE) | (reference.shape[1] == 1)
    return float(np.mean(reference.argmax(1)[clear] == exported.argmax(1)[clear])) if clear.any() else 1.0


def _label_set_agreement(reference: np.ndarray, exported: np.ndarray, thresholds: np.ndarray) -> float | None:
    """The share of images given the same label set (the classes at or above their threshold) by both. A class whose
    reference probability is within rounding of its threshold may fall either side in either engine: that is not
    counted as a disagreement."""
    if not len(reference):
        return None
    clear = np.abs(reference - thresholds[None, :]) > MAX_PROBABILITY_DIFFERENCE
    same = (decide(reference, thresholds) == decide(exported, thresholds)) | ~clear
    return float(np.mean(same.all(1)))


def _stays_float(node) -> bool:
    """The ONNX nodes int8 quantisation leaves in float: softmax, and a multi-label model's last sigmoid (the one
    that gives the probabilities, not those inside the backbone)."""
    return node.op_type == "Softmax" or (node.op_type == "Sigmoid" and "probabilities" in node.output)
