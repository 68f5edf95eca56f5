"""`transferkit compare` on flowers100: a probe against a fine-tuned run, compared on the test split both were
evaluated on at training (the same ~430 photos: both runs split the folder the same way, by path).

- probe: `mode="probe"` (linear head on cached features) at SIZE px.
- fine-tuned: `mode="finetune"`, the top 6 blocks unfrozen with the bottom's output cached (`--cache-bottom`), at
  SIZE px, EPOCHS epochs, lr 1e-3 (backbone x0.3): the recipe benchmarks/recipe.py measured, cut to fit ~10 minutes
  on 2 cores. Its probe stage reads the probe's cached features.

Prints each stage's seconds, the per-class table, McNemar's p-value with its verdict, and the page's path.

Usage: python benchmarks/compare_runs.py [--data ../shared/datasets/flowers100] [--out FOLDER] [--epochs 3]
       [--size 160]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

import transferkit

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flowers100"
QUIET = dict(progress=False, report=False, doctor=False)


def timed(what: str, work):
    started = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - started
    print(f"  {what}: {seconds:.0f} s", flush=True)
    return result, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, help="Keep the runs and the page here [default: a temporary folder].")
    parser.add_argument("--epochs", type=int, default=3, help="Fine-tuning epochs.")
    parser.add_argument("--size", type=int, default=160, help="Image size of both runs (px).")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data pointing at the flowers100 class folders.")
    with tempfile.TemporaryDirectory() as temporary:
        root = args.out or Path(temporary)
        cache = str(root / "cache")
        print(f"flowers100 at {args.data} ({os.cpu_count()} cores), runs in {root}:", flush=True)
        probe, probe_seconds = timed("probe", lambda: transferkit.train(
            args.data, out=root / "probe", overwrite=True, mode="probe", image_size=args.size, cache_dir=cache,
            **QUIET))
        tuned, tuned_seconds = timed(f"fine-tuned ({args.epochs} epochs)", lambda: transferkit.train(
            args.data, out=root / "finetuned", overwrite=True, mode="finetune", epochs=args.epochs,
            unfreeze="top-blocks:6", cache_bottom=True, train_size=args.size, image_size=args.size, lr=1e-3,
            backbone_lr_mult=0.3, cache_dir=cache, **QUIET))
        result, compare_seconds = timed("compare", lambda: transferkit.compare(
            probe.run_dir, tuned.run_dir, out=root / "compare" / "probe-vs-finetuned"))
        for name, run in (("probe", probe), ("fine-tuned", tuned)):
            print(f"  {name}: test accuracy {run.metrics['test']['accuracy']:.4f} "
                  f"(validation {run.metrics['val']['accuracy']:.4f})")
        print(f"\n{result.n} images compared: {result.scored}.")
        Console(width=120).print(result.table())
        print(f"A right, B wrong: {len(result.a_only)}; B right, A wrong: {len(result.b_only)}; "
              f"McNemar's exact p = {result.p_value:.3g}")
        print(result.verdict)
        print(f"page: {result.page}")
        print(f"seconds: probe {probe_seconds:.0f}, fine-tuned {tuned_seconds:.0f}, compare {compare_seconds:.1f}")
        if args.out is None:
            print("(the runs and the page were in a temporary folder; pass --out to keep them)")


if __name__ == "__main__":
    main()
