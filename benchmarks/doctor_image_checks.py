"""Should cleanvision (or imagehash alone) replace the doctor's hand-written image checks? Numbers to decide with.

On ../shared flowers100 (4,317 photos, 5 classes) and hymenoptera, and on a planted folder made in a temp dir, it
compares `transferkit.doctor.diagnose` with cleanvision's `Imagelab(...).find_issues()` (default issue types) and
with imagehash's phash alone (pairs within a Hamming distance of 4 and of 8 bits):
  (1) wall time on all of flowers100: our file checks + exact duplicates (`use_features=False`, no cache), our full
      diagnose on a warm feature cache (the second call), cleanvision, and phash of every image (one thread a core);
  (2) what each flags on these clean real datasets, per cleanvision issue type, with example paths to judge by;
  (3) near-duplicate recall on planted copies: 300 flowers100 images (the first 60 per class) plus 50 edited copies
      (fixed seed; 10 each of JPEG quality 70, resized to 80 % and back, brightness x1.1, 90 % centre crop,
      horizontal flip), a planted pair counting as found when the tool pairs the copy with its original; pairs a
      tool reports that were not planted are counted as false pairs;
  (4) planted file problems in the same folder: a 20x20 image, a 400x40 banner, an empty .jpg and a text file
      named .jpg.

The feature cache is kept in a folder under the temp dir between runs (--cache-dir), so only the first run on a
machine extracts features (and exports the backbone to ONNX). Takes a few minutes on 2 cores.
Usage: python benchmarks/doctor_image_checks.py [--flowers ../shared/datasets/flowers100]
                                                [--hymenoptera ../shared/datasets/hymenoptera]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from transferkit.doctor import DoctorReport, diagnose

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "transferkit-doctor-bench-cache"
SEED = 0
PER_CLASS = 60
EDITS_PER_KIND = 10
PHASH_DISTANCES = (4, 8)
LOOSER_COSINE = 0.95  # our near-duplicate threshold is 0.97; how much does loosening it buy, and cost?
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
CLEANVISION_TYPES = ("dark", "light", "blurry", "low_information", "odd_aspect_ratio", "odd_size", "grayscale",
                     "exact_duplicates", "near_duplicates")
# Our finding kinds that answer each cleanvision issue type; the types missing here have no counterpart in ours.
OURS_FOR = {"odd_aspect_ratio": ("extreme_aspect",), "odd_size": ("tiny",),
            "exact_duplicates": ("duplicate", "leak_exact"), "near_duplicates": ("near_duplicate", "leak_near")}
PAIR_KINDS = ("duplicate", "leak_exact", "near_duplicate", "leak_near")
FILE_KINDS = ("unreadable", "wrong_extension", "animated", "tiny", "extreme_aspect")


EDITS = {  # name: (edit, JPEG quality the copy is saved at)
    "jpeg q70": (lambda im: im, 70),  # the edit is the re-encoding itself
    "resize 80% and back": (lambda im: im.resize((round(im.width * 0.8), round(im.height * 0.8)),
                                                 Image.Resampling.BICUBIC).resize(im.size, Image.Resampling.BICUBIC),
                            95),
    "brightness x1.1": (lambda im: ImageEnhance.Brightness(im).enhance(1.1), 95),
    "90% centre crop": (lambda im: ImageOps.fit(im, (round(im.width * 0.9), round(im.height * 0.9)),
                                                centering=(0.5, 0.5)), 95),
    "horizontal flip": (lambda im: ImageOps.mirror(im), 95),
}

Pair = frozenset  # of two resolved path strings


@contextlib.contextmanager
def quiet():
    """Silences stdout and stderr at the file-descriptor level (cleanvision's progress bars, its worker processes,
    library warnings); anything raised still propagates once the streams are back."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(os.devnull, "w") as null, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def resolved(path) -> str:
    return str(Path(path).resolve())


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def images_in(pairs: set[Pair]) -> set[str]:
    return {path for pair in pairs for path in pair}


