"""Issue #2 numbers on ../shared hymenoptera: validation accuracy with all defaults, cold and warm `transferkit train`.

Runs the real CLI in fresh processes (start-up included), with a fresh feature cache for the cold run. Since issue
#5 every run ends by writing its HTML report; the warm run is also timed with --no-report to show what that costs.
Usage: python benchmarks/core.py [--data ../shared/datasets/hymenoptera]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


def timed_train(data: Path, out: Path, cache: Path, home_cache: Path, *extra: str) -> tuple[float, dict]:
    """`home_cache` stands for ~/.cache/transferkit, where the one-off ONNX export of the backbone is kept."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "transferkit", "train", str(data), "--out", str(out),
                             "--cache-dir", str(cache), "--json", *extra], capture_output=True, text=True, check=True,
                            env={**os.environ, "TRANSFERKIT_CACHE_DIR": str(home_cache)})
    return time.perf_counter() - started, json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data pointing at the hymenoptera train/val folder.")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home-cache"
        first_s, _ = timed_train(args.data, Path(tmp) / "first", Path(tmp) / "cache0", home)
        cold_s, cold = timed_train(args.data, Path(tmp) / "cold", Path(tmp) / "cache", home)
        warm_s, warm = timed_train(args.data, Path(tmp) / "warm", Path(tmp) / "cache", home)
        bare_s, _ = timed_train(args.data, Path(tmp) / "bare", Path(tmp) / "cache", home, "--no-report")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    print(f"{'measure':<42}{'value':>10}{'target':>10}")
    rows = [("validation accuracy (defaults)", f"{cold['val_accuracy']:.4f}", ">= 0.95"),
            ("first train on a machine, ONNX export (s)", f"{first_s:.1f}", ""),
            ("train, cold cache, end to end (s)", f"{cold_s:.1f}", "<= 30"),
            ("train, warm cache, end to end (s)", f"{warm_s:.1f}", "<= 5"),
            ("  of which the report (s)", f"{warm_s - bare_s:.1f}", ""),
            ("train --no-report, warm cache (s)", f"{bare_s:.1f}", "<= 5"),
            ("features computed cold / warm", f"{cold['features_computed']}/{warm['features_computed']}", "398/0"),
            ("warm run validation accuracy", f"{warm['val_accuracy']:.4f}", "= cold")]
    for name, value, target in rows:
        print(f"{name:<42}{value:>10}{target:>10}")


if __name__ == "__main__":
    main()
