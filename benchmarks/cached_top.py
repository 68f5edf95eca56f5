"""Issue #25 numbers, part 2: fine-tuning the top blocks on cached activations of the frozen bottom (`--cache-bottom`)
against fine-tuning the whole network.

1. Throughput (lite0, batch 32, the precision `--precision auto` picks, forward + backward of what trains; target: the
   cached top >= 5x the whole network at the same resolution), and the frozen bottom's own rate (what caching runs at).
2. flowers100 (~100-px photos), the CLI in a fresh process with a fresh feature cache: the whole network at 128 px
   (what `--time-limit 10m` plans) against the top 6 blocks on cached activations at 224 px, about the same wall time:
   what each stage costs (caching, epochs), validation and test accuracy.

Usage: python benchmarks/cached_top.py [--skip-speed] [--skip-flowers] [--whole-epochs 6] [--top-epochs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def speeds() -> None:
    from transferkit.backbone import open_backbone
    from transferkit.features import resolve_device
    from transferkit.finetune import Network, measure_speed, resolve_train_precision
    from transferkit.head import HeadSpec

    backbone = open_backbone()
    device = resolve_device("auto")
    whole_precision, top_precision = (resolve_train_precision("auto", device, cached) for cached in (False, True))
    net = Network(backbone.trainable_copy(), backbone, HeadSpec("linear", backbone.feature_width, 5).build())
    print(f"throughput, lite0, batch 32, img/s (best of 2), each in the precision --precision auto gives it "
          f"(whole network {whole_precision}, cached top {top_precision}):")
    for size in (128, 224):
        whole = max(measure_speed(net, "finetune", "all", False, size, size, device, whole_precision)[0]
                    for _ in range(2))
        top = [measure_speed(net, "finetune", "top-blocks:6", False, size, size, device, top_precision, cached=True)
               for _ in range(2)]
        cached, bottom = max(rate[0] for rate in top), max(rate[2] for rate in top)
        print(f"  {size} px: whole network {whole:.1f}, top 6 blocks on cached activations {cached:.1f} "
              f"({cached / whole:.1f}x; target >= 5x), the frozen bottom alone {bottom:.1f}", flush=True)


def cli_train(data: Path, out: Path, cache: Path, home: Path, *extra: str) -> tuple[float, dict, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "transferkit", "train", str(data), "--out", str(out),
                             "--cache-dir", str(cache), "--json", "--no-report", *extra], capture_output=True,
                            text=True, env={**os.environ, "TRANSFERKIT_CACHE_DIR": str(home)})
    if result.returncode != 0:
        sys.exit(f"transferkit train {' '.join(extra)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, json.loads(result.stdout), result.stderr


def stage_seconds(log: str) -> str:
    """What the run's log says each stage took: caching the views, and the epochs."""
    caching = sum(float(m) for m in re.findall(r"Caching [^:]*: \d+/\d+ img in (\d+(?:\.\d+)?) s", log))
    epochs = re.findall(r"finetune epoch \d+/\d+: .*?, (\d+(?:\.\d+)?) img/s", log)
    rates = ", ".join(epochs)
    return f"caching {caching:.0f} s, epochs at {rates} img/s" if caching else f"epochs at {rates} img/s"


def flowers(whole_epochs: int, top_epochs: int) -> None:
    data = SHARED / "flowers100"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        cli_train(SHARED / "hymenoptera", tmp / "warm-up", tmp / "warm-cache", home, "--no-doctor")  # ONNX export
        runs = {"whole network, 128 px": ("--unfreeze", "all", "--train-size", "128", "--image-size", "128",
                                          "--epochs", str(whole_epochs), "--lr", "1e-3", "--backbone-lr-mult", "0.3"),
                "top 6 blocks, cached bottom, 224 px": ("--unfreeze", "top-blocks:6", "--cache-bottom",
                                                        "--train-size", "224", "--image-size", "224", "--epochs",
                                                        str(top_epochs), "--lr", "1e-3", "--backbone-lr-mult", "0.3")}
        print("\nflowers100, --mode finetune (the probe first, then the image stage), fresh process and cache:")
        for name, options in runs.items():
            seconds, summary, log = cli_train(data, tmp / name.replace(" ", "-"), tmp / f"cache-{len(name)}", home,
                                              "--mode", "finetune", *options)
            print(f"  {name}: val {summary['val_accuracy']:.4f}, test {summary['test_accuracy']:.4f}, wall "
                  f"{seconds:.0f} s ({stage_seconds(log)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-flowers", action="store_true")
    parser.add_argument("--whole-epochs", type=int, default=6)
    parser.add_argument("--top-epochs", type=int, default=8)
    args = parser.parse_args()
    if not args.skip_speed:
        speeds()
    if not args.skip_flowers:
        flowers(args.whole_epochs, args.top_epochs)


if __name__ == "__main__":
    main()