# --- the three tools, each reduced to {issue: flagged paths} and a set of duplicate pairs -------------------------

def run_transferkit(root: Path, cache: Path, **options) -> tuple[float, DoctorReport]:
    started = time.perf_counter()
    with quiet():
        report = diagnose(root, cache_dir=cache, progress=False, **options)
    return time.perf_counter() - started, report


def transferkit_pairs(report: DoctorReport, kinds=PAIR_KINDS) -> set[Pair]:
    return {Pair((resolved(f.path), resolved(f.other))) for f in report.findings if f.kind in kinds and f.other}


def transferkit_flags(report: DoctorReport) -> dict[str, set[str]]:
    """Flagged paths per cleanvision issue type we have a counterpart for."""
    flags = {}
    for issue, kinds in OURS_FOR.items():
        if issue.endswith("duplicates"):
            flags[issue] = images_in(transferkit_pairs(report, kinds))
        else:
            flags[issue] = {resolved(f.path) for f in report.findings if f.kind in kinds}
    return flags


class CleanvisionResult:
    def __init__(self, seconds: float, lab, crash: str | None = None):
        self.seconds, self.lab, self.crash = seconds, lab, crash

    def flags(self) -> dict[str, set[str]]:
        issues = self.lab.issues
        return {issue: {resolved(p) for p in issues.index[issues[f"is_{issue}_issue"]]} for issue in CLEANVISION_TYPES}

    def pairs(self, issue: str) -> set[Pair]:
        found = set()
        for group in self.lab.info[issue]["sets"]:
            group = [resolved(p) for p in group]
            found |= {Pair((a, b)) for i, a in enumerate(group) for b in group[i + 1:]}
        return found


def run_cleanvision(root: Path | None = None, files: list[Path] | None = None) -> CleanvisionResult:
    """Default issue types, as many worker processes as cleanvision picks (physical cores). A file it cannot open
    ends the whole run with the exception: that is returned as `crash`."""
    from cleanvision import Imagelab

    started = time.perf_counter()
    try:
        with quiet():
            if files is None:
                lab = Imagelab(data_path=str(root), verbose=False)
            else:
                lab = Imagelab(filepaths=[str(f) for f in files], verbose=False)
            lab.find_issues(verbose=False)
    except Exception as err:  # noqa: BLE001 - reported as the result
        return CleanvisionResult(time.perf_counter() - started, None, f"{type(err).__name__}: {err}"[:90])
    return CleanvisionResult(time.perf_counter() - started, lab)


def _phash(path: Path) -> int | str:
    try:
        with Image.open(path) as image:
            return int(str(imagehash.phash(image)), 16)
    except Exception as err:  # noqa: BLE001 - the error is the result for this file
        return f"{type(err).__name__}"


def run_phash(files: list[Path]) -> tuple[float, dict[str, int | str]]:
    """64-bit phash of every file, one thread a core; a file it cannot hash gets the exception's name."""
    started = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        hashes = list(pool.map(_phash, files))
    return time.perf_counter() - started, {resolved(f): h for f, h in zip(files, hashes)}


def phash_pairs(hashes: dict[str, int | str], max_distance: int) -> set[Pair]:
    paths = [p for p, h in hashes.items() if isinstance(h, int)]
    values = np.array([hashes[p] for p in paths], dtype=np.uint64)
    found = set()
    for start in range(0, len(values), 512):
        distance = np.bitwise_count(values[start:start + 512, None] ^ values[None, :])
        for row, column in zip(*np.nonzero(distance <= max_distance)):
            if column > start + row:
                found.add(Pair((paths[start + row], paths[column])))
    return found


# --- the planted folder ------------------------------------------------------------------------------------------

