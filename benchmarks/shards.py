"""`transferkit shard` on flowers100: how many shards, how many MB, how many seconds; then whether the shards give
the same splits, features and accuracy as the folder.

Writes ../shared/datasets/flowers100 (4,317 photos in 5 class folders; val and test carved by the hash rule) into
WebDataset shards with `write_shards`, then prints the shards written per split, their MB and the seconds taken. The
shards go to a temporary folder removed afterwards, unless --out is given. Then (unless --no-compare) reads the
folder and the shards back: each image's (content digest, split, label) must be the same in both, its features the
same (max |difference| printed), and the default probe trained on each (fresh feature caches) is printed with its
test accuracy.

    python benchmarks/shards.py                  # --size 1GB: one shard per split
    python benchmarks/shards.py --size 4MB       # several shards per split
    python benchmarks/shards.py --out /tmp/flowers-shards --overwrite
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from transferkit.make_shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "flowers100"


def _described(data: str | Path) -> tuple[list, list[tuple[str, str, str]]]:
    """Every image's path and (content digest, split, label), sorted by the latter."""
    from transferkit.data import content_digest, load_dataset, read_item

    dataset = load_dataset(data)
    rows = sorted((content_digest(read_item(s.path)), split, s.label, s.path)
                  for split, samples in dataset.splits.items() for s in samples)
    return [row[3] for row in rows], [row[:3] for row in rows]


def compare(folder: Path, shards: str) -> None:
    import numpy as np

    import transferkit
    from transferkit.backbone import open_backbone
    from transferkit.features import Extractor, extract_features

    folder_paths, folder_rows = _described(folder)
    shard_paths, shard_rows = _described(shards)
    print(f"same (digest, split, label) for every image: {folder_rows == shard_rows} ({len(folder_rows):,} images)")
    extractor = Extractor(open_backbone())
    started = time.perf_counter()
    a = extract_features(extractor, folder_paths, None, progress=False)
    middle = time.perf_counter()
    b = extract_features(extractor, shard_paths, None, progress=False)
    ended = time.perf_counter()
    print(f"features: max |difference| {np.abs(a.features - b.features).max():.2e}; extraction "
          f"{len(a.kept) / (middle - started):.0f} img/s from the folder, {len(b.kept) / (ended - middle):.0f} img/s "
          "from the shards")
    for name, data in (("folder", folder), ("shards", shards)):
        with tempfile.TemporaryDirectory(prefix="transferkit-bench-") as work:
            started = time.perf_counter()
            run = transferkit.train(data, out=Path(work) / "run", cache_dir=str(Path(work) / "cache"), report=False,
                                    doctor=False, progress=False)
            test, val = run.metrics["test"]["accuracy"], run.metrics["val"]["accuracy"]
            print(f"probe on the {name:<6}: test {test:.3f} / val {val:.3f} ({time.perf_counter() - started:.0f} s, "
                  "fresh cache)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the data to shard (default flowers100)")
    parser.add_argument("--out", default=None, help="where the shards go (default: a temporary folder, removed)")
    parser.add_argument("--size", default="1GB", help="largest shard (default 1GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards --out already holds")
    parser.add_argument("--no-compare", action="store_true", help="only write the shards")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    temporary = None if args.out else tempfile.mkdtemp(prefix="transferkit-shards-")
    out = args.out or str(Path(temporary) / "shards")
    try:
        source_mb = sum(p.stat().st_size for p in args.source.rglob("*") if p.is_file()) / 1e6
        result = write_shards(args.source, out, size=args.size, overwrite=args.overwrite, progress=False)
        print(f"source: {args.source} ({source_mb:.1f} MB of files), --size {args.size}; {os.cpu_count()} cores, "
              f"Python {platform.python_version()}")
        print(f"shards written: {result.shard_count} ("
              + ", ".join(f"{split} {len(paths)}" for split, paths in result.shards.items()) + ")")
        print("images: " + ", ".join(f"{split} {count:,}" for split, count in result.images.items())
              + f"; skipped {len(result.skipped)}")
        print(f"MB: {result.bytes / 1e6:.1f} (tar overhead {result.bytes / 1e6 - source_mb:+.1f} MB)")
        print(f"seconds: {result.seconds:.2f} ({sum(result.images.values()) / result.seconds:,.0f} images/s, "
              f"{result.bytes / 1e6 / result.seconds:.0f} MB/s)")
        if not args.no_compare:
            compare(args.source, out)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
