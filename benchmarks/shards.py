"""`transferkit shard` on flowers100: how many shards, how many MB, how many seconds.

Writes ../shared/datasets/flowers100 (4,317 photos in 5 class folders; val and test carved by the hash rule) into
WebDataset shards with `write_shards`, then prints the shards written per split, their MB and the seconds taken. The
shards go to a temporary folder removed afterwards, unless --out is given.

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
from pathlib import Path

from transferkit.make_shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "flowers100"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the data to shard (default flowers100)")
    parser.add_argument("--out", default=None, help="where the shards go (default: a temporary folder, removed)")
    parser.add_argument("--size", default="1GB", help="largest shard (default 1GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards --out already holds")
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
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
