"""Should cleanvision (or imagehash alone) replace the doctor's hand-written image checks? Numbers to decide with.

The doctor as it is now: file checks, exact duplicates (same bytes), and near duplicates that are pairs whose
mean-centred backbone features have a cosine of 0.97 or more OR whose 256-bit perceptual hashes (imagehash's
`phash(image, hash_size=16)`) differ in at most 12 bits. On ../shared flowers100 (4,317 photos, 5 classes) and
hymenoptera, on a planted folder and on the demo's handwritten digits (both made in a temp dir), it compares
`transferkit.doctor.diagnose` with cleanvision's `Imagelab(...).find_issues()` (default issue types) and with phash
alone, 64 bits (pairs within 4 and within 8 bits) and 256 bits (within 12, the doctor's hashes on their own), both
computed as the doctor does, on the image `transferkit.data.decode_image` gives (a JPEG drafted to >= 64 px):
  (1) wall time on all of flowers100: our file checks + exact duplicates (`use_features=False`, no cache), our full
      diagnose on a warm feature cache (the second call), cleanvision, and phash of every image (one thread a core);
  (2) what each flags on these clean real datasets, per cleanvision issue type (duplicates as pairs), with example
      paths to judge by;
  (3) near-duplicate recall on planted copies: 300 flowers100 images (the first 60 per class) plus 50 edited copies
      (fixed seed; 10 each of JPEG quality 70, resized to 80 % and back, brightness x1.1, 90 % centre crop,
      horizontal flip), a planted pair counting as found when the tool pairs the copy with its original; pairs a
      tool reports that were not planted are counted as false pairs;
  (4) planted file problems in the same folder: a 20x20 image, a 400x40 banner, an empty .jpg and a text file
      named .jpg;
  (5) false alarms on the demo's 1,797 digits (`transferkit.demo.write_digits`; ours at image_size=96, as the demo
      trains): every scan is a different handwritten digit, so every pair a tool reports is a false alarm unless
      its two files are byte-identical.

The feature cache is kept in a folder under the temp dir between runs (--cache-dir), so only the first run on a
machine extracts features (and exports the backbone to ONNX); conclusions the doctor keeps there are dropped before
each diagnose, so every number comes from the doctor's checks as they are now. Takes a few minutes on 2 cores.
Usage: python benchmarks/doctor_image_checks.py [--flowers ../shared/datasets/flowers100]
                                                [--hymenoptera ../shared/datasets/hymenoptera]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from transferkit.data import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, ImageDecodeError, decode_image, read_file
from transferkit.demo import write_digits
from transferkit.doctor import PHASH_DISTANCE, PHASH_SIDE, PHASH_SIZE, DoctorReport, diagnose

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "transferkit-doctor-bench-cache"
SEED = 0
PER_CLASS = 60
EDITS_PER_KIND = 10
DIGITS_IMAGE_SIZE = 96  # the size the demo trains the 32 px digits at
PHASH = {8: (4, 8), PHASH_SIZE: (PHASH_DISTANCE,)}  # hash_size (bits = its square): the distances pairs are taken at
CLEANVISION_TYPES = ("dark", "light", "blurry", "low_information", "odd_aspect_ratio", "odd_size", "grayscale",
                     "exact_duplicates", "near_duplicates")
# Our finding kinds that answer each cleanvision issue type; the types missing here have no counterpart in ours.
OURS_FOR = {"odd_aspect_ratio": ("extreme_aspect",), "odd_size": ("tiny",),
            "exact_duplicates": ("duplicate", "leak_exact", "label_conflict"),
            "near_duplicates": ("near_duplicate", "leak_near")}
PAIR_KINDS = OURS_FOR["exact_duplicates"] + OURS_FOR["near_duplicates"]
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
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def all_pairs(groups) -> set[Pair]:
    found = set()
    for group in groups:
        group = [resolved(p) for p in group]
        found |= {Pair((a, b)) for i, a in enumerate(group) for b in group[i + 1:]}
    return found


# --- the three tools, each reduced to {issue: flagged paths, or pairs for duplicates} ------------------------------

def run_transferkit(root: Path, cache: Path, **options) -> tuple[float, DoctorReport]:
    shutil.rmtree(cache / "doctor", ignore_errors=True)  # its kept conclusions: the checks themselves must run
    started = time.perf_counter()
    with quiet():
        report = diagnose(root, cache_dir=cache, progress=False, **options)
    return time.perf_counter() - started, report


def transferkit_pairs(report: DoctorReport, kinds=PAIR_KINDS) -> set[Pair]:
    return {Pair((resolved(f.path), resolved(f.other))) for f in report.findings if f.kind in kinds and f.other}


def transferkit_items(report: DoctorReport, issue: str) -> set:
    """Pairs for a duplicate issue, else flagged paths, of the finding kinds that answer cleanvision's `issue`."""
    if issue.endswith("duplicates"):
        return transferkit_pairs(report, OURS_FOR[issue])
    return {resolved(f.path) for f in report.findings if f.kind in OURS_FOR[issue]}


