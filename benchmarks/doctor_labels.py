"""Issue #18 numbers: how far to believe the doctor's "likely label errors", and its outliers.

Plants label noise: a copy of each data set as symbolic links (nothing copied), with a fixed fraction of the images
moved to another class folder chosen at random (seeded). Then runs `transferkit.diagnose` and scores its likely label
errors against the moved images (precision, recall), the ranked cleanlab list (precision at half the planted errors
found), and cleanlab's noise estimate. On the unmodified data it counts what is flagged (every flag there is a false
alarm, or a real error in the data) and where hymenoptera's imageNotFound.gif placeholder ranks among outliers.

Usage: python benchmarks/doctor_labels.py [--seeds 0 1 2] [--fraction 0.05] [--cache-dir DIR]
The first run extracts the features of the three data sets (about a minute here); later runs read the cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.data import IMAGE_EXTENSIONS
from transferkit import doctor
from transferkit.demo import write_digits
from transferkit.doctor import DoctorReport, diagnose
from transferkit.features import cache_root

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@dataclass(frozen=True)
class Case:
    name: str
    data: Path
    image_size: int | None = None  # None: the backbone's own, as `transferkit doctor` uses


def planted_copy(source: Path, target: Path, fraction: float, seed: int) -> set[str]:
    """`source` as symbolic links under `target`, with `fraction` of the images in another class folder of the same
    split (picked uniformly among the others); returns the paths of the moved links."""
    images = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    classes_of = {}  # split folder (relative) -> its class names
    for image in images:
        classes_of.setdefault(image.parent.parent.relative_to(source), set()).add(image.parent.name)
    rng = np.random.default_rng(seed)
    moved_indices = set(rng.choice(len(images), int(round(fraction * len(images))), replace=False).tolist())
    moved = set()
    for i, image in enumerate(images):
        split = image.parent.parent.relative_to(source)
        label = image.parent.name
        if i in moved_indices:
            others = sorted(classes_of[split] - {label})
            label = others[rng.integers(len(others))]
        link = target / split / label / image.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(image)
        if i in moved_indices:
            moved.add(str(link))
    return moved


def precision_at_half_recall(report: DoctorReport, moved: set[str]) -> float:
    """Precision of cleanlab's ranked list cut where it has found half the planted errors (0 if it never does)."""
    found = 0
    for rank, issue in enumerate(report.label_issues, 1):
        found += issue.path in moved
        if found >= len(moved) / 2:
            return found / rank
    return 0.0


def run(case: Case, data: Path, cache_dir: Path | None) -> DoctorReport:
    return diagnose(data, image_size=case.image_size, cache_dir=cache_dir, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--label-features", choices=("blocks", "final"), default=None,
                        help="what the out-of-fold model sees (default: doctor.LABEL_FEATURES)")
    parser.add_argument("--only", nargs="+", default=None, help="the cases to run (hymenoptera, flowers100, digits)")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: the benchmark reads hymenoptera and flowers100 from ../shared/datasets.")
    if args.label_features:
        doctor.LABEL_FEATURES = args.label_features
    cases = [Case("hymenoptera", SHARED / "hymenoptera"), Case("flowers100", SHARED / "flowers100"),
             Case("digits (demo, 96 px)", write_digits(cache_root(args.cache_dir) / "demo"), 96)]
    cases = [case for case in cases if not args.only or case.name.split()[0] in args.only]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {args.fraction:.0%} of labels moved, seeds {args.seeds}; the label model "
          f"sees {doctor.LABEL_FEATURES} features")
    print(f"\n{'unmodified data':<22}{'images':>8}{'likely errors':>15}{'share':>8}{'outliers':>10}"
          f"{'cleanlab noise':>16}")
    for case in cases:
        report = run(case, case.data, args.cache_dir)
        images = sum(sum(c.values()) for c in report.counts.values())
        errors = len(report.of_kind("label_error"))
        print(f"{case.name:<22}{images:>8}{errors:>15}{errors / images:>8.1%}{len(report.of_kind('outlier')):>10}"
              f"{report.label_noise or 0:>16.1%}")
        outliers = report.of_kind("outlier")
        placeholder = [rank for rank, f in enumerate(outliers, 1) if f.path.endswith("imageNotFound.gif")]
        if case.data.name == "hymenoptera":
            print(f"  imageNotFound.gif among outliers: {f'rank {placeholder[0]}' if placeholder else 'absent'} of "
                  f"{len(outliers)} (target: rank 1)")
    print(f"\n{'planted noise':<22}{'seed':>5}{'moved':>7}{'flagged':>9}{'precision':>11}{'recall':>8}"
          f"{'ranked P@R.5':>14}{'cleanlab noise':>16}")
    for case in cases:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                data = Path(tmp) / case.data.name
                moved = planted_copy(case.data, data, args.fraction, seed)
                report = run(case, data, args.cache_dir)
            flagged = {f.path for f in report.of_kind("label_error")}
            hits = len(flagged & moved)
            print(f"{case.name:<22}{seed:>5}{len(moved):>7}{len(flagged):>9}{hits / max(1, len(flagged)):>11.2f}"
                  f"{hits / len(moved):>8.2f}{precision_at_half_recall(report, moved):>14.2f}"
                  f"{report.label_noise or 0:>16.1%}")
    print("\ntargets: hymenoptera recall >= 0.8 at precision >= 0.7; flowers100 precision >= 0.6 at recall >= 0.5;"
          "\n         unmodified hymenoptera and digits <= 1 % likely label errors; imageNotFound.gif first outlier")


if __name__ == "__main__":
    main()
