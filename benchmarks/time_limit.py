"""Issue #15 numbers: `transferkit train --time-limit` on ../shared, and the fine-tuning loop against the network's
own forward+backward limit.

1. flowers100 with `--time-limit 10m` (target: test accuracy >= 0.90, wall time <= 10.5 min) and hymenoptera with
   `--time-limit 2m` (target: validation >= 0.97 and never below the probe alone), each as the real CLI in a fresh
   process with a fresh feature cache (the one-off ONNX export of the backbone made beforehand, as on any machine
   after its first run): wall time end to end, accuracies, and what auto chose. The probe alone is run too.
2. Throughput at 128 and 224 px (lite0, all layers, batch 32, light augmentation): transferkit's loop (img/s of the
   training part of each epoch, `images_per_second` in history.csv, median of epochs 2+) against the network's own
   limit on preloaded pixels (`transferkit.finetune.measure_speed`, the same precision and memory format).
   Target: >= 0.8.

Usage: python benchmarks/time_limit.py [--skip-flowers] [--skip-hymenoptera] [--skip-speed] [--flowers-limit 10m]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import transferkit
from transferkit.backbone import open_backbone
from transferkit.budget import parse_duration
from transferkit.features import cpu_has_fast_bf16, resolve_device
from transferkit.finetune import Network, measure_speed, resolve_train_precision
from transferkit.head import HeadSpec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def cli_train(data: Path, out: Path, cache: Path, home: Path, *extra: str) -> tuple[float, dict, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "transferkit", "train", str(data), "--out", str(out),
                             "--cache-dir", str(cache), "--json", *extra], capture_output=True, text=True,
                            env={**os.environ, "TRANSFERKIT_CACHE_DIR": str(home)})
    if result.returncode != 0:
        sys.exit(f"transferkit train {' '.join(extra)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, json.loads(result.stdout), result.stderr


def time_limited(name: str, data: Path, limit: str, tmp: Path, home: Path) -> None:
    probe_s, probe, _ = cli_train(data, tmp / f"{name}-probe", tmp / f"{name}-cache-probe", home, "--no-report")
    wall, auto, log = cli_train(data, tmp / f"{name}-auto", tmp / f"{name}-cache-auto", home, "--time-limit", limit)
    story = [line for line in log.splitlines() if line.startswith(("auto:", "probe:", "plan:", "finetune epoch"))]
    print(f"\n{name}, --time-limit {limit} ({parse_duration(limit):.0f} s), cold feature cache:")
    print(f"  probe alone:  val {probe['val_accuracy']:.4f}, test {_fmt(probe['test_accuracy'])}, {probe_s:.0f} s")
    print(f"  auto:         val {auto['val_accuracy']:.4f}, test {_fmt(auto['test_accuracy'])}, wall {wall:.0f} s "
          f"({wall / parse_duration(limit):.3f} of the limit)")
    print(f"  kept: {auto['choice']}")
    print("  the run's log:", *story, sep="\n    ")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def loop_against_limit(data: Path, size: int, tmp: Path, epochs: int = 3) -> tuple[float, float]:
    """(our loop's img/s, the network's limit img/s) for all layers at `size` px."""
    result = transferkit.train(data, out=tmp / f"speed-{size}", cache_dir=str(tmp / "speed-cache"), mode="finetune",
                               epochs=epochs, train_size=size, patience=99, progress=False, report=False,
                               doctor=False)
    ours = statistics.median([row["images_per_second"] for row in result.history if row["stage"] == "finetune"][1:])
    backbone = open_backbone()
    device = resolve_device("auto")
    net = Network(backbone.trainable_copy(), backbone, HeadSpec("linear", backbone.feature_width,
                                                                len(result.classes)).build())
    limits = [measure_speed(net, "finetune", "all", False, size, size, device,
                            resolve_train_precision("auto", device))[0] for _ in range(3)]
    return ours, max(limits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-flowers", action="store_true")
    parser.add_argument("--skip-hymenoptera", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--flowers-limit", default="10m")
    parser.add_argument("--hymenoptera-limit", default="2m")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"native bf16: {cpu_has_fast_bf16()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home-cache"
        # the one-off ONNX export of the backbone, made once per machine, is not part of any measured run
        cli_train(SHARED / "hymenoptera", tmp / "warm-up", tmp / "cache-warm-up", home, "--no-report", "--no-doctor")
        if not args.skip_flowers:
            time_limited("flowers100", SHARED / "flowers100", args.flowers_limit, tmp, home)
        if not args.skip_hymenoptera:
            time_limited("hymenoptera", SHARED / "hymenoptera", args.hymenoptera_limit, tmp, home)
        if not args.skip_speed:
            print("\nfine-tuning throughput, lite0, all layers, batch 32, light augmentation (hymenoptera photos):")
            for size in (128, 224):
                ours, limit = loop_against_limit(SHARED / "hymenoptera", size, tmp)
                print(f"  {size} px: loop {ours:.1f} img/s, network limit {limit:.1f} img/s, ratio {ours / limit:.2f} "
                      f"(target >= 0.8)", flush=True)


if __name__ == "__main__":
    main()