def build_planted(flowers: Path, folder: Path) -> tuple[dict[str, set[Pair]], dict[str, Path]]:
    """Copies the first PER_CLASS images of each class and adds edited copies beside 50 of them, plus four problem
    files. Returns the planted pairs per edit and the problem files by name."""
    originals = []
    for class_dir in sorted(d for d in flowers.iterdir() if d.is_dir()):
        (folder / class_dir.name).mkdir(parents=True)
        for source in image_files(class_dir)[:PER_CLASS]:
            originals.append(folder / class_dir.name / source.name)
            shutil.copyfile(source, originals[-1])
    chosen = random.Random(SEED).sample(originals, EDITS_PER_KIND * len(EDITS))
    planted: dict[str, set[Pair]] = {}
    for k, (name, (edit, quality)) in enumerate(EDITS.items()):
        planted[name] = set()
        for original in chosen[k * EDITS_PER_KIND:(k + 1) * EDITS_PER_KIND]:
            copy = original.with_name(f"{original.stem}_edit{k}.jpg")
            with Image.open(original) as image:
                edit(image.convert("RGB")).save(copy, quality=quality)
            planted[name].add(Pair((resolved(original), resolved(copy))))
    # Made from images outside the 300, so they are nobody's near duplicate.
    spare = [image_files(d)[PER_CLASS] for d in sorted(d for d in flowers.iterdir() if d.is_dir())]
    problems = {"20x20 image": folder / "daisy" / "tiny_20x20.jpg", "400x40 banner": folder / "daisy" / "banner.jpg",
                "empty .jpg": folder / "rose" / "empty.jpg", "text file named .jpg": folder / "rose" / "notes.jpg"}
    with Image.open(spare[0]) as image:
        image.convert("RGB").resize((20, 20)).save(problems["20x20 image"], quality=95)
    with Image.open(spare[1]) as image:
        image.convert("RGB").resize((400, 40)).save(problems["400x40 banner"], quality=95)
    problems["empty .jpg"].write_bytes(b"")
    problems["text file named .jpg"].write_text("these are not the pixels you are looking for\n")
    return planted, problems


def opens(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001
        return False


# --- printing ----------------------------------------------------------------------------------------------------

def short(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root.resolve()))
    except ValueError:
        return path


def size(path: str) -> str:
    try:
        with Image.open(path) as image:
            return f"{image.width}x{image.height}"
    except Exception:  # noqa: BLE001
        return "not an image"


def examples(items, root: Path, limit: int = 3) -> str:
    """Up to `limit` paths (with their size) or pairs of paths, sorted, and how many there are in all."""
    shown = []
    for item in sorted(items, key=lambda i: sorted(i) if isinstance(i, frozenset) else i)[:limit]:
        shown.append(" <-> ".join(short(p, root) for p in sorted(item)) if isinstance(item, frozenset)
                     else f"{short(item, root)} ({size(item)})")
    return "; ".join(shown) + (f"; ... ({len(items)} in all)" if len(items) > limit else "")


class Table:
    def __init__(self, widths=(44, 16, 30, 30)):
        self.widths, self.rows = widths, []

    def add(self, *cells) -> None:
        self.rows.append(tuple(str(c) for c in cells))

    def print(self) -> None:
        for cells in [("check", "transferkit", "cleanvision", "phash <=4 | <=8")] + self.rows:
            if len(cells) == 1:
                print(cells[0])
                continue
            print(f"{cells[0]:<{self.widths[0]}}" + "".join(f"{c:>{w}}" for c, w in zip(cells[1:], self.widths[1:])))


def per_distance(values) -> str:
    return " | ".join(str(v) for v in values)


