"""Calibrated confidence and "unknown" verdicts, measured (issue 26).

    python benchmarks/unknown.py                 # everything (~15 min on 2 cores, the fine-tuned run ~7 of them)
    python benchmarks/unknown.py --skip-finetune

Prints:
- hymenoptera (train/ + val/ as given): its unknown score against outsiders (a fixed-seed sample of flowers100 and of
  the demo digits): AUROC, the share of outsiders accepted when 95 % of validation images are, and the share called
  unknown at the run's default threshold; the same for the top probability.
- flowers100 with one class left out of training (each of the 5 in turn): AUROC of the left-out class's photos
  against the validation images, for the unknown score and the top probability; on the test split, the accuracy of
  the images answered against all.
- expected calibration error (15 bins) on a test split before and after calibration: hymenoptera (train/ split into
  train and validation, val/ as the test split), flowers100's probe and a fine-tuned flowers100 run.
- the cost of scoring: `Classifier.predict` on 1,000 images with and without the score.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(ROOT / "src"))

import transferkit  # noqa: E402
from transferkit.classifier import Classifier  # noqa: E402
from transferkit.data import list_images  # noqa: E402
from transferkit.demo import write_digits  # noqa: E402
from transferkit.novelty import auroc  # noqa: E402

OUTSIDERS = {"flowers100": 1000, "digits": 500}


def sample(paths: list[Path], count: int, seed: int = 0) -> list[Path]:
    paths = sorted(paths)
    random.Random(seed).shuffle(paths)
    return paths[:count]


def scored(classifier: Classifier, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(unknown scores, top probabilities) of readable images."""
    (probabilities, scores), _, _ = classifier.outputs_of_files(paths, progress=False)
    return scores, probabilities.max(1)


def run_predictions(run: Path, split: str) -> dict:
    """The run's stored per-image columns of one split."""
    from transferkit.evaluate import PREDICTIONS_FILE, read_predictions

    config = json.loads((run / "config.json").read_text())
    return read_predictions(run / PREDICTIONS_FILE, config["labels"]).get(split)


def far_outsiders(work: Path) -> None:
    run = work / "hymenoptera"
    transferkit.train(SHARED / "hymenoptera", out=run, report=False, doctor=False, progress=False)
    classifier = Classifier.load(run)
    val = run_predictions(run, "val")
    default = classifier.novelty.threshold()
    at95, at99 = np.quantile(val.ood_score, 0.95), np.quantile(val.ood_score, 0.99)
    top95 = np.quantile(-val.confidence, 0.95)  # "unknown" = top probability under the 5th percentile
    digits = write_digits(work / "digits")
    sets = {"flowers100": sample(list_images([str(SHARED / "flowers100")]), OUTSIDERS["flowers100"]),
            "digits": sample(list_images([str(digits)]), OUTSIDERS["digits"])}
    everything_scores, everything_top = [], []
    print(f"hymenoptera probe, {len(val.paths)} validation images, default: {classifier.novelty.describe()}")
    for name, paths in sets.items():
        scores, top = scored(classifier, paths)
        everything_scores.append(scores)
        everything_top.append(top)
        print(f"  {name} ({len(paths)}): unknown score AUROC {auroc(val.ood_score, scores):.3f}, accepted at 95 % "
              f"of validation {np.mean(scores <= at95):.1%} (at 99 %: {np.mean(scores <= at99):.1%}), unknown at "
              f"the default threshold {np.mean(scores > default):.1%} | top probability AUROC "
              f"{auroc(-val.confidence, -top):.3f}, accepted at 95 % {np.mean(-top <= top95):.1%}")
    scores, top = np.concatenate(everything_scores), np.concatenate(everything_top)
    print(f"  all outsiders ({len(scores)}): unknown score AUROC {auroc(val.ood_score, scores):.3f}, accepted at 95 % "
          f"{np.mean(scores <= at95):.1%} (at 99 %: {np.mean(scores <= at99):.1%}), unknown at the default "
          f"{np.mean(scores > default):.1%} | top probability "
          f"AUROC {auroc(-val.confidence, -top):.3f}, accepted at 95 % {np.mean(-top <= top95):.1%}")
    paths = sets["flowers100"]
    novelty = classifier.novelty
    seconds = {True: [], False: []}
    classifier.predict(paths[:64])  # warm up: the ONNX session, the page cache
    for scored_now in (False, True, False, True):  # alternated, the fastest of two each: the order does not count
        classifier.novelty = novelty if scored_now else None
        started = time.perf_counter()
        classifier.predict(paths, reject=scored_now)
        seconds[scored_now].append(time.perf_counter() - started)
    classifier.novelty = novelty
    with_score, without = min(seconds[True]), min(seconds[False])
    features = classifier.extractor.features(np.zeros((32, *classifier.backbone.preprocessing.input_size, 3), np.uint8))
    logits = classifier.head(torch.from_numpy(features)).detach().numpy()
    started = time.perf_counter()
    for _ in range(0, len(paths), 32):
        novelty.scores(features, logits)
    scoring = time.perf_counter() - started
    print(f"  Classifier.predict on {len(paths)} images: {with_score:.1f} s with the score, {without:.1f} s without "
          f"(+{with_score / without - 1:.1%}); the scoring alone {scoring:.3f} s ({scoring / without:.1%})")


