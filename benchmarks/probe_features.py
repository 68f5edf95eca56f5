"""Issue #25 numbers, part 1: probe features that transfer.

1. `transferkit train DATA` (the probe, all defaults) as the CLI in a fresh process with a fresh feature cache, on
   hymenoptera (target: validation >= 0.974), flowers100 (target: test >= 0.82; 0.778 before blocks features) and
   flowers100 downscaled to 32 x 32 px (a stand-in for sets of tiny photos): accuracies, wall time, and what
   validation chose (every block's features or the last block's; the weight decay).
2. What the rules in backbone.py (FEATURE_KINDS), head.py (PROBE_WEIGHT_DECAYS) and auto.py (PROBE_UPSCALE) rest on:
   a linear probe (L-BFGS, weight decay chosen on validation) on the last block's features against every block's, at
   several resolutions, validation / test accuracy.

Usage: python benchmarks/probe_features.py [--skip-cli] [--skip-table]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def downscaled(source: Path, target: Path, side: int = 32) -> Path:
    """Every photo of `source` resized to side x side (bicubic), class folders kept: a set of tiny photos."""
    for path in sorted(source.rglob("*.jpg")):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.exists():
            Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(out, quality=95)
    return target


def cli_probe(data: Path, out: Path, cache: Path, home: Path) -> tuple[float, dict, dict]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "transferkit", "train", str(data), "--out", str(out),
                             "--cache-dir", str(cache), "--json", "--no-report"], capture_output=True, text=True,
                            env={**os.environ, "TRANSFERKIT_CACHE_DIR": str(home)})
    if result.returncode != 0:
        sys.exit(f"transferkit train {data} failed:\n{result.stderr[-3000:]}")
    config = json.loads((out / "config.json").read_text())
    return time.perf_counter() - started, json.loads(result.stdout), config


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(name: str, data: Path, sizes: tuple[int, ...], cache: Path) -> None:
    import torch

    from transferkit.backbone import open_backbone
    from transferkit.data import load_dataset
    from transferkit.features import Extractor, extract_features, open_cache
    from transferkit.head import FitOptions, HeadSpec, fit_linear_lbfgs

    dataset = load_dataset(data)
    order = [split for split in ("train", "val", "test") if split in dataset.splits]
    paths = [s.path for split in order for s in dataset.splits[split]]
    targets = np.concatenate([dataset.targets(split) for split in order])
    split_of = np.concatenate([[split] * len(dataset.splits[split]) for split in order])
    print(f"\n{name}: linear probe (L-BFGS, weight decay chosen on validation), validation / test accuracy")
    print("  size   last block      every block")
    for size in sizes:
        backbone = open_backbone(image_size=size)
        cached = open_cache(cache, True)
        found = extract_features(Extractor(backbone), paths, cached, progress=False)
        cached.close()
        x, y, split = found.features, targets[found.kept], split_of[found.kept]
        last = backbone.block_widths[-1]
        cells = []
        for columns in (slice(x.shape[1] - last, None), slice(None)):
            part = x[:, columns]
            spec = HeadSpec("linear", part.shape[1], len(dataset.classes))
            fit = fit_linear_lbfgs(spec, part[split == "train"], y[split == "train"], part[split == "val"],
                                   y[split == "val"], FitOptions(optimizer="lbfgs"))
            scores = []
            for name_ in ("val", "test"):
                if (split == name_).any():
                    with torch.inference_mode():
                        logits = fit.head(torch.as_tensor(part[split == name_]))
                    scores.append(float((logits.argmax(1).numpy() == y[split == name_]).mean()))
                else:
                    scores.append(None)
            cells.append(f"{_fmt(scores[0])} / {_fmt(scores[1])}")
        print(f"  {size:4d}   {cells[0]:14s}  {cells[1]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tiny = downscaled(SHARED / "flowers100", tmp / "flowers100-32px")
        home = tmp / "home-cache"
        sets = {"hymenoptera": SHARED / "hymenoptera", "flowers100": SHARED / "flowers100",
                "flowers100 at 32 px": tiny}
        if not args.skip_cli:
            # the one-off ONNX export of the backbone, made once per machine, is not part of any measured run
            cli_probe(SHARED / "hymenoptera", tmp / "warm-up", tmp / "cache-warm-up", home)
            print("transferkit train DATA (the probe, defaults), fresh process, fresh feature cache:")
            for name, data in sets.items():
                seconds, summary, config = cli_probe(data, tmp / f"run-{name}", tmp / f"cache-{name}", home)
                chosen = config.get("probe_fit") or {}
                print(f"  {name:20s} val {_fmt(summary['val_accuracy'])}, test {_fmt(summary['test_accuracy'])}, "
                      f"{seconds:.0f} s, {config['preprocessing']['input_size'][0]} px, features "
                      f"{chosen.get('features')}, weight decay {chosen.get('weight_decay')}", flush=True)
        if not args.skip_table:
            table("flowers100", SHARED / "flowers100", (128, 160, 224, 288), tmp / "table-cache")
            table("flowers100 at 32 px", tiny, (96, 128, 160, 224), tmp / "table-cache")
            table("hymenoptera", SHARED / "hymenoptera", (224, 288), tmp / "table-cache")


if __name__ == "__main__":
    main()
