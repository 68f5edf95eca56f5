"""`transferkit doctor` at scale: wall time and peak memory on 20,000+ photos, and whether planted near duplicates,
exact copies and unreadable files are all found.

Builds N images (once; reused while its marker file matches) by augmenting flowers100, each source used ~N/4,317
times with a different random crop, flip, colour jitter and rotation, so that copies of one source are not near
duplicates of each other. Then plants P re-encodes (JPEG quality 75) of generated images, 5 exact byte copies and 3
unreadable files, runs the real CLI in a fresh process with a fresh feature cache (its onnx/ linked to the usual
cache's, so the one-off backbone export is not timed) and counts which planted problems it reports.

    python benchmarks/doctor_scale.py                               # 20,000 images, cold cache
    python benchmarks/doctor_scale.py --warm                        # also a second run on the same cache
    python benchmarks/doctor_scale.py --images 1500 --planted 10    # a quick check

Peak memory is the child's own maximum resident set (os.wait4). The images go under --work (default: the system temp
folder), never into the repository: ~6 KB each, about 115 MB for 20,000, and a feature cache about as big.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageStat

from transferkit.features import default_cache_dir

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "flowers100"
EXACT_COPIES = 5
NEAR_KINDS = {"near_duplicate", "duplicate", "leak_near", "leak_exact"}
EXACT_KINDS = {"duplicate", "leak_exact"}


@dataclass
class Run:
    seconds: float
    peak_mib: float
    report: dict


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotation up to 15 degrees (corners filled with the mean colour), a random resized crop keeping 60-100 % of the
    area back at the original size, a horizontal flip half the time, brightness/contrast/colour jitter of +-30 %."""
    width, height = image.size
    fill = tuple(round(v) for v in ImageStat.Stat(image).mean)
    image = image.rotate(rng.uniform(-15, 15), Image.BICUBIC, fillcolor=fill)
    area, aspect = rng.uniform(0.6, 1.0) * width * height, np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w, h = min(width, np.sqrt(area * aspect)), min(height, np.sqrt(area / aspect))
    left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
    image = image.resize((width, height), Image.BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.7, 1.3))
    return image