class CleanvisionResult:
    def __init__(self, seconds: float, lab, crash: str | None = None):
        self.seconds, self.lab, self.crash = seconds, lab, crash

    def items(self, issue: str) -> set:
        """Pairs for a duplicate issue, else flagged paths."""
        if issue.endswith("duplicates"):
            return all_pairs(self.lab.info[issue]["sets"])
        issues = self.lab.issues
        return {resolved(p) for p in issues.index[issues[f"is_{issue}_issue"]]}

    def duplicate_pairs(self) -> set[Pair]:
        return self.items("exact_duplicates") | self.items("near_duplicates")


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


def _phash(path: Path, hash_size: int) -> np.ndarray | str:
    """The hash's bits as the doctor computes them, or why the file cannot be decoded."""
    try:
        image = decode_image(read_file(path), DEFAULT_MAX_IMAGE_PIXELS, (PHASH_SIDE, PHASH_SIDE))
    except ImageDecodeError as err:
        return err.kind
    return imagehash.phash(image, hash_size=hash_size).hash.ravel()


def phash_pairs(hashes: dict[str, np.ndarray], max_distance: int) -> set[Pair]:
    """Pairs at most `max_distance` bits apart (Hamming distances from a product of +-1 vectors, as the doctor)."""
    paths = list(hashes)
    signs = np.array([hashes[p] for p in paths], dtype=np.float32) * 2 - 1
    found = set()
    for start in range(0, len(signs), 512):
        distance = (signs.shape[1] - signs[start:start + 512] @ signs.T) / 2
        for row, column in zip(*np.nonzero(distance <= max_distance)):
            if column > start + row:
                found.add(Pair((paths[start + row], paths[column])))
    return found


class PhashResult:
    """phash of every file at each hash size in PHASH (one thread a core): seconds per size, pairs per (size,
    distance), and why a file has no hash."""

    def __init__(self, files: list[Path]):
        self.seconds, self.pairs, self.errors = {}, {}, {}
        for size, distances in PHASH.items():
            started = time.perf_counter()
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                hashes = dict(zip(map(resolved, files), pool.map(partial(_phash, hash_size=size), files)))
            self.seconds[size] = time.perf_counter() - started
            self.errors = {path: h for path, h in hashes.items() if isinstance(h, str)}
            hashed = {path: h for path, h in hashes.items() if path not in self.errors}
            for distance in distances:
                self.pairs[size, distance] = phash_pairs(hashed, distance)

    def cells(self, value) -> list[str]:
        """A table cell per hash size: value(pairs) at each of its distances."""
        return [per_distance(value(self.pairs[size, d]) for d in distances) for size, distances in PHASH.items()]

    def named(self) -> dict[str, set[Pair]]:
        return {f"phash {size * size} bits <={d}": pairs for (size, d), pairs in self.pairs.items()}


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


def example_notes(notes: list[str], label: str, found: dict[str, set], root: Path) -> None:
    notes += [f"{label}, {tool}: " + examples(items, root) for tool, items in found.items() if items]


class Table:
    HEADER = ("check", "transferkit", "cleanvision",
              *(f"phash {s * s} bits " + " | ".join(f"<={d}" for d in ds) for s, ds in PHASH.items()))
    WIDTHS = (52, 12, 30, 26, 22)

    def __init__(self):
        self.rows = []

    def add(self, *cells) -> None:
        """A heading (one cell) or a row; the cells left out are shown as '-'."""
        cells = [str(c) for c in cells]
        self.rows.append(cells if len(cells) == 1 else cells + ["-"] * (len(self.HEADER) - len(cells)))

    def print(self) -> None:
        for cells in [self.HEADER] + self.rows:
            if len(cells) == 1:
                print(cells[0])
                continue
            print(f"{cells[0]:<{self.WIDTHS[0]}}" + "".join(f"{c:>{w}}" for c, w in zip(cells[1:], self.WIDTHS[1:])))


def per_distance(values) -> str:
    return " | ".join(str(v) for v in values)


