"""A multi-label set from real photos, and a first measurement on it (issue 27, groundwork).

    python benchmarks/multilabel_mosaics.py [--images 3000]

`build_mosaics` draws 2x2 mosaics of flowers100 photos with a fixed seed: each cell holds a photo of a random class
or, with probability `BLANK`, plain background (a blurred colour field), so an image carries 1-4 labels (the flower
types present; at least one cell is a photo). Written as PNGs with a `labels.csv` of `path,label1|label2` rows.

The script trains transferkit's multi-label probe on them (`transferkit.train(labels.csv)`, defaults: the split by
file-name hash, every block's features, L-BFGS with the weight decay chosen on validation mAP, per-class thresholds
on validation) and prints its test macro / micro mAP, exact match, Hamming loss and micro F1; then the anchors'
workaround on the same features and split: one logistic regression per label (scikit-learn, C chosen on validation
macro mAP); then the probe with positive weights (`balance="weights"`) and at other resolutions (--sizes).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "datasets" / "flowers100"
sys.path.insert(0, str(ROOT / "src"))

CELL = 112
BLANK = 0.35


def build_mosaics(out: Path, count: int, seed: int = 0, source: Path = FLOWERS) -> Path:
    """`count` mosaics in `out/images/`, listed in `out/labels.csv`; returns the CSV's path."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    photos = {name: sorted((source / name).iterdir()) for name in classes}
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        mosaic = Image.new("RGB", (2 * CELL, 2 * CELL))
        cells = [rng.random() >= BLANK for _ in range(4)]
        if not any(cells):
            cells[rng.randrange(4)] = True
        labels = set()
        for position, photo in enumerate(cells):
            if photo:
                name = rng.choice(classes)
                labels.add(name)
                with Image.open(rng.choice(photos[name])) as image:
                    tile = image.convert("RGB").resize((CELL, CELL), Image.BICUBIC)
            else:
                colour = tuple(rng.randrange(40, 220) for _ in range(3))
                noise = np.random.default_rng(rng.randrange(2 ** 32)).normal(0, 25, (CELL, CELL, 3))
                tile = Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).filter(
                    ImageFilter.GaussianBlur(6))
            mosaic.paste(tile, ((position % 2) * CELL, (position // 2) * CELL))
        path = out / "images" / f"mosaic_{index:05d}.png"
        mosaic.save(path)
        rows.append((path.relative_to(out).as_posix(), "|".join(sorted(labels))))
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return out / "labels.csv"


def macro_micro_map(targets: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import average_precision_score

    return (float(average_precision_score(targets, scores, average="macro")),
            float(average_precision_score(targets, scores, average="micro")))


def per_label_workaround(features: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> tuple[float, float]:
    """The anchors' workaround on the same features and split: one logistic regression per label (scikit-learn), C
    chosen on validation macro mAP; test (macro, micro) mAP."""
    from sklearn.linear_model import LogisticRegression

    def scores(c: float, split: str) -> np.ndarray:
        return np.stack([LogisticRegression(C=c, max_iter=3000).fit(features["train"], targets["train"][:, k])
                         .decision_function(features[split]) for k in range(targets["train"].shape[1])], axis=1)

    best_c = max((0.1, 1.0, 10.0), key=lambda c: macro_micro_map(targets["val"], scores(c, "val"))[0])
    macro, micro = macro_micro_map(targets["test"], scores(best_c, "test"))
    print(f"  one logistic regression per label (C {best_c:g}): test macro mAP {macro:.3f}, micro {micro:.3f}")
    return macro, micro


def run_product(listing: Path, work: Path, name: str, **options) -> Path:
    """`transferkit.train` on the mosaics (a multi-label probe); prints its test numbers; returns the run folder."""
    import transferkit

    started = time.perf_counter()
    result = transferkit.train(listing, out=work / name, report=False, doctor=False, progress=False,
                               cache_dir=str(work / "cache"), **options)
    test = result.metrics["test"]
    print(f"transferkit probe{' ' + str(options) if options else ''}: test macro mAP {test['map_macro']:.3f}, micro "
          f"{test['map_micro']:.3f}, exact match {test['exact_match']:.3f}, Hamming loss {test['hamming_loss']:.3f}, "
          f"micro F1 {test['f1_micro']:.3f} ({time.perf_counter() - started:.0f} s; {result.images})")
    return result.run_dir


def run_features(run: Path, listing: Path, work: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The run's own features (from the cache it wrote) and targets of each split."""
    from transferkit.classifier import Classifier
    from transferkit.data import load_dataset
    from transferkit.features import extract_features, open_cache

    dataset = load_dataset(listing)
    classifier = Classifier.load(run, cache_dir=str(work / "cache"))
    features, targets = {}, {}
    cache = open_cache(str(work / "cache"), True)
    try:
        for split in ("train", "val", "test"):
            found = extract_features(classifier.extractor, [s.path for s in dataset.splits[split]], cache)
            features[split], targets[split] = found.features, dataset.targets(split)[found.kept]
    finally:
        cache.close()
    return features, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--keep", type=Path, help="build (or reuse) the mosaics here, not in a temporary folder")
    parser.add_argument("--sizes", type=int, nargs="*", default=[448], help="extra probe resolutions to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="transferkit-mosaics-") as temporary:
        work = args.keep or Path(temporary)
        started = time.perf_counter()
        listing = work / "labels.csv"
        if not listing.is_file():
            build_mosaics(work, args.images)
        rows = list(csv.reader(open(listing, encoding="utf-8")))
        labels_per_image = np.mean([len(labels.split("|")) for _, labels in rows])
        print(f"{len(rows)} mosaics in {time.perf_counter() - started:.0f} s; {labels_per_image:.2f} labels an image")
        run = run_product(listing, work, "probe")
        print("  on the same features and split:")
        per_label_workaround(*run_features(run, listing, work))
        run_product(listing, work, "probe-weights", balance="weights")
        for size in args.sizes:
            run = run_product(listing, work, f"probe-{size}", image_size=size)
            per_label_workaround(*run_features(run, listing, work))


if __name__ == "__main__":
    main()
