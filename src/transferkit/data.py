"""Labelled images: find them in folders or CSVs, split them stably, decode them safely."""

from __future__ import annotations

import csv
import errno
import glob
import hashlib
import io
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit import shards, storage, tables
from transferkit.errors import DataError
from transferkit.multilabel import TAG_COLUMNS, detect_separator, label_matrix, split_labels, unbalanced_quote

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
SPLIT_OF_NAME = {name: split for split, names in SPLIT_FOLDER_NAMES.items() for name in names}
"""A split's name as written in a layout's folder names or in a CSV's split column -> train / val / test."""
CSV_DELIMITERS = ",;\t|"
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
URL_MAX_BYTES = 50_000_000
"""Images given as http(s) URLs: the most that is downloaded, and the time it may take."""
URL_TIMEOUT_S = 30.0
"""Larger images are rejected as likely decompression bombs (a 10,000 x 10,000 photo still passes)."""

# retrain.py's constant: the hash split stays compatible with TensorFlow's retrain.py.
_MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1
log = logging.getLogger(__name__)
_HEADER_WORDS = {"path", "file", "filename", "file_name", "filepath", "image", "image_path", "img", "image_name",
                 "image_id", "label", "class", "category", "target", "y", "split", *TAG_COLUMNS}
_SPLIT_WORDS = {"split", "subset", "fold"}
ONE_HOT_VALUES = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0}


@dataclass(frozen=True)
class Sample:
    path: Path | str
    """A local file, or a URL (s3://, gs://, ...), a shard member (shard.tar#member) or a table row (table://...)."""
    label: str | tuple[str, ...]
    """The class, or in multi-label data the tuple of the image's labels (possibly empty)."""

    @property
    def labels(self) -> tuple[str, ...]:
        """Every label of the image (one for single-label data)."""
        return self.label if isinstance(self.label, tuple) else (self.label,)


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class Dataset:
    """Samples per split with one class list; `skipped` holds files that could not be used."""

    classes: list[str]
    splits: dict[str, list[Sample]]
    skipped: list[Skipped] = field(default_factory=list)
    multi_label: bool = False
    """Each image has a set of labels (`Sample.label` a tuple): targets are an (images, classes) 0/1 matrix."""
    label_sep: str | None = None
    """The separator of the labels in the CSV's label field, as detected or given (None: one label a field)."""

    def targets(self, split: str) -> np.ndarray:
        if self.multi_label:
            return label_matrix([s.labels for s in self.splits[split]], self.classes)
        index = {name: i for i, name in enumerate(self.classes)}
        return np.array([index[s.label] for s in self.splits[split]], dtype=np.int64)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class per split (in multi-label data an image counts for each of its labels)."""
        return {name: dict(Counter(label for s in samples for label in s.labels))
                for name, samples in self.splits.items()}


# ---------------------------------------------------------------------------------------------- splitting


def hash_split(path: str | Path, val_percent: float, test_percent: float) -> str:
    """The split a file belongs to, from its name alone (retrain.py's rule).

    Anything after ``_nohash_`` in the file name is ignored, so variants of one picture stay together, and
    adding files never moves existing ones to another split.
    """
    path = str(path).rsplit(shards.MEMBER_MARK, 1)[-1] if shards.is_member(str(path)) else path
    name = re.sub(r"_nohash_.*$", "", Path(path).name)
    digest = int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16)
    percentage = (digest % (_MAX_NUM_IMAGES_PER_CLASS + 1)) * (100.0 / _MAX_NUM_IMAGES_PER_CLASS)
    if percentage < val_percent:
        return "val"
    if percentage < val_percent + test_percent:
        return "test"
    return "train"


# ---------------------------------------------------------------------------------------------- discovery


@dataclass
class _Listing:
    samples: list[Sample]
    skipped: list[Skipped]
    empty_classes: list[str]
    split_column: dict[Path, str] = field(default_factory=dict)
    multi_label: bool = False
    label_sep: str | None = None
    declared_classes: list[str] = field(default_factory=list)
    """The classes a one-hot header names (some may have no image)."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in {"Thumbs.db", "desktop.ini", "__MACOSX"}


def _walk_files(top: Path, listed: dict[tuple[int, int], Path] | None = None) -> tuple[list[Path], list[Skipped]]:
    """Every non-hidden file under `top`, in os.walk order, and the folders that could not be listed.

    Symbolic links to folders are followed (like torchvision's ImageFolder), but each real folder is listed once
    (`listed`: the folders already listed, by device and inode): a link back to a parent folder cannot loop, and a
    second link to one folder does not list it twice.
    """
    files: list[Path] = []
    skipped: list[Skipped] = []
    listed = {} if listed is None else listed
    pending = [top]
    while pending:
        folder = pending.pop()
        try:
            status = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as err:
            skipped.append(Skipped(str(folder), f"folder cannot be listed: {err.strerror or err}"))
            continue
        identity = (status.st_dev, status.st_ino)
        if identity in listed:
            skipped.append(Skipped(str(folder), f"symbolic link to {listed[identity]}, which is already listed "
                                                "(a link loop or a second link to one folder); not followed"))
            continue
        listed[identity] = folder
        entries = [entry for entry in entries if not _is_hidden(entry.name)]
        files += [folder / entry.name for entry in entries if not _is_folder(entry)]
        pending += reversed([folder / entry.name for entry in entries if _is_folder(entry)])
    return files, skipped


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


_loose_images_reported: set[Path] = set()


def _warn_loose_images(root: Path, count: int) -> None:
    """Said once per folder and process: training, its doctor and its report each read the same folder."""
    if root.resolve() not in _loose_images_reported:
        _loose_images_reported.add(root.resolve())
        log.warning("%d images directly in %s are not in a class subfolder and are ignored; move them into the "
                    "subfolder of their class", count, root)


def _list_class_folders(root: Path) -> _Listing:
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    empty: list[str] = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))
    loose = sum(p.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(p.name) and p.is_file() for p in root.iterdir())
    if loose and not class_dirs:
        raise DataError(f"{root} holds {loose} images but no class subfolders; images must sit in one subfolder per "
                        f"class, e.g. {root / 'cats' / '1.jpg'} and {root / 'dogs' / '2.jpg'}.")
    if loose:
        _warn_loose_images(root, loose)
    status = root.stat()
    listed = {(status.st_dev, status.st_ino): root}
    for class_dir in class_dirs:
        files, unlisted = _walk_files(class_dir, listed)
        skipped += unlisted
        if unlisted and unlisted[0].path == str(class_dir):
            continue  # the class folder is a link to a folder already listed: reported, not a class
        found = 0
        for path in files:
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append(Sample(path, class_dir.name))
                found += 1
            else:
                skipped.append(Skipped(str(path), f"not an image file type ({path.suffix or 'no extension'})"))
        if found == 0:
            empty.append(class_dir.name)
    return _Listing(samples, skipped, empty)