def clean_data_rows(table: Table, name: str, root: Path, ours: DoctorReport, theirs: CleanvisionResult,
                    hashes: dict[str, int | str], notes: list[str]) -> None:
    table.add(f"{name}: images flagged (clean data)")
    our_flags = transferkit_flags(ours)
    our_pairs = {issue: transferkit_pairs(ours, OURS_FOR[issue]) for issue in ("exact_duplicates", "near_duplicates")}
    cv_flags = theirs.flags() if theirs.lab is not None else {}
    phash = {d: phash_pairs(hashes, d) for d in PHASH_DISTANCES}
    for issue in CLEANVISION_TYPES:
        ours_cell = len(our_flags[issue]) if issue in our_flags else "no check"
        cv_cell = len(cv_flags[issue]) if theirs.lab is not None else theirs.crash
        phash_cell = per_distance(len(images_in(phash[d])) for d in PHASH_DISTANCES) \
            if issue == "near_duplicates" else "-"
        table.add(f"  {issue}", ours_cell, cv_cell, phash_cell)
        if our_flags.get(issue):
            notes.append(f"{name} {issue}, transferkit: " + examples(our_pairs.get(issue, our_flags[issue]), root))
        if cv_flags.get(issue):
            cv_items = theirs.pairs(issue) if issue.endswith("duplicates") else cv_flags[issue]
            notes.append(f"{name} {issue}, cleanvision: " + examples(cv_items, root))
        if issue == "near_duplicates":
            for d in PHASH_DISTANCES:
                if phash[d]:
                    notes.append(f"{name} near_duplicates, phash <={d}: " + examples(phash[d], root))
    others = {k: v for k, v in sorted(ours.totals().items()) if k not in PAIR_KINDS + ("tiny", "extreme_aspect")}
    notes.append(f"{name}, transferkit's other findings (no cleanvision counterpart): {others or 'none'}")
    for kind in others:
        shown = [f for f in ours.findings if f.kind == kind][:3]  # worst first
        notes.append(f"  {kind}: " + "; ".join(f"{short(resolved(f.path), root)} ({f.detail})" for f in shown))