def generate(sources: list[Path], data: Path, n: int, seed: int) -> list[str]:
    """Image i augments source i * len(sources) // n: every source in sorted order, each ~n / len(sources) times
    (an evenly spaced subset when n is smaller). Returns the relative paths written."""
    def one(i: int) -> str:
        source = sources[i * len(sources) // n]
        relative = f"{source.parent.name}/aug_{i:05d}.jpg"
        with Image.open(source) as image:
            augment(image.convert("RGB"), np.random.default_rng([seed, i])).save(data / relative, quality=90)
        return relative

    for folder in {s.parent.name for s in sources}:
        (data / folder).mkdir(parents=True, exist_ok=True)
    written = []
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for relative in pool.map(one, range(n)):
            written.append(relative)
            if len(written) % 2000 == 0 or len(written) == n:
                print(f"generated {len(written):,}/{n:,} images", file=sys.stderr, flush=True)
    return written


def plant(data: Path, generated: list[str], near: int, seed: int) -> dict:
    """Near duplicates (re-encodes at quality 75), exact copies and unreadable files beside distinct generated
    images, in their class folders. Returns the planted pairs and files as relative paths."""
    chosen = [generated[i] for i in np.random.default_rng(seed).choice(len(generated), near + EXACT_COPIES, False)]
    planted = {"near": [], "exact": [], "unreadable": []}
    for k, original in enumerate(chosen[:near]):
        copy = f"{Path(original).parent}/near_{k:03d}.jpg"
        with Image.open(data / original) as image:
            image.save(data / copy, quality=75)
        planted["near"].append([original, copy])
    for k, original in enumerate(chosen[near:]):
        copy = f"{Path(original).parent}/copy_{k:03d}.jpg"
        shutil.copyfile(data / original, data / copy)
        planted["exact"].append([original, copy])
    folder = Path(generated[0]).parent
    jpeg = (data / generated[0]).read_bytes()
    for name, content in (("broken_empty.jpg", b""), ("broken_text.jpg", b"not an image\n"),
                          ("broken_truncated.jpg", jpeg[:len(jpeg) // 2])):
        (data / folder / name).write_bytes(content)
        planted["unreadable"].append(f"{folder}/{name}")
    return planted


def build(source: Path, work: Path, images: int, near: int, seed: int) -> tuple[Path, dict]:
    """The dataset for these parameters, made unless its marker says it is complete; the planted problems."""
    params = {"source": str(source.resolve()), "images": images, "planted": near, "seed": seed}
    data = work / f"flowers-{images}-p{near}-s{seed}"
    marker = data.with_suffix(".json")
    if marker.is_file() and json.loads(marker.read_text())["params"] == params:
        print(f"reusing {data}", file=sys.stderr)
        return data, json.loads(marker.read_text())["planted"]
    marker.unlink(missing_ok=True)
    shutil.rmtree(data, ignore_errors=True)
    sources = sorted(p for p in source.glob("*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    started = time.perf_counter()
    generated = generate(sources, data, images, seed)
    planted = plant(data, generated, near, seed)
    print(f"built {data} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    marker.write_text(json.dumps({"params": params, "planted": planted}, indent=1))
    return data, planted


def fresh_cache(folder: Path) -> Path:
    """An empty feature cache whose onnx/ is the usual cache's, where the backbone's one-off export is kept."""
    shutil.rmtree(folder, ignore_errors=True)
    shared = default_cache_dir() / "onnx"
    shared.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True)
    (folder / "onnx").symlink_to(shared, target_is_directory=True)
    return folder


def run_doctor(data: Path, cache: Path) -> Run:
    """The CLI in a fresh process; its progress (stderr) goes to the terminal, its JSON (stdout) to a file."""
    command = [sys.executable, "-m", "transferkit", "doctor", str(data), "--json", "--cache-dir", str(cache)]
    with tempfile.TemporaryFile("w+") as stdout:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=stdout)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            sys.exit(f"doctor failed with exit code {child.returncode}: {' '.join(command)}")
        stdout.seek(0)
        return Run(seconds, usage.ru_maxrss / 1024, json.load(stdout))


def relative(path: str, data: Path) -> str:
    return Path(path).resolve().relative_to(data.resolve()).as_posix()


def found_pairs(report: dict, data: Path, kinds: set[str]) -> set[frozenset]:
    return {frozenset((relative(f["path"], data), relative(f["other"], data))) for f in report["findings"]
            if f["kind"] in kinds and f["other"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000, help="Augmented images to generate.")
    parser.add_argument("--planted", type=int, default=40, help="Near duplicates to plant.")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transferkit-doctor-scale")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="flowers100: one folder per class.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm", action="store_true", help="Run again on the same cache.")
    args = parser.parse_args()
    if not args.source.is_dir():
        sys.exit(f"{args.source} not found: pass --source pointing at flowers100's class folders.")
    work = args.work.resolve()
    if work == ROOT or ROOT in work.parents:
        sys.exit(f"--work {work} is inside the repository; pick a folder outside it.")
    data, planted = build(args.source, work, args.images, args.planted, args.seed)
    cache = fresh_cache(data.with_name(data.name + "-cache"))
    cold = run_doctor(data, cache)
    warm = run_doctor(data, cache) if args.warm else None

    files = sum(1 for p in data.glob("*/*") if p.is_file())
    report = cold.report
    near = {frozenset(pair) for pair in planted["near"]}
    exact = {frozenset(pair) for pair in planted["exact"]}
    near_found = found_pairs(report, data, NEAR_KINDS)
    unreadable = set(planted["unreadable"])
    unreadable_found = {relative(f["path"], data) for f in report["findings"] if f["kind"] == "unreadable"}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    print(f"{'measure':<46}{'value':>12}")
    rows = [("files in the dataset (images + planted)", f"{files:,}"),
            ("doctor wall time, cold cache (s)", f"{cold.seconds:.1f}"),
            ("doctor peak RSS, cold cache (MiB)", f"{cold.peak_mib:,.0f}"),
            ("images/s, cold cache", f"{files / cold.seconds:.0f}")]
    if warm is not None:
        rows += [("doctor wall time, warm cache (s)", f"{warm.seconds:.1f}"),
                 ("doctor peak RSS, warm cache (MiB)", f"{warm.peak_mib:,.0f}"),
                 ("images/s, warm cache", f"{files / warm.seconds:.0f}"),
                 ("findings the same cold and warm", "yes" if warm.report["findings"] == report["findings"]
                  else "NO")]
    rows += [("planted near duplicates found", f"{len(near & near_found)}/{len(near)}"),
             ("exact copies found", f"{len(exact & found_pairs(report, data, EXACT_KINDS))}/{len(exact)}"),
             ("unreadable files found", f"{len(unreadable & unreadable_found)}/{len(unreadable)}"),
             ("other near-duplicate pairs (not planted)", f"{len(near_found - near - exact)}")]
    rows += [(f"  findings: {kind}", f"{count:,}") for kind, count in sorted(report["totals"].items())]
    for name, value in rows:
        print(f"{name:<46}{value:>12}")


if __name__ == "__main__":
    main()