def _csv_delimiter(text: str) -> str:
    """The CSV's delimiter among , ; tab and | (csv.Sniffer on its first lines); "," when the sniffer cannot tell."""
    sample = text[:65536].rsplit("\n", 1)[0] if len(text) > 65536 else text
    try:
        return csv.Sniffer().sniff(sample, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","


def _csv_rows(text: str) -> list[tuple[int, list[str]]]:
    """The CSV's non-blank rows, each with the file line it starts on. Fields quoted with ' ('a, b.jpg',cat) are read
    as quoted only when that makes more rows start with an image path than the standard " reading does: a label
    written 'b' in a standard CSV stays 'b', and a name that merely starts with an apostrophe ('t Hooft.jpg) is not
    quoting."""
    delimiter = _csv_delimiter(text)

    def read(quotechar: str) -> list[tuple[int, list[str]]]:
        reader = csv.reader(io.StringIO(text), delimiter=delimiter, quotechar=quotechar, skipinitialspace=True)
        rows, line = [], 1
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((line, row))
            line = reader.line_num + 1
        return rows

    def image_paths(rows: list[tuple[int, list[str]]]) -> int:
        return sum(_is_image_name(row[0]) for _, row in rows)

    standard = read('"')
    if "'" not in text:
        return standard
    single = read("'")
    return single if image_paths(single) > image_paths(standard) else standard


def _is_image_name(text: str) -> bool:
    return Path(text.strip()).suffix.lower() in IMAGE_EXTENSIONS


def _looks_like_header(row: list[str], base: Path | str) -> bool:
    first = row[0].strip()
    words = first.lower() in _HEADER_WORDS or row[1].strip().lower() in _HEADER_WORDS
    return words and (isinstance(base, str) or not (base / first).exists())


def _split_named(value: str, where: str) -> str | None:
    """The split a CSV's or a table's split column names (None when empty); any spelling a split folder may have.
    `where` names the row for the error."""
    if not value.strip():
        return None
    if value.strip().lower() not in SPLIT_OF_NAME:
        raise DataError(f"{where}: unknown split {value!r}; write train, val or test (or training, "
                        "valid, validation, testing).")
    return SPLIT_OF_NAME[value.strip().lower()]


def _read_csv(csv_path: Path | str, multi_label: bool | None = None, label_sep: str | None = None) -> _Listing:
    """A CSV's samples: rows of path,label[,split] (the label field may hold several labels: `label_sep`, else a
    separator `multilabel.detect_separator` finds), or a header of path and class names with 0/1 one-hot columns
    (and optionally a split column). `multi_label`: None detects it, True forces label sets, False one label an
    image. A CSV at a store URL holds paths relative to its own folder there, or full URLs."""
    remote = storage.is_store_url(csv_path)
    if remote:
        text = _listing_or_fail(storage.read_text, csv_path)
        base: Path | str = storage.parent(csv_path)
    else:
        try:
            text = csv_path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise DataError(f"{csv_path} is not a UTF-8 text file ({err.reason}); save the CSV as UTF-8.") from err
        base = csv_path.parent
    csv_name = storage.base_name(csv_path) if remote else csv_path.name
    rows = _csv_rows(text)
    header = None
    if rows and len(rows[0][1]) >= 2 and _looks_like_header(rows[0][1], base):
        header, rows = [cell.strip() for cell in rows[0][1]], rows[1:]
    one_hot = _one_hot_columns(header, rows[0][1] if rows else []) if multi_label is not False else {}
    split_at = next((i for i, name in enumerate(header or []) if name.lower() in _SPLIT_WORDS),
                    None if one_hot else 2)
    if one_hot:
        fields = None
        separator = None
    else:
        fields = [row[1].strip() for _, row in rows if len(row) >= 2]
        separator = (None if multi_label is False else label_sep if label_sep else
                     detect_separator(fields, header[1] if header else None))
    multi = bool(one_hot) or separator is not None or multi_label is True
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    split_column: dict[Path, str] = {}
    for line, row in rows:
        if len(row) < 2 or not row[0].strip() or (one_hot and len(row) < len(header)):
            skipped.append(Skipped(f"{csv_path}:{line}", f"malformed row {row!r}: expected "
                                                         f"{','.join(header) if one_hot else 'path,label'}"))
            continue
        if one_hot:
            label: str | tuple[str, ...] = _one_hot_labels(csv_path, line, row, one_hot)
        elif not row[1].strip() and not multi:
            if multi_label is False:
                raise DataError(f"{csv_path} line {line}: the label field is empty, and every image needs one label "
                                "here; label it, or drop --single-label if an image may have no label.")
            skipped.append(Skipped(f"{csv_path}:{line}", "empty label: every image needs one (with --multi-label an "
                                                          "empty field means an image with no label)"))
            continue
        elif multi:
            label = split_labels(row[1], separator)
            cut = unbalanced_quote(label)
            if cut is not None:
                raise DataError(f"{csv_path} line {line}: the label separator {separator!r} also occurs inside the "
                                f"quoted label name around {cut!r}; give another separator (--label-sep) or "
                                "rename the label.")
        else:
            label = row[1].strip()
        path = _csv_path(row[0].strip(), base)
        suffix = Path(str(path)).suffix
        if suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(Skipped(str(path), f"not an image file type ({suffix or 'no extension'})"))
            continue
        if isinstance(path, Path) and not path.exists() and not path.is_symlink():
            skipped.append(Skipped(str(path), f"file not found (line {line} of {csv_name})"))
            continue
        samples.append(Sample(path, label))
        split = (_split_named(row[split_at], f"{csv_path} line {line}") if split_at is not None and len(row) > split_at
                 else None)
        if split is not None:
            split_column[path] = split
    if not samples:
        raise DataError(_no_images_in_csv(csv_path, rows, skipped))
    return _Listing(samples, skipped, [], split_column, multi, separator, list(one_hot.values()))


def _csv_path(written: str, base: Path | str) -> Path | str:
    """A CSV's path field: a URL as it is, else relative to the CSV's folder (local, or at its store URL)."""
    if storage.is_store_url(written) or is_url(written):
        return written
    if isinstance(base, str):
        return storage.join(base, written)
    path = Path(written)
    return path if path.is_absolute() else base / path


def _listing_or_fail(action: Callable, url: str):
    """A listing or read of the data itself: failing for good is the run's one-line error, not a skipped file."""
    try:
        return action(url)
    except storage.StorageError as err:
        raise DataError(f"{err}.") from None


def _one_hot_columns(header: list[str] | None, first_row: list[str]) -> dict[int, str]:
    """Column index -> class name for a header of a path column followed by class names whose first row holds 0s
    and 1s: a one-hot CSV. Empty for any other header (`image,species,split` with `cat` under species is path,label)."""
    if header is None or len(header) < 3 or header[1].lower() in _HEADER_WORDS:
        return {}
    columns = {i: name for i, name in enumerate(header) if i > 0 and name.lower() not in _SPLIT_WORDS}
    if not all(i < len(first_row) and first_row[i].strip() in ONE_HOT_VALUES for i in columns):
        return {}
    return columns


def _one_hot_labels(csv_path: Path, line: int, row: list[str], columns: dict[int, str]) -> tuple[str, ...]:
    labels = []
    for i, name in columns.items():
        value = ONE_HOT_VALUES.get(row[i].strip())
        if value is None:
            raise DataError(f"{csv_path} line {line}, column {name!r}: {row[i].strip()!r} is not 0 or 1; one-hot "
                            "columns hold 1 where the image has the class and 0 where it has not.")
        if value:
            labels.append(name)
    return tuple(labels)


def _no_images_in_csv(csv_path: Path, rows: list[tuple[int, list[str]]], skipped: list[Skipped]) -> str:
    """Why a CSV gave no image: label,path columns, files that are not there, or no path,label rows at all."""
    if any(len(row) >= 2 and _is_image_name(row[1]) and not _is_image_name(row[0]) for _, row in rows):
        return (f"{csv_path} has the image paths in its second column (label,path); write rows as path,label "
                "(path first, relative to the CSV).")
    missing = [s for s in skipped if s.reason.startswith("file not found")]
    if missing:
        return (f"none of the image files {csv_path} lists exists (first: {missing[0].path}, "
                f"{missing[0].reason.removeprefix('file not found (')}; paths are relative to the CSV's folder.")
    return (f"{csv_path} lists no image files; expected rows of path,label (paths relative to the CSV), "
            "separated by , ; tab or |.")


def _find_split_folders(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in SPLIT_FOLDER_NAMES.items():
        for name in names:
            if (root / name).is_dir():
                found[split] = root / name
                break
    return found if "train" in found else {}


@dataclass
class _Source:
    samples: dict[str, list[Sample]]
    """Samples per split ("train"/"val"/"test"), or under "all" when the source does not fix its splits."""
    skipped: list[Skipped]
    empty_classes: list[str]
    multi_label: bool = False
    label_sep: str | None = None
    declared_classes: list[str] = field(default_factory=list)

    @property
    def fixes_splits(self) -> bool:
        return "all" not in self.samples


def _read_source(source: Path | str, multi_label: bool | None = None, label_sep: str | None = None) -> _Source:
    """Samples of one source: a local folder or CSV, the same at a store URL, WebDataset shards, or a table."""
    text = str(source)
    if text.startswith("file://"):
        source = text = text.removeprefix("file://")
    if text.startswith(tables.PREFIX):
        return _read_table(text)
    if _names_shards(text):
        return _read_shards(shards.list_shards(text if storage.is_store_url(text) else
                                               str(Path(text).expanduser())))
    if storage.is_store_url(text):
        return _read_store(text, multi_label, label_sep)
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"{source} does not exist; give a folder of class subfolders, a folder with train/ "
                        "(and val/, test/), a CSV of path,label rows, WebDataset shards, or an s3:// (gs://, az://) "
                        "URL of any of these.")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source} is a file but not a .csv; give a folder of class subfolders or a CSV.")
        return _csv_source(_read_csv(source, multi_label, label_sep))
    _refuse_label_sep(source, label_sep)
    split_folders = _find_split_folders(source)
    if not split_folders:
        listing = _list_class_folders(source)
        return _Source({"all": listing.samples}, listing.skipped, listing.empty_classes)
    listings = {split: _list_class_folders(folder) for split, folder in split_folders.items()}
    return _Source({split: listing.samples for split, listing in listings.items()},
                   [s for listing in listings.values() for s in listing.skipped], listings["train"].empty_classes)