def planted_rows(table: Table, notes: list[str], flowers: Path, cache: Path) -> None:
    """(3) and (4): near-duplicate recall and file problems on the planted folder."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "planted"
        planted, problems = build_planted(flowers, folder)
        files = image_files(folder)
        _, ours = run_transferkit(folder, cache)
        _, looser = run_transferkit(folder, cache, near_duplicate_cosine=LOOSER_COSINE)
        theirs = run_cleanvision(folder)
        crash = theirs.crash
        if crash:  # what a user has to do: leave out the files PIL cannot open, and run it again
            theirs = run_cleanvision(files=[f for f in files if opens(f)])
        _, hashes = run_phash(files)

        everything = set().union(*planted.values())
        found = {"transferkit": transferkit_pairs(ours),
                 "cleanvision": theirs.pairs("exact_duplicates") | theirs.pairs("near_duplicates"),
                 **{f"phash <={d}": phash_pairs(hashes, d) for d in PHASH_DISTANCES},
                 f"transferkit at cosine {LOOSER_COSINE}": transferkit_pairs(looser)}

        def row(label: str, pairs: set[Pair]) -> None:
            table.add(label, len(pairs & found["transferkit"]), len(pairs & found["cleanvision"]),
                      per_distance(len(pairs & found[f"phash <={d}"]) for d in PHASH_DISTANCES))

        table.add(f"planted: {len(files)} files (300 originals, 50 copies): planted pairs found")
        for edit, pairs in planted.items():
            row(f"  {edit} (of {len(pairs)})", pairs)
        row(f"  all edits (of {len(everything)})", everything)
        others = {tool: pairs - everything for tool, pairs in found.items()}
        table.add("  pairs reported that were not planted", *(len(others[t]) for t in ("transferkit", "cleanvision")),
                  per_distance(len(others[f"phash <={d}"]) for d in PHASH_DISTANCES))
        looser_tool = f"transferkit at cosine {LOOSER_COSINE}"
        table.add(f"  at cosine {LOOSER_COSINE}: all edits / not planted",
                  f"{len(everything & found[looser_tool])} / {len(others[looser_tool])}", "-", "-")
        for tool, pairs in others.items():
            if pairs:
                notes.append(f"planted folder, pairs not planted, {tool}: " + examples(pairs, folder))

        table.add("planted file problems: what each reports")
        cv_flags, cv_index = theirs.flags(), set(theirs.lab.issues.index.map(resolved))
        for name, path in problems.items():
            key = resolved(path)
            ours_cell = ",".join(sorted({f.kind for f in ours.findings if resolved(f.path) == key
                                         and f.kind in FILE_KINDS})) or "nothing"
            cv_cell = ",".join(i for i in CLEANVISION_TYPES if key in cv_flags[i]) or (
                "nothing" if key in cv_index else "crash (see below)")
            phash_cell = f"raises {hashes[key]}" if isinstance(hashes[key], str) else "nothing"
            table.add(f"  {name}", ours_cell, cv_cell, phash_cell)
        if crash:
            notes.append(f"planted folder: cleanvision on the whole folder stops with {crash}...; the rows above are "
                         "from a second run on the files PIL can open")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flowers", type=Path, default=DATASETS / "flowers100")
    parser.add_argument("--hymenoptera", type=Path, default=DATASETS / "hymenoptera")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="transferkit's feature cache (kept between runs; default: %(default)s)")
    args = parser.parse_args()
    for folder in (args.flowers, args.hymenoptera):
        if not folder.is_dir():
            sys.exit(f"{folder} not found: pass --flowers / --hymenoptera.")
    started = time.perf_counter()
    table, notes = Table(), []

    # (1) and (2): flowers100 and hymenoptera as they are.
    flowers_files = image_files(args.flowers)
    files_s, _ = run_transferkit(args.flowers, args.cache_dir, use_features=False, use_cache=False)
    first_s, first = run_transferkit(args.flowers, args.cache_dir)
    warm_s, flowers_ours = run_transferkit(args.flowers, args.cache_dir)
    _, flowers_looser = run_transferkit(args.flowers, args.cache_dir, near_duplicate_cosine=LOOSER_COSINE)
    flowers_cv = run_cleanvision(args.flowers)
    phash_s, flowers_hashes = run_phash(flowers_files)
    table.add(f"flowers100 ({len(flowers_files)} images): wall time (s)")
    table.add("  checks without a backbone, no cache", f"{files_s:.1f}", f"{flowers_cv.seconds:.1f}",
              f"{phash_s:.1f}")
    table.add("  full diagnose, warm feature cache", f"{warm_s:.1f}", "-", "-")
    table.add(f"  first full diagnose ({first.features_computed} computed)", f"{first_s:.1f}", "-", "-")
    clean_data_rows(table, "flowers100", args.flowers, flowers_ours, flowers_cv, flowers_hashes, notes)
    looser_pairs = transferkit_pairs(flowers_looser, OURS_FOR["near_duplicates"])
    table.add(f"  near_duplicates, ours at cosine {LOOSER_COSINE}", len(images_in(looser_pairs)), "-", "-")
    if looser_pairs:
        notes.append(f"flowers100 near_duplicates, transferkit at cosine {LOOSER_COSINE}: "
                     + examples(looser_pairs, args.flowers))

    _, hymenoptera_ours = run_transferkit(args.hymenoptera, args.cache_dir)
    hymenoptera_cv = run_cleanvision(args.hymenoptera)
    _, hymenoptera_hashes = run_phash(image_files(args.hymenoptera))
    clean_data_rows(table, "hymenoptera", args.hymenoptera, hymenoptera_ours, hymenoptera_cv, hymenoptera_hashes,
                    notes)

    planted_rows(table, notes, args.flowers, args.cache_dir)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    table.print()
    print("wall time: transferkit = diagnose(use_features=False, use_cache=False), files + exact duplicates; "
          "cleanvision = Imagelab + find_issues() with its 9 default types; phash = open + phash of every file, "
          "one thread a core. Flagged duplicates count images in a reported pair.")
    print("\nexamples (paths relative to each dataset root; up to 3 per tool and issue):")
    for note in notes:
        print(note)
    print(f"\nscript wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
