"""Issue #2 numbers on ../shared hymenoptera: validation accuracy with all defaults, cold and warm `transferkit train`.

Runs the real CLI in fresh processes (start-up included), with a fresh feature cache for the cold run. Since issue
#5 every run ends by writing its HTML report; the warm run is also timed with --no-report to show what that costs.
Issue #25 adds the easy path's speed: a cold `train --image-size 224 --no-report` (the ONNX export already made)
against the tutorial-style extraction loop alone on the same images at 224 px (torchvision ImageFolder + DataLoader
with a worker per core + timm's transform + the fp32 NCHW model; target: >= 3x), the warm run (target: <= 3 s), and
`transferkit --version` / `--help` (target: well under a second).
Usage: python benchmarks/core.py [--data ../shared/datasets/hymenoptera]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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


def tutorial_loop_seconds(data: Path, size: int = 224) -> float:
    """Features of every image of `data` the PyTorch transfer-learning tutorial's way (no head, no cache), timed
    from a warm process: the backbone loaded, then the loop."""
    code = f"""
import os, time, torch, torchvision
from transferkit.backbone import open_backbone
backbone = open_backbone(image_size={size})
model = backbone.model.float().eval()
transform = backbone.preprocessing.transform()
started = time.perf_counter()
for split in ("train", "val"):
    folder = torchvision.datasets.ImageFolder(os.path.join({str(data)!r}, split), transform=transform)
    loader = torch.utils.data.DataLoader(folder, batch_size=32, num_workers=os.cpu_count())
    with torch.no_grad():
        for images, _ in loader:
            model.forward_head(model.forward_features(images), pre_logits=True)
print(time.perf_counter() - started)
"""
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def command_seconds(*arguments: str, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "transferkit", *arguments], capture_output=True, check=True)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data pointing at the hymenoptera train/val folder.")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home-cache"
        first_s, _ = timed_train(args.data, Path(tmp) / "first", Path(tmp) / "cache0", home)
        timed_train(args.data, Path(tmp) / "first224", Path(tmp) / "cache0", home, "--image-size", "224")
        for cache in ("cache", "cache224"):  # cold: new images, the backbone's one-off ONNX exports already made
            shutil.copytree(Path(tmp) / "cache0" / "onnx", Path(tmp) / cache / "onnx")
        cold_s, cold = timed_train(args.data, Path(tmp) / "cold", Path(tmp) / "cache", home)
        warm_s, warm = timed_train(args.data, Path(tmp) / "warm", Path(tmp) / "cache", home)
        bare_s, _ = timed_train(args.data, Path(tmp) / "bare", Path(tmp) / "cache", home, "--no-report")
        easy_s, _ = timed_train(args.data, Path(tmp) / "easy", Path(tmp) / "cache224", home, "--image-size", "224",
                                "--no-report")
        warm_bare = min(timed_train(args.data, Path(tmp) / f"warm{i}", Path(tmp) / "cache224", home, "--image-size",
                                    "224", "--no-report")[0] for i in range(3))
    tutorial_s = tutorial_loop_seconds(args.data)
    version_s, help_s = command_seconds("--version"), command_seconds("--help")
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
            ("warm run validation accuracy", f"{warm['val_accuracy']:.4f}", "= cold"),
            ("cold train --image-size 224 --no-report (s)", f"{easy_s:.1f}", ""),
            ("tutorial extraction loop alone, 224 px (s)", f"{tutorial_s:.1f}", ""),
            ("  tutorial loop / cold train", f"{tutorial_s / easy_s:.2f}x", ">= 3x"),
            ("warm train --image-size 224 --no-report (s)", f"{warm_bare:.1f}", "<= 3"),
            ("transferkit --version (s)", f"{version_s:.2f}", "< 1"),
            ("transferkit --help (s)", f"{help_s:.2f}", "< 1")]
    for name, value, target in rows:
        print(f"{name:<42}{value:>10}{target:>10}")


if __name__ == "__main__":
    main()