def _refuse_label_sep(source: Path | str, label_sep: str | None) -> None:
    if label_sep:
        raise DataError(f"--label-sep separates the labels of a CSV's label field; {source} is a folder, where each "
                        "image has its class folder's name. Give a CSV for several labels an image.")


def _csv_source(listing: _Listing) -> _Source:
    by_split: dict[str, list[Sample]] = {}
    for sample in listing.samples:
        split = listing.split_column.get(sample.path, "train") if listing.split_column else "all"
        by_split.setdefault(split, []).append(sample)
    return _Source(by_split, listing.skipped, [], listing.multi_label, listing.label_sep, listing.declared_classes)


def _names_shards(source: str) -> bool:
    """A shard pattern or .tar (local or URL), or a local folder of only shards (a prefix is told by its listing)."""
    return shards.is_shard_pattern(source) or (not storage.is_store_url(source) and
                                               _only_shards(Path(source).expanduser()))


def _only_shards(folder: Path) -> bool:
    """A folder holding .tar files and nothing else but a classes.txt is read as WebDataset shards."""
    if not folder.is_dir():
        return False
    names = [p.name for p in folder.iterdir() if not _is_hidden(p.name)]
    tars = [n for n in names if n.lower().endswith(shards.SHARD_SUFFIX)]
    return bool(tars) and all(n in tars or n == shards.CLASSES_FILE for n in names)


