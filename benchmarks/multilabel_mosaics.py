"""A multi-label set from real photos, and a first measurement on it (issue 27, groundwork).

    python benchmarks/multilabel_mosaics.py [--images 3000]

`build_mosaics` draws 2x2 mosaics of flowers100 photos with a fixed seed: each cell holds a photo of a random class
or, with probability `BLANK`, plain background (a blurred colour field), so an image carries 1-4 labels (the flower
types present; at least one cell is a photo). Written as PNGs with a `labels.csv` of `path,label1|label2` rows.

The script then compares, on the probe's cached features (lite0, every block, --size px; 70/15/15 split by seed):
- one linear head with a sigmoid per class trained with binary cross-entropy (full-batch L-BFGS, weight decay chosen on
  validation macro mAP), with and without positive weights (negatives / positives per class);
- the anchors' workaround: one logistic regression per label (scikit-learn, C chosen on validation the same way).
It prints test macro / micro mAP for each. Measured (3,000 mosaics, 2.13 labels an image, 2 cores): at 224 px
BCE 0.877 / 0.877, with positive weights the same (the classes are balanced here), one regression per label 0.880;
at 448 px (each cell at 224) all three 0.888 / 0.886, weight decay 1e-5 and C 10 (the weakest regularisation tried).
Nothing in transferkit reads multi-label data yet: this measures the choices the product will make.
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


def fit_sigmoid_head(features: np.ndarray, targets: np.ndarray, weight_decay: float,
                     positive_weight: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A linear head with a sigmoid per class, binary cross-entropy, full-batch L-BFGS: (weights, bias)."""
    import torch

    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(targets, dtype=torch.float32)
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    weights = None if positive_weight is None else torch.as_tensor(positive_weight, dtype=torch.float32)
    loss_of = torch.nn.BCEWithLogitsLoss(pos_weight=weights)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=300, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_of(head(x), y) + weight_decay / 2 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.weight.detach().numpy().T, head.bias.detach().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=224, help="probe resolution (the mosaic is 224 px)")
    args = parser.parse_args()
    from transferkit.backbone import open_backbone
    from transferkit.features import Extractor, extract_features, open_cache

    with tempfile.TemporaryDirectory(prefix="transferkit-mosaics-") as work:
        started = time.perf_counter()
        listing = build_mosaics(Path(work), args.images)
        rows = list(csv.reader(open(listing, encoding="utf-8")))
        classes = sorted({label for _, labels in rows for label in labels.split("|")})
        targets = np.array([[name in labels.split("|") for name in classes] for _, labels in rows], dtype=np.float32)
        print(f"{len(rows)} mosaics of {len(classes)} classes in {time.perf_counter() - started:.0f} s; labels per "
              f"image {targets.sum(1).mean():.2f} (1-4), class frequency "
              f"{', '.join(f'{share:.2f}' for share in targets.mean(0))}")
        extractor = Extractor(open_backbone("efficientnet_lite0", None, args.size))
        cache = open_cache(None, True)
        try:
            features = extract_features(extractor, [Path(work) / path for path, _ in rows], cache).features
        finally:
            cache.close()
    order = np.random.default_rng(0).permutation(len(rows))
    train, val, test = np.split(order, [int(0.7 * len(order)), int(0.85 * len(order))])
    decays = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
    negatives_per_positive = (1 - targets[train].mean(0)) / targets[train].mean(0)
    for name, positive_weight in (("sigmoid head, BCE", None), ("sigmoid head, BCE + positive weights",
                                                                negatives_per_positive)):
        best = max(decays, key=lambda decay: macro_micro_map(targets[val], features[val] @ fit_sigmoid_head(
            features[train], targets[train], decay, positive_weight)[0])[0])
        weights, bias = fit_sigmoid_head(features[train], targets[train], best, positive_weight)
        macro, micro = macro_micro_map(targets[test], features[test] @ weights + bias)
        print(f"{name} (weight decay {best:g}): test macro mAP {macro:.3f}, micro {micro:.3f}")

    from sklearn.linear_model import LogisticRegression

    def per_label(c: float, rows_: np.ndarray) -> np.ndarray:
        return np.stack([LogisticRegression(C=c, max_iter=2000).fit(features[train], targets[train, k])
                         .decision_function(features[rows_]) for k in range(len(classes))], axis=1)

    best_c = max((0.1, 1.0, 10.0), key=lambda c: macro_micro_map(targets[val], per_label(c, val))[0])
    macro, micro = macro_micro_map(targets[test], per_label(best_c, test))
    print(f"one logistic regression per label (C {best_c:g}): test macro mAP {macro:.3f}, micro {micro:.3f}")


if __name__ == "__main__":
    main()