def near_outsiders(work: Path) -> None:
    source = SHARED / "flowers100"
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    score_aucs, top_aucs = [], []
    print("flowers100, one class left out of training (probe):")
    for left in classes:
        data = work / f"flowers-without-{left}"
        for name in classes:
            if name != left:
                (data / name).mkdir(parents=True, exist_ok=True)
                for image in (source / name).iterdir():
                    (data / name / image.name).symlink_to(image)
        run = work / f"run-without-{left}"
        transferkit.train(data, out=run, report=False, doctor=False, progress=False)
        classifier = Classifier.load(run)
        val, test = run_predictions(run, "val"), run_predictions(run, "test")
        scores, top = scored(classifier, sorted((source / left).iterdir()))
        score_aucs.append(auroc(val.ood_score, scores))
        top_aucs.append(auroc(-val.confidence, -top))
        metrics = json.loads((run / "metrics.json").read_text())["test"]
        unknown = metrics["unknown"]
        print(f"  without {left}: AUROC unknown score {score_aucs[-1]:.3f}, top probability {top_aucs[-1]:.3f}; "
              f"{left} called unknown at the default {np.mean(scores > classifier.novelty.threshold()):.1%}; test: "
              f"{unknown['unknown_share']:.1%} unknown, accuracy on the rest {unknown['accuracy_known']:.3f} "
              f"(all {unknown['accuracy']:.3f}); test ECE {metrics['ece']:.3f} (uncalibrated "
              f"{metrics['ece_uncalibrated']:.3f}); {len(test.paths)} test images")
    print(f"  mean AUROC: unknown score {np.mean(score_aucs):.3f}, top probability {np.mean(top_aucs):.3f}")


def calibration(work: Path, finetune: bool) -> None:
    runs = {"hymenoptera probe (val/ as test)": (dict(data=SHARED / "hymenoptera" / "train",
                                                      test=SHARED / "hymenoptera" / "val", val_percent=25.0)),
            "flowers100 probe": dict(data=SHARED / "flowers100")}
    if finetune:
        runs["flowers100 fine-tuned (128 px, 4 epochs)"] = dict(data=SHARED / "flowers100", mode="finetune", epochs=4,
                                                                image_size=128)
    print("expected calibration error on the test split (15 bins):")
    for number, (name, options) in enumerate(runs.items()):
        started = time.perf_counter()
        data = options.pop("data")
        run = work / f"calibration-{number}"
        transferkit.train(data, out=run, report=False, doctor=False, progress=False, **options)
        config = json.loads((run / "config.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())["test"]
        print(f"  {name}: ECE {metrics['ece_uncalibrated']:.3f} -> {metrics['ece']:.3f} (temperature "
              f"{config['calibration']['temperature']:.2f} on {config['calibration']['fitted_on']}), accuracy "
              f"{metrics['accuracy']:.3f}, {metrics['n']} test images, {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--only", choices=("far", "near", "calibration"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="transferkit-unknown-"))
    try:
        if args.only in (None, "far"):
            far_outsiders(work)
        if args.only in (None, "near"):
            near_outsiders(work)
        if args.only in (None, "calibration"):
            calibration(work, not args.skip_finetune)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