def _read_shards(shard_names: list[str]) -> _Source:
    """Samples of WebDataset shards, split by the shards' names (train-000000.tar, val-...) where they say it."""
    from transferkit.progress import progress_bar

    bar = progress_bar(len(shard_names), "Indexing shards", "shard", None if len(shard_names) > 1 else False)
    with ThreadPoolExecutor(max_workers=min(8, len(shard_names)), thread_name_prefix="transferkit-shard") as pool:
        indexed = []
        for members in pool.map(shards.index_shard, shard_names):
            indexed.append(members)
            bar.update()
    bar.close()
    named = {}
    for shard in shard_names:
        base, folder = shards.split_words(shard)
        named[shard] = SPLIT_OF_NAME.get(base) or SPLIT_OF_NAME.get(folder)
    fixed = any(split is not None for split in named.values())
    by_split: dict[str, list[Sample]] = {}
    for shard, members in zip(shard_names, indexed):
        split = (named[shard] or "train") if fixed else "all"
        by_split.setdefault(split, []).extend(Sample(m.ref, m.label) for m in members)
    for samples in by_split.values():  # by member name, as a folder's files are ordered, however the shards shuffled
        samples.sort(key=lambda s: str(s.path).rsplit(shards.MEMBER_MARK, 1)[1])
    if not any(by_split.values()):
        raise DataError(f"the shards {shard_names[0]} ... hold no images; check that they are WebDataset shards.")
    multi = any(isinstance(s.label, tuple) for samples in by_split.values() for s in samples)
    return _Source(by_split, [], [], multi)


def _read_table(name: str) -> _Source:
    found = tables.table(name)
    by_split: dict[str, list[Sample]] = {}
    for row, (path, label, split) in enumerate(zip(found.images, found.labels, found.splits)):
        named = _split_named(str(split), f"row {row} of the table's split column") if split is not None else None
        where = "all" if not any(found.splits) else (named or "train")
        item = tables.row_ref(found.name, row) if path is None else (path if is_remote(path) else Path(path))
        by_split.setdefault(where, []).append(Sample(item, label))
    multi = any(isinstance(label, tuple) for label in found.labels)
    return _Source(by_split, [], [], multi)