def clean_data_rows(table: Table, name: str, root: Path, ours: DoctorReport, theirs: CleanvisionResult,
                    phash: PhashResult, notes: list[str]) -> None:
    table.add(f"{name}: images flagged, pairs for duplicates (clean data)")
    for issue in CLEANVISION_TYPES:
        ours_items = transferkit_items(ours, issue) if issue in OURS_FOR else None
        cv_items = theirs.items(issue) if theirs.lab is not None else None
        table.add(f"  {issue}", "no check" if ours_items is None else len(ours_items),
                  theirs.crash if cv_items is None else len(cv_items),
                  *(phash.cells(len) if issue == "near_duplicates" else ()))
        found = {"transferkit": ours_items or set(), "cleanvision": cv_items or set()}
        if issue == "near_duplicates":  # and the pairs the others report that ours, exact or near, does not
            rivals = {"cleanvision": found["cleanvision"], **phash.named()}
            found |= phash.named() | {f"{tool}, not paired by transferkit": pairs - transferkit_pairs(ours)
                                      for tool, pairs in rivals.items()}
        example_notes(notes, f"{name} {issue}", found, root)
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
        theirs = run_cleanvision(folder)
        crash = theirs.crash
        if crash:  # what a user has to do: leave out the files PIL cannot open, and run it again
            theirs = run_cleanvision(files=[f for f in files if opens(f)])
        phash = PhashResult(files)

        everything = set().union(*planted.values())
        ours_found, cv_found = transferkit_pairs(ours), theirs.duplicate_pairs()

        def row(label: str, value) -> None:
            table.add(label, value(ours_found), value(cv_found), *phash.cells(value))

        table.add(f"planted: {len(files)} files (300 originals, 50 copies): planted pairs found")
        for edit, pairs in planted.items():
            row(f"  {edit} (of {len(pairs)})", lambda found: len(pairs & found))
        row(f"  all edits (of {len(everything)})", lambda found: len(everything & found))
        row("  pairs reported that were not planted", lambda found: len(found - everything))
        not_planted = {"transferkit": ours_found, "cleanvision": cv_found, **phash.named()}
        example_notes(notes, "planted folder, pairs not planted",
                   {tool: pairs - everything for tool, pairs in not_planted.items()}, folder)

        table.add("planted file problems: what each reports")
        cv_flags = {issue: theirs.items(issue) for issue in CLEANVISION_TYPES if not issue.endswith("duplicates")}
        cv_index = set(theirs.lab.issues.index.map(resolved))
        for name, path in problems.items():
            key = resolved(path)
            ours_cell = ",".join(sorted({f.kind for f in ours.findings if resolved(f.path) == key
                                         and f.kind in FILE_KINDS})) or "nothing"
            cv_cell = ",".join(i for i, flagged in cv_flags.items() if key in flagged) or (
                "nothing" if key in cv_index else "crash (see below)")
            phash_cell = f"no hash ({phash.errors[key]})" if key in phash.errors else "nothing"
            table.add(f"  {name}", ours_cell, cv_cell, *[phash_cell] * len(PHASH))
        if crash:
            notes.append(f"planted folder: cleanvision on the whole folder stops with {crash}...; the rows above are "
                         "from a second run on the files PIL can open")


def digits_rows(table: Table, notes: list[str], cache: Path) -> None:
    """(5): pairs each tool calls duplicates among the demo's digits, and how many of them are the same bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_digits(Path(tmp))
        files = image_files(folder)
        _, ours = run_transferkit(folder, cache, image_size=DIGITS_IMAGE_SIZE)
        theirs = run_cleanvision(folder)
        phash = PhashResult(files)
        by_bytes = defaultdict(list)
        for path in files:
            by_bytes[hashlib.sha256(path.read_bytes()).digest()].append(path)
        identical = all_pairs(by_bytes.values())
        found = {"transferkit": transferkit_pairs(ours), "cleanvision": theirs.duplicate_pairs(), **phash.named()}

        table.add(f"digits (demo, {len(files):,} scans of different digits; {len(identical)} byte-identical pairs)")
        for label, value in (("  pairs called duplicates (exact or near)", len),
                             ("  of which byte-identical (real duplicates)", lambda pairs: len(pairs & identical))):
            table.add(label, value(found["transferkit"]), value(found["cleanvision"]), *phash.cells(value))
        example_notes(notes, "digits, pairs of different bytes",
                   {tool: pairs - identical for tool, pairs in found.items()}, folder)


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
    flowers_cv = run_cleanvision(args.flowers)
    flowers_phash = PhashResult(flowers_files)
    table.add(f"flowers100 ({len(flowers_files)} images): wall time (s)")
    table.add("  checks without a backbone, no cache", f"{files_s:.1f}", f"{flowers_cv.seconds:.1f}",
              *(f"{flowers_phash.seconds[s]:.1f}" for s in PHASH))
    table.add("  full diagnose, warm feature cache", f"{warm_s:.1f}")
    table.add(f"  first full diagnose ({first.features_computed} computed)", f"{first_s:.1f}")
    clean_data_rows(table, "flowers100", args.flowers, flowers_ours, flowers_cv, flowers_phash, notes)

    _, hymenoptera_ours = run_transferkit(args.hymenoptera, args.cache_dir)
    clean_data_rows(table, "hymenoptera", args.hymenoptera, hymenoptera_ours, run_cleanvision(args.hymenoptera),
                    PhashResult(image_files(args.hymenoptera)), notes)

    planted_rows(table, notes, args.flowers, args.cache_dir)
    digits_rows(table, notes, args.cache_dir)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    table.print()
    print("transferkit = diagnose as it is now (near duplicates: features at cosine >= 0.97 or 256-bit phash within "
          f"{PHASH_DISTANCE} bits). Wall time: transferkit = diagnose(use_features=False, use_cache=False), files + "
          "exact duplicates; cleanvision = Imagelab + find_issues() with its 9 default types; phash = decode + phash "
          "of every file, one thread a core. Our near duplicates and cleanvision's leave out exact copies; phash's "
          "pairs include them.")
    print("\nexamples (paths relative to each dataset root; up to 3 per tool and issue):")
    for note in notes:
        print(note)
    print(f"\nscript wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
