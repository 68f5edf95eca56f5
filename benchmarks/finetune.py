"""Issue #4 numbers on ../shared hymenoptera: probe, finetune (+ light augmentation) and scratch side by side,
and training throughput against a plain hand-written PyTorch loop.

1. Each mode runs as `transferkit train --mode M --json` in a fresh process with a fresh feature cache: wall time
   end to end, validation accuracy.
2. Throughput (img/s, the median of epochs 2+, best of 2 rounds in this one process, the order swapped in the
   second, so that neither side gets a quieter machine or a warmer process): our fine-tuning loop
   (`images_per_second` in history.csv, all layers unfrozen, batch 32, light augmentation at 224 px) against a
   loop written the way the PyTorch tutorials write it, with the same model, weights, batch size, augmentation,
   optimiser and BatchNorm handling, once with the same bf16 autocast + channels_last and once in plain fp32.

Usage: python benchmarks/finetune.py [--data ../shared/datasets/hymenoptera] [--skip-scratch] [--speed-only]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

import transferkit
from transferkit.augment import RESIZED_CROP_SCALE
from transferkit.backbone import open_backbone
from transferkit.features import cpu_has_fast_bf16

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"
EPOCHS_FOR_SPEED = 3
SPEED_ROUNDS = 2


def run_mode(data: Path, tmp: Path, name: str, mode: str, *extra: str) -> tuple[float, dict, list[dict]]:
    out = tmp / name
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "transferkit", "train", str(data), "--mode", mode, "--out", str(out),
                             "--cache-dir", str(tmp / f"cache-{name}"), "--json", *extra], capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"transferkit train --mode {mode} failed:\n{result.stderr[-3000:]}")
    history = list(csv.DictReader((out / "history.csv").open()))
    return time.perf_counter() - started, json.loads(result.stdout), history


def our_loop(data: Path, tmp: Path, name: str, epochs: int) -> list[float]:
    """transferkit's own fine-tuning (the Python API `train` calls), all layers unfrozen: img/s per epoch."""
    result = transferkit.train(data, out=tmp / name, cache_dir=str(tmp / f"cache-{name}"), mode="finetune",
                               epochs=epochs, patience=99, progress=False, report=False)
    return [row["images_per_second"] for row in result.history if row["stage"] == "finetune"]


def hand_written_loop(data: Path, precision: str, epochs: int) -> list[float]:
    """The tutorial loop: ImageFolder + v2 transforms normalising in the workers, shuffle, AdamW, BN in eval."""
    torch.manual_seed(0)
    backbone = open_backbone()
    model = backbone.trainable_copy()
    net = nn.Sequential(model, nn.Dropout(0.2), nn.Linear(model.num_features, 2))
    net.requires_grad_(True)
    fast = precision == "bf16"
    if fast:
        net = net.to(memory_format=torch.channels_last)
    transform = v2.Compose([v2.RandomResizedCrop(224, scale=RESIZED_CROP_SCALE,
                                                 interpolation=v2.InterpolationMode.BICUBIC),
                            v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.5] * 3, [0.5] * 3)])
    loader = DataLoader(datasets.ImageFolder(str(data / "train"), transform), batch_size=32, shuffle=True,
                        num_workers=os.cpu_count(), persistent_workers=True)
    optimizer = torch.optim.AdamW([{"params": net[2].parameters(), "lr": 1e-4},
                                   {"params": model.parameters(), "lr": 1e-5}], weight_decay=1e-4)
    rates = []
    for _ in range(epochs):
        net.train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        started, seen = time.perf_counter(), 0
        for images, targets in loader:
            if fast:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16) if fast else nullcontext():
                logits = net(images)
            loss = nn.functional.cross_entropy(logits.float(), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(targets)
        rates.append(seen / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--skip-scratch", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="Only the throughput comparison.")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data pointing at the hymenoptera train/val folder.")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
          f", native bf16: {cpu_has_fast_bf16()}", flush=True)
    results = {}
    modes = [("probe",), ("finetune", "--augment", "light"), ("scratch", "--augment", "light")]
    with tempfile.TemporaryDirectory() as tmp:
        for mode, *extra in [] if args.speed_only else modes[:2] if args.skip_scratch else modes:
            results[mode] = run_mode(args.data, Path(tmp), mode, mode, *extra)
            print(f"  {mode}: {results[mode][0]:.0f} s, val accuracy {results[mode][1]['val_accuracy']:.4f}",
                  flush=True)
    precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    ours, hand_same = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(SPEED_ROUNDS):
            for side in (("ours", "hand") if round_ % 2 == 0 else ("hand", "ours")):
                if side == "ours":
                    ours.append(statistics.median(our_loop(args.data, Path(tmp), f"speed{round_}",
                                                           EPOCHS_FOR_SPEED)[1:]))
                else:
                    hand_same.append(statistics.median(hand_written_loop(args.data, precision,
                                                                         EPOCHS_FOR_SPEED)[1:]))
            print(f"  speed round {round_ + 1}: ours {ours[-1]:.1f} img/s, hand-written {hand_same[-1]:.1f} img/s",
                  flush=True)
    hand_fp32 = statistics.median(hand_written_loop(args.data, "fp32", EPOCHS_FOR_SPEED)[1:])
    ours, hand_same = max(ours), max(hand_same)

    print(f"\n{'mode':<10}{'val accuracy':>14}{'wall time (s)':>15}{'epochs':>8}   target")
    targets = {"finetune": ">= 0.96 in < 600 s"}
    for mode, (seconds, summary, _) in results.items():
        print(f"{mode:<10}{summary['val_accuracy']:>14.4f}{seconds:>15.1f}{summary['epochs_run']:>8}   "
              f"{targets.get(mode, '')}")
    print(f"\ntraining throughput, all layers unfrozen, batch 32, light augmentation at 224 px (img/s, median of "
          f"epochs 2-{EPOCHS_FOR_SPEED}, best of {SPEED_ROUNDS} rounds):")
    print(f"  transferkit finetune ({precision} autocast, channels_last): {ours:.1f}")
    print(f"  hand-written loop, same {precision} + channels_last:        {hand_same:.1f}  "
          f"(ours / hand = {ours / hand_same:.2f}, target >= 1)")
    print(f"  hand-written loop, plain fp32 NCHW:                  {hand_fp32:.1f}  (ours / plain = "
          f"{ours / hand_fp32:.2f})")


if __name__ == "__main__":
    main()