def _read_store(url: str, multi_label: bool | None, label_sep: str | None) -> _Source:
    """A CSV, or a folder of class folders (or train/ val/ test/ prefixes), at a store URL: read as local ones are."""
    if url.lower().endswith(".csv"):
        return _csv_source(_read_csv(url, multi_label, label_sep))
    _refuse_label_sep(url, label_sep)
    root = url.rstrip("/") + "/"
    objects = _listing_or_fail(storage.list_objects, root)
    relative = [(o.url[len(root):].split("/"), o.url) for o in objects if o.url.startswith(root)]
    relative = [(parts, u) for parts, u in relative if not any(_is_hidden(p) for p in parts)]
    names = [parts[-1] for parts, _ in relative if len(parts) == 1]
    if names and all(n.lower().endswith(shards.SHARD_SUFFIX) or n == shards.CLASSES_FILE for n in names) and \
            len(names) == len(relative):
        return _read_shards([u for parts, u in relative if parts[-1].lower().endswith(shards.SHARD_SUFFIX)])
    tops = {parts[0] for parts, _ in relative if len(parts) > 1}
    if any(SPLIT_OF_NAME.get(top.lower()) == "train" for top in tops):
        by_split: dict[str, list[Sample]] = {}
        skipped: list[Skipped] = []
        for top in sorted(tops):
            split = SPLIT_OF_NAME.get(top.lower())
            if split is not None and split not in by_split:
                samples, dropped = _store_class_folders(url, [(p[1:], u) for p, u in relative if p[0] == top])
                by_split[split] = samples
                skipped += dropped
        return _Source(by_split, skipped, [])
    samples, skipped = _store_class_folders(url, relative)
    return _Source({"all": samples}, skipped, [])


def _store_class_folders(url: str, relative: list[tuple[list[str], str]]) -> tuple[list[Sample], list[Skipped]]:
    """Objects below a prefix as class folders: the first part of each key is the class."""
    loose = [u for parts, u in relative if len(parts) == 1 and Path(parts[0]).suffix.lower() in IMAGE_EXTENSIONS]
    inside = [(parts, u) for parts, u in relative if len(parts) > 1]
    if loose and not inside:
        raise DataError(f"{storage.redact(url)} holds {len(loose)} images but no class prefixes; images must sit "
                        "under one prefix per class, e.g. .../cats/1.jpg and .../dogs/2.jpg.")
    if loose:
        log.warning("%d images directly under %s are not under a class prefix and are ignored", len(loose),
                    storage.redact(url))
    samples, skipped = [], []
    for parts, item in inside:
        suffix = Path(parts[-1]).suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            samples.append(Sample(item, parts[0]))
        else:
            skipped.append(Skipped(storage.redact(item), f"not an image file type ({suffix or 'no extension'})"))
    return samples, skipped


def _as_label_sets(samples: list[Sample]) -> list[Sample]:
    """Single-label samples (a folder, or a CSV of one label a row) as label sets of one, for multi-label training."""
    return [s if isinstance(s.label, tuple) else Sample(s.path, (s.label,)) for s in samples]


