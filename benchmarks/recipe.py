"""Issue #25 numbers, part 3: which regularisation fine-tuning gets (`recipe.Recipe`: mixup, an EMA of the weights,
stochastic depth; and flipped views averaged at test time), measured on held-out data at two sizes of training split.

flowers100 is split once per class with a fixed seed (80% train, 10% validation, 10% test, ~430 images each, so +-2
points are noise); "fifth" trains on a fifth of the same training split and is scored on the same validation and
test images. Each variant is the CLI in a fresh process (`--mode finetune`: the probe, then the image stage); the
feature cache is shared, so the cached bottom's views are computed once per split.

- top blocks: `--unfreeze top-blocks:6 --cache-bottom` at 160 px, 8 epochs, lr 1e-3 (backbone x0.3).
- whole: `--unfreeze all` at 128 px, 6 epochs, lr 1e-3 (backbone x0.3), fifth only (whole-network epochs on the full
  split cost ~70 s each here).

Usage: python benchmarks/recipe.py [--only full fifth whole] [--variants base mixup ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
VARIANTS = {"base": ("--mixup", "0", "--ema", "0", "--drop-path", "0"),
            "mixup 0.2": ("--mixup", "0.2", "--ema", "0", "--drop-path", "0"),
            "mixup 0.4": ("--mixup", "0.4", "--ema", "0", "--drop-path", "0"),
            "ema 0.998": ("--mixup", "0", "--ema", "0.998", "--drop-path", "0"),
            "drop path 0.2": ("--mixup", "0", "--ema", "0", "--drop-path", "0.2"),
            "mixup 0.2 + ema + drop path": ("--mixup", "0.2", "--ema", "0.998", "--drop-path", "0.2")}
TOP = ("--unfreeze", "top-blocks:6", "--cache-bottom", "--train-size", "160", "--image-size", "160", "--epochs", "8",
       "--lr", "1e-3", "--backbone-lr-mult", "0.3")
WHOLE = ("--unfreeze", "all", "--train-size", "128", "--image-size", "128", "--epochs", "6", "--lr", "1e-3",
         "--backbone-lr-mult", "0.3")


def split_folders(root: Path, out: Path, seed: int = 0) -> dict[str, Path]:
    """train / fifth / val / test folders of symlinks, 80/10/10 per class, a fifth of train for "fifth"."""
    rng = random.Random(seed)
    for label in sorted(p.name for p in root.iterdir() if p.is_dir()):
        files = sorted((root / label).iterdir())
        rng.shuffle(files)
        tenth = len(files) // 10
        parts = {"val": files[:tenth], "test": files[tenth:2 * tenth], "train": files[2 * tenth:]}
        parts["fifth"] = parts["train"][:len(parts["train"]) // 5]
        for name, chosen in parts.items():
            (out / name / label).mkdir(parents=True, exist_ok=True)
            for file in chosen:
                (out / name / label / file.name).symlink_to(file)
    return {name: out / name for name in ("train", "fifth", "val", "test")}


def flipped_copy(folder: Path, out: Path) -> Path:
    from PIL import Image, ImageOps

    for file in sorted(folder.rglob("*")):
        if file.is_file():
            target = out / file.relative_to(folder).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(file) as image:
                ImageOps.mirror(image.convert("RGB")).save(target)
    return out


def test_accuracy_with_flips(run: Path, test: Path, flipped: Path) -> tuple[float, float]:
    """(test accuracy, test accuracy of the mean of the photo's and its mirror image's probabilities)."""
    from transferkit import Classifier

    classifier = Classifier.load(run)
    paths = sorted(p for p in test.rglob("*") if p.is_file())
    mirrors = [flipped / p.relative_to(test).with_suffix(".png") for p in paths]
    targets = np.array([classifier.classes.index(p.parent.name) for p in paths])
    (plain, _), kept, _ = classifier.outputs_of_files(paths, use_cache=False, progress=False)
    (mirrored, _), kept_mirrors, _ = classifier.outputs_of_files(mirrors, use_cache=False, progress=False)
    assert len(kept) == len(kept_mirrors) == len(paths)
    return float((plain.argmax(1) == targets).mean()), float(((plain + mirrored).argmax(1) == targets).mean())


def run_variant(train: Path, val: Path, test: Path, out: Path, cache: Path, options: tuple[str, ...]
                ) -> tuple[float, dict, dict]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "transferkit", "train", str(train), "--val", str(val), "--test",
                             str(test), "--out", str(out), "--cache-dir", str(cache), "--json", "--no-report",
                             "--no-doctor", "--mode", "finetune", *options], capture_output=True, text=True,
                            env={**os.environ, "TRANSFERKIT_CACHE_DIR": str(cache / "home")})
    if result.returncode != 0:
        sys.exit(f"transferkit train {' '.join(options)} failed:\n{result.stderr[-3000:]}")
    with open(out / "history.csv", newline="") as file:
        last = list(csv.DictReader(file))[-1]
    return time.perf_counter() - started, json.loads(result.stdout), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", default=["full", "fifth", "whole"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folders = split_folders(SHARED / "flowers100", tmp / "split")
        flipped = flipped_copy(folders["test"], tmp / "test-flipped")
        cache = tmp / "cache"
        cases = {"full": ("train", TOP), "fifth": ("fifth", TOP), "whole": ("fifth", WHOLE)}
        for case in args.only:
            split, recipe_free = cases[case]
            images = sum(1 for p in folders[split].rglob("*") if p.is_file())
            print(f"\nflowers100 {case} ({images} training images; "
                  f"{'whole network' if recipe_free is WHOLE else 'top 6 blocks, cached'}):", flush=True)
            print(f"  {'variant':30} {'val':>6} {'test':>6} {'test+flip':>9} {'train acc':>9} {'wall':>6}")
            for name in args.variants:
                out = tmp / f"{case}-{name.replace(' ', '-')}"
                seconds, summary, last = run_variant(folders[split], folders["val"], folders["test"], out, cache,
                                                     (*recipe_free, *VARIANTS[name]))
                plain, with_flips = test_accuracy_with_flips(out, folders["test"], flipped)
                print(f"  {name:30} {summary['val_accuracy']:6.3f} {plain:6.3f} {with_flips:9.3f} "
                      f"{float(last['train_accuracy']):9.3f} {seconds:5.0f}s", flush=True)


if __name__ == "__main__":
    main()