def _sort_classes(labels: set[str]) -> list[str]:
    if labels and all(re.fullmatch(r"-?\d+", label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def load_dataset(
    data: str | Path,
    val: str | Path | None = None,
    test: str | Path | None = None,
    val_percent: float = 10.0,
    test_percent: float = 10.0,
    multi_label: bool | None = None,
    label_sep: str | None = None,
) -> Dataset:
    """Read DATA (and explicit --val / --test sources) into train/val/test samples with one sorted class list.

    Splits that DATA does not provide itself are carved from it by `hash_split`. A train/ layout without val/
    gets a validation split carved from train; its missing test split is left out (the layout is the user's).

    `multi_label`: None detects label sets (a CSV field with several labels, or one-hot columns); True forces them
    (an image may then have no label); False reads one label an image. `label_sep`: the separator of a CSV's label
    field (default: detected).
    """
    if not (0 <= val_percent < 100 and 0 <= test_percent < 100 and val_percent + test_percent < 100):
        raise DataError("--val-percent and --test-percent must be between 0 and 100 and leave images to train on.")
    if tables.is_table(data):
        data = tables.register(data)
    source = _read_source(data, multi_label, label_sep)
    skipped = list(source.skipped)
    if source.fixes_splits:
        splits = dict(source.samples)
    else:
        splits = {}
        carve_val = 0.0 if val is not None else val_percent
        carve_test = 0.0 if test is not None else test_percent
        for sample in source.samples["all"]:
            splits.setdefault(hash_split(sample.path, carve_val, carve_test), []).append(sample)
    if "val" not in splits and val is None and source.fixes_splits and val_percent > 0:
        carved: dict[str, list[Sample]] = {}
        for sample in splits.get("train", []):
            carved.setdefault(hash_split(sample.path, val_percent, 0.0), []).append(sample)
        splits["train"], splits["val"] = carved.get("train", []), carved.get("val", [])
    for name, extra in (("val", val), ("test", test)):
        if extra is not None:
            extra_source = _read_source(extra, multi_label, label_sep or source.label_sep)
            splits[name] = [s for samples in extra_source.samples.values() for s in samples]
            skipped += extra_source.skipped
    if source.multi_label or multi_label:
        return _label_sets(data, {k: _as_label_sets(v) for k, v in splits.items()}, skipped, source)

    empty = source.empty_classes
    if empty:
        raise DataError(f"class folder(s) with no images: {', '.join(empty)}; add images or remove the folder(s).")
    train_labels = {s.label for s in splits.get("train", [])}
    if len(train_labels) < 2:
        raise DataError(_too_few_classes(data, train_labels))
    for name in ("val", "test"):
        unknown = sorted({s.label for s in splits.get(name, [])} - train_labels)
        if unknown:
            raise DataError(f"the {name} split has classes with no training images: {', '.join(unknown[:10])}; "
                            "add training images for them or remove them from that split.")
    return Dataset(_sort_classes(train_labels), {k: v for k, v in splits.items() if v}, skipped)


def _label_sets(data: str | Path, splits: dict[str, list[Sample]], skipped: list[Skipped], source: _Source) -> Dataset:
    """A multi-label dataset: the classes are the labels that occur in training; one line says what was found, and a
    warning names the classes that cannot be learnt (no training image has them: they are left out)."""
    trained = Counter(label for s in splits.get("train", []) for label in s.labels)
    if len(trained) < 2:
        raise DataError(_too_few_classes(data, set(trained)))
    elsewhere = {label for name in ("val", "test") for s in splits.get(name, []) for label in s.labels}
    unlearnable = sorted((elsewhere | set(source.declared_classes)) - set(trained))
    if unlearnable:
        log.warning("%d class(es) never occur in the training images and cannot be learnt; they are left out: %s",
                    len(unlearnable), ", ".join(unlearnable[:10]) + (", ..." if len(unlearnable) > 10 else ""))
    images = [s for part in splits.values() for s in part]
    several, unlabelled = sum(len(s.labels) > 1 for s in images), sum(not s.labels for s in images)
    how = ("one-hot columns" if source.declared_classes else
           f"labels separated by {source.label_sep!r}" if source.label_sep else "--multi-label")
    log.info("multi-label data (%s): %d classes, %d of %d images with several labels, %d with none; one sigmoid per "
             "class", how, len(trained), several, len(images), unlabelled)
    return Dataset(_sort_classes(set(trained)), {k: v for k, v in splits.items() if v}, skipped, True,
                   source.label_sep)


def _too_few_classes(data: Path | str, labels: set[str]) -> str:
    """Why DATA cannot train: no class, or one; a single class folder whose own subfolders look like the classes is
    named as the folder that was probably meant."""
    needed = "at least 2 are needed (one subfolder per class, or a CSV with at least two labels)."
    if not labels:
        return f"found no class with training images in {data}; {needed}"
    label = next(iter(labels))
    if is_remote(str(data)) or str(data).startswith(tables.PREFIX):
        return f"found 1 class, {label!r}, with training images in {storage.redact(str(data))}; {needed}"
    data = Path(data)
    inner = data / label
    if inner.is_dir() and sum(p.is_dir() and not _is_hidden(p.name) for p in inner.iterdir()) >= 2:
        return f"found 1 class, {label!r}, in {data}: did you mean {inner}? (its subfolders look like classes)"
    return f"found 1 class, {label!r}, with training images in {data}; {needed}"


def _expanded(source: str | Path) -> list[Path]:
    """`source` as a path, or the paths its wildcards (*, ?, [...]) match when it names no file itself."""
    path = Path(source)
    if path.exists() or not any(c in str(source) for c in "*?["):
        return [path]
    matches = sorted(glob.glob(str(source), recursive=True))
    if not matches:
        log.warning("no files match %s", source)
    return [Path(match) for match in matches]


def list_images(sources: list[str | Path]) -> list[Path | str]:
    """Image files named by paths: files as given, folders searched recursively, CSVs read (first column),
    wildcards expanded (photos/*.jpg), http(s) URLs kept as they are; store URLs the same way (an object, a prefix,
    a CSV), and WebDataset shards give their image members. Folders and CSV rows that cannot be used are logged as
    warnings."""
    paths: list[Path | str] = []
    skipped: list[Skipped] = []
    for source in [s for item in sources for s in ([item] if is_remote(str(item)) else _expanded(item))]:
        if _names_shards(str(source)):
            paths += [s.path for samples in _read_source(source).samples.values() for s in samples]
        elif is_url(source):
            paths.append(source)
        elif storage.is_store_url(source):
            paths += _store_images(source, skipped)
        elif source.is_dir():
            files, unlisted = _walk_files(source)
            paths += [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
            skipped += unlisted
        elif source.suffix.lower() == ".csv" and source.is_file():
            listing = _read_csv(source)
            paths += [s.path for s in listing.samples]
            skipped += listing.skipped
        else:
            paths.append(source)
    for item in skipped:
        log.warning("skipped %s: %s", item.path, item.reason)
    return paths


def _store_images(url: str, skipped: list[Skipped]) -> list[str]:
    """The images a store URL names: the object itself, a CSV's rows, or every image below a prefix."""
    if url.lower().endswith(".csv"):
        listing = _read_csv(url)
        skipped += listing.skipped
        return [s.path for s in listing.samples]
    if Path(url).suffix.lower() in IMAGE_EXTENSIONS and storage.is_object(url):
        return [url]
    objects = _listing_or_fail(storage.list_objects, url.rstrip("/") + "/")
    return [o.url for o in objects if Path(o.url).suffix.lower() in IMAGE_EXTENSIONS
            and not any(_is_hidden(part) for part in o.url.split("/"))]


# ---------------------------------------------------------------------------------------------- decoding


_PIL_RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                   "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                   "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the backbone's input tensor (from timm's pretrained_cfg)."""

    input_size: tuple[int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str = "center"

    @classmethod
    def from_timm(cls, model_or_cfg: object, image_size: int | None = None) -> Preprocessing:
        """timm's evaluation preprocessing at its test resolution (`test_input_size` when the model has one)."""
        import timm

        if not isinstance(model_or_cfg, dict):
            cfg = timm.data.resolve_data_config({}, model=model_or_cfg, use_test_size=True)
        else:
            cfg = timm.data.resolve_data_config(pretrained_cfg=model_or_cfg, use_test_size=True)
        size = (image_size, image_size) if image_size else tuple(cfg["input_size"][1:])
        return cls(size, cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"]),
                   float(cfg["crop_pct"]), cfg.get("crop_mode", "center"))

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        return cls(tuple(values["input_size"]), values["interpolation"], tuple(values["mean"]), tuple(values["std"]),
                   float(values["crop_pct"]), values.get("crop_mode", "center"))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def resize_size(self) -> int:
        """Short side before the centre crop."""
        return math.floor(max(self.input_size) / self.crop_pct)

    def transform(self, normalize: bool = True) -> Callable:
        """timm's evaluation transform: PIL RGB image -> normalised CHW float tensor (uint8 if not `normalize`)."""
        import timm.data

        return timm.data.create_transform(input_size=(3, *self.input_size), is_training=False,
                                          interpolation=self.interpolation, mean=self.mean, std=self.std,
                                          crop_pct=self.crop_pct, crop_mode=self.crop_mode,
                                          use_prefetcher=not normalize)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float] | None:
        """The region of a width x height image that timm's resize + centre crop maps onto the input.

        None for the modes this does not model (non-square centre crops, 'border'); `pixels` then runs timm's own
        transform.
        """
        out_h, out_w = self.input_size
        scale_h, scale_w = (math.floor(side / self.crop_pct) for side in self.input_size)
        if self.crop_mode == "squash":
            new_w, new_h = scale_w, scale_h
        elif self.crop_mode == "center" and out_h == out_w:
            # torchvision Resize(int): the short side becomes scale_h, the long side is truncated, not rounded.
            new_w, new_h = (scale_h, int(scale_h * height / width)) if width <= height else \
                (int(scale_h * width / height), scale_h)
        else:
            return None
        left, top = int(round((new_w - out_w) / 2.0)), int(round((new_h - out_h) / 2.0))
        sx, sy = width / new_w, height / new_h
        return left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy

    def pixels(self, image: Image.Image) -> np.ndarray:
        """PIL RGB image -> uint8 HWC input crop; normalisation happens batched in the engine.

        Resizing only the cropped region (PIL's `box`) gives timm's result to within a grey level or so at about
        half the cost of resizing the whole picture and cropping afterwards.
        """
        box = self.crop_box(*image.size)
        if box is None:
            return self.transform(normalize=False)(image).permute(1, 2, 0).numpy()
        height, width = self.input_size
        return np.array(image.resize((width, height), _PIL_RESAMPLING[self.interpolation], box=box))




class ImageDecodeError(Exception):
    """A file that cannot be used as an image; the message is the reason shown to the user.

    `kind` says which way it failed (empty, not_image, too_large, corrupt, unreadable), so a server can answer
    with the right HTTP status.
    """

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # Pillow's own convert() clips 16-bit values at 255 instead of scaling them.
        array = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        array = array * 255.0 if array.max(initial=0.0) <= 1.0 else array
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode image bytes into an upright RGB picture, or raise ImageDecodeError saying why not.

    `draft_size` lets JPEG decoding downscale by 2/4/8 on the fly while staying at least that large, which makes
    big photos several times cheaper to read.
    """
    if not data:
        raise ImageDecodeError("empty file", "empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the {max_pixels:,}-pixel limit "
                                       "(possible decompression bomb)", "too_large")
            if width < 1 or height < 1:
                raise ImageDecodeError(f"image has no pixels ({width}x{height})")
            if draft_size is not None and image.format == "JPEG":
                image.draft(image.mode, draft_size)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"possible decompression bomb: {err}", "too_large") from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not an image (unrecognised format)", "not_image") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageDecodeError(f"corrupt or truncated image: {err}") from err
    except Exception as err:  # any other decoder failure must skip this file, never stop the run
        raise ImageDecodeError(f"cannot decode image: {type(err).__name__}: {err}") from err


def read_file(path: Path) -> bytes:
    """File bytes, or ImageDecodeError with a reason a person understands."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as err:
        if Path(path).is_symlink():
            raise ImageDecodeError(f"broken symbolic link (to {os.readlink(path)})", "unreadable") from err
        raise ImageDecodeError("file not found", "unreadable") from err
    except PermissionError as err:
        raise ImageDecodeError("permission denied", "unreadable") from err
    except IsADirectoryError as err:
        raise ImageDecodeError("is a folder, not a file", "unreadable") from err
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageDecodeError("symbolic link loop (the link leads back to itself)", "unreadable") from err
        raise ImageDecodeError(f"cannot read file: {err.strerror or err}", "unreadable") from err


def is_url(item: object) -> bool:
    return isinstance(item, str) and item.lower().startswith(("http://", "https://"))


def is_remote(item: object) -> bool:
    """Anything but a local file: an http(s) or store URL, a shard member, a table row."""
    return is_url(item) or storage.is_store_url(item) or shards.is_member(item) or tables.is_row(item)


def read_item(item: Path | str) -> bytes:
    """The encoded bytes of an image wherever it is (local file, http(s) or store URL, shard member, table row), or
    ImageDecodeError with a reason a person understands."""
    try:
        if shards.is_member(item):
            return shards.read_member(item)
        if tables.is_row(item):
            return tables.read_row(item)
        if is_url(item):
            return read_url(item)
        if storage.is_store_url(item):
            return storage.read_bytes(item)
    except storage.StorageError as err:
        raise ImageDecodeError(str(err).replace(f" {storage.redact(item)}", " it"), "unreadable") from None
    except (OSError, KeyError, IndexError, DataError) as err:
        raise ImageDecodeError(f"cannot read it: {err}", "unreadable") from None
    return read_file(Path(item))


def read_url(url: str) -> bytes:
    """The bytes at an http(s) URL (at most URL_MAX_BYTES, within URL_TIMEOUT_S), or ImageDecodeError saying why
    not."""
    deadline, chunks, size = time.monotonic() + URL_TIMEOUT_S, [], 0
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > URL_MAX_BYTES:
                    raise ImageDecodeError(f"larger than the {URL_MAX_BYTES:,}-byte limit for downloaded images",
                                           "too_large")
                if time.monotonic() > deadline:
                    raise ImageDecodeError(f"cannot download it within {URL_TIMEOUT_S:g} s", "unreadable")
                chunks.append(chunk)
    except urllib.error.HTTPError as err:
        raise ImageDecodeError(f"cannot download it: HTTP {err.code} {err.reason}", "unreadable") from err
    except urllib.error.URLError as err:
        raise ImageDecodeError(f"cannot download it: {err.reason}", "unreadable") from err
    except (OSError, ValueError) as err:  # timeouts, dropped connections, malformed URLs
        raise ImageDecodeError(f"cannot download it: {err}", "unreadable") from err
    return b"".join(chunks)


def read_file_and_stat(path: Path) -> tuple[bytes, tuple[int, int, int] | None]:
    """File bytes (or ImageDecodeError) and the file's (size, mtime_ns, inode) taken before reading, for a cache
    keyed by file stat: a file that changes while it is read is then read again next time. Images that are not
    local files (URLs, shard members, table rows) have no stat."""
    if is_remote(path):
        return read_item(path), None
    try:
        status = os.stat(path)
    except OSError:
        status = None  # read_file says why
    data = read_file(path)
    return data, (status.st_size, status.st_mtime_ns, status.st_ino) if status else None


# ---------------------------------------------------------------------------------------------- batches


# JPEGs are decoded at a DCT scale (1/2, 1/4, 1/8) that stays at least this many times the resize size, so the
# antialiased resize after it still does the real downsampling. At 1x the worst hymenoptera image's features fell to
# cosine 0.995 of a full decode (4000x3000 photos: 0.9949); at 2x they stay above 0.999, and decoding a 12 MP JPEG
# still costs only a third of a full decode.
JPEG_DRAFT_MARGIN = 2

def content_digest(data: bytes) -> str:
    """128 bits of SHA-256: with the SHA instructions of current CPUs it hashes ~1.7 GB/s here, blake2b ~0.9."""
    return hashlib.sha256(data).hexdigest()[:32]


REMOTE_READ_THREADS = 16
"""Threads that read remote images: from moto's S3 server on loopback, 4 threads reached ~0.5x and 16 ~0.9x the
local-disk throughput of the same extraction (benchmarks/remote_data.py)."""


def default_workers() -> int:
    """Decoding threads: one per core (PIL releases the GIL while it decodes and resizes)."""
    return max(1, min(32, os.cpu_count() or 1))


@dataclass(frozen=True)
class Prepared:
    """One input made ready for the backbone (uint8 HWC pixels), or the reason it cannot be."""

    pixels: np.ndarray | None
    digest: str | None
    error: str | None = None
    file_stat: tuple[int, int, int] | None = None  # (size, mtime_ns, inode) taken before the bytes were read
    version: str | None = None  # a store object's version tag and size, taken before its bytes were read


def make_preparer(preprocessing: Preprocessing,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Callable[[object], Prepared]:
    """Path, http(s) URL, encoded bytes or PIL image -> input pixels (and content digest); never raises for a bad
    image."""
    draft = (JPEG_DRAFT_MARGIN * preprocessing.resize_size,) * 2

    def prepare(item: object) -> Prepared:
        try:
            if isinstance(item, Image.Image):
                return Prepared(preprocessing.pixels(item.convert("RGB")), None)
            file_stat, version = None, None
            if isinstance(item, bytes):
                data = item
            elif storage.is_store_url(item) and not shards.is_member(item) and not tables.is_row(item):
                version = storage.stored_object(item).identity
                data = read_item(item)
            elif is_remote(item):
                data = read_item(item)
            else:
                data, file_stat = read_file_and_stat(Path(item))
            return Prepared(preprocessing.pixels(decode_image(data, max_pixels, draft)), content_digest(data), None,
                            file_stat, version)
        except storage.StorageError as err:
            return Prepared(None, None, str(err))
        except ImageDecodeError as err:
            return Prepared(None, None, str(err))

    return prepare


def iter_prepared(items: Sequence, prepare: Callable[[object], Prepared], batch_size: int, workers: int,
                  prefetch: int = 2) -> Iterator[list[tuple[int, Prepared]]]:
    """Batches of (index, prepared) decoded by a thread pool a few batches ahead of the consumer; remote items get
    at least REMOTE_READ_THREADS threads, as their time goes into waiting for the store."""
    if len(items) and is_remote(items[0]):
        workers = max(workers, REMOTE_READ_THREADS)
    numbered = iter(enumerate(items))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transferkit-decode") as pool:
        pending: deque = deque()

        def submit_next() -> None:
            chunk = list(islice(numbered, batch_size))
            if chunk:
                pending.append([(i, pool.submit(prepare, item)) for i, item in chunk])

        for _ in range(prefetch + 1):
            submit_next()
        while pending:
            batch = pending.popleft()
            submit_next()
            yield [(i, future.result()) for i, future in batch]
