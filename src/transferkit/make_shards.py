"""`transferkit shard DATA OUT/`: any data source written as WebDataset tar shards, its splits kept.

OUT gets `train-000000.tar`, `train-000001.tar`, ..., `val-000000.tar`, `test-000000.tar` (the splits `load_dataset`
gives DATA: a folder without val/ gets its validation split carved from train, as training would) and `classes.txt`,
the class names one a line. Each sample is the image's original bytes (never re-encoded) as `KEY.EXT`, the class
index as `KEY.cls` (single-label data only) and `KEY.json` = {"label": name} or {"labels": [names]}; KEY is the class
(or, for multi-label data, the parent folder) and the file's stem, e.g. `daisy/img_0001`, with no "." in it. A shard
is closed before it would grow past the size limit, counting tar headers and padding; an image larger than the limit
gets a shard of its own. Images that cannot be read are skipped and reported, never the end of the run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import random
import re
import tarfile
import time
import urllib.parse
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from transferkit import data as data_module
from transferkit import shards, storage
from transferkit.data import SPLITS, ImageDecodeError, Sample, Skipped, load_dataset
from transferkit.errors import DataError
from transferkit.progress import progress_bar
from transferkit.text import plural

log = logging.getLogger(__name__)

SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")
"""The names this module gives its shards: what --overwrite replaces."""
TAR_FORMAT = tarfile.PAX_FORMAT
"""Plain ustar headers for names up to 100 characters; a pax header only where a name is longer."""
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
END_OF_ARCHIVE = 2 * BLOCK
FILE_MODE = 0o644
READ_AHEAD = 64
"""Images read ahead of the writer by the reading threads (their bytes are held in memory)."""
LOCAL_READ_THREADS = 4
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([A-Za-z]*)\s*")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_PIL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif"}


@dataclass
class ShardsWritten:
    """What `write_shards` wrote: the shard files per split (paths or URLs, in order), images per split, the bytes
    of all shards, and what could not be written (files the data listing skipped and images that cannot be read)."""

    out: str
    shards: dict[str, list[str]]
    images: dict[str, int]
    bytes: int
    skipped: list[Skipped] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    multi_label: bool = False
    seconds: float = 0.0

    @property
    def shard_count(self) -> int:
        return sum(len(names) for names in self.shards.values())

    def summary(self) -> str:
        per_split = ", ".join(f"{split} {self.images[split]:,} in {len(self.shards[split])}"
                              for split in SPLITS if split in self.shards)
        skipped = f"; skipped {plural(len(self.skipped), 'file')} that cannot be used" if self.skipped else ""
        return (f"wrote {plural(sum(self.images.values()), 'image')} of {plural(len(self.classes), 'class')} into "
                f"{plural(self.shard_count, 'shard')} ({per_split}), {self.bytes / 1e6:.1f} MB, in "
                f"{storage.redact(self.out)} in {self.seconds:.1f} s{skipped}.")

    def to_dict(self) -> dict:
        return {"out": storage.redact(self.out), "shards": self.shards, "images": self.images, "bytes": self.bytes,
                "classes": self.classes, "multi_label": self.multi_label, "seconds": round(self.seconds, 3),
                "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped]}


def parse_size(size: str | int | float) -> int:
    """A shard size in bytes from 1GB, 500MB, 64MiB, 1.5e9 or plain bytes (GB = 10**9, GiB = 2**30); DataError
    for anything else or for less than one byte."""
    value = None
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        match = _SIZE.fullmatch(size)
        unit = _UNITS.get(match.group(3).lower()) if match else None
        if unit is not None:
            value = float(match.group(1)) * 10 ** int(match.group(2) or 0) * unit
    if value is None or not value >= 1 or value == float("inf"):
        raise DataError(f"--size takes a shard size such as 1GB, 500MB, 64MiB or a number of bytes, not {size!r}.")
    return int(value)


# ---------------------------------------------------------------------------------------------- where shards go


class _Out:
    """The output folder: local (each file written under a hidden temporary name, then renamed into place) or an
    fsspec URL (s3://, gs://, memory://, ...; each file written through fsspec.open)."""

    def __init__(self, out: str | Path):
        text = str(out)
        if text.startswith("file://"):
            text = text.removeprefix("file://")
        self.remote = storage.is_store_url(text)
        if self.remote:
            self.url = text.rstrip("/")
            self.fs = storage.filesystem(self.url)
            self.path = self.fs._strip_protocol(self.url)
        else:
            self.folder = Path(text).expanduser()

    def __str__(self) -> str:
        return self.url if self.remote else str(self.folder)

    def where(self, name: str) -> str:
        return f"{self.url}/{name}" if self.remote else str(self.folder / name)

    def names(self) -> list[str]:
        """The names of the files directly in OUT (none when it does not exist yet)."""
        if self.remote:
            try:
                entries = storage.retrying(lambda: self.fs.ls(self.path, detail=True), self.url, "list")
            except storage.StorageError as err:
                if err.kind == "not_found":
                    return []
                raise DataError(f"{err}.") from None
            return sorted(posixpath.basename(entry["name"].rstrip("/")) for entry in entries
                          if entry.get("type", "file") != "directory")
        if self.folder.exists() and not self.folder.is_dir():
            raise DataError(f"{self.folder} is a file; give a folder (new or empty) for the shards.")
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if p.is_file())

    def prepare(self) -> None:
        if not self.remote:
            self.folder.mkdir(parents=True, exist_ok=True)

    def open(self, name: str) -> _OutFile:
        return _OutFile(self, name)

    def remove(self, name: str) -> None:
        if self.remote:
            self.fs.rm(f"{self.path}/{name}")
        else:
            (self.folder / name).unlink(missing_ok=True)

    def holds(self, shard: str) -> bool:
        """Whether the shard is in OUT (overwriting shards while reading them would read the new shards at the old
        offsets)."""
        if self.remote:
            return storage.is_store_url(shard) and storage.parent(shard).rstrip("/") == self.url
        return not storage.is_store_url(shard) and Path(shard).expanduser().resolve().parent == self.folder.resolve()


class _OutFile:
    """A binary file in OUT that appears under its name only once it is complete (locally; a store's upload is
    committed when it is closed, and a failed one is discarded where the store allows)."""

    def __init__(self, out: _Out, name: str):
        self.out, self.name = out, name

    def __enter__(self):
        if self.out.remote:
            import fsspec

            self.file = fsspec.open(self.out.where(self.name), "wb").open()
        else:
            self.temporary = self.out.folder / f".{self.name}.{os.getpid()}.tmp"
            self.file = open(self.temporary, "wb")
        return self.file

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            if self.out.remote:
                self.file.close()
            else:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                os.replace(self.temporary, self.out.folder / self.name)
            return
        try:
            if self.out.remote:
                discard = getattr(self.file, "discard", None)
                discard() if discard is not None else self.file.close()
            else:
                self.file.close()
                self.temporary.unlink(missing_ok=True)
        except Exception:  # the error that stopped the writing is the one to report
            log.debug("cannot clean up the unfinished %s", self.name, exc_info=True)


# ---------------------------------------------------------------------------------------------- tar files


def _padded(size: int, unit: int) -> int:
    return -(-size // unit) * unit


class _ShardWriter:
    """Writes one split's samples into shards `{split}-{n:06d}.tar`, each closed before it would pass `limit`
    bytes (tar headers, padding, the end-of-archive blocks and tarfile's padding to a whole record included)."""

    def __init__(self, out: _Out, split: str, limit: int, mtime: int):
        self.out, self.split, self.limit, self.mtime = out, split, limit, mtime
        self.written: list[str] = []
        self.bytes = 0
        self._file = self._tar = None
        self._offset = 0
        self._samples = 0

    def _infos(self, key: str, members: list[tuple[str, bytes]]) -> tuple[list[tuple[tarfile.TarInfo, bytes]], int]:
        infos, size = [], 0
        for extension, payload in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(payload), self.mtime, FILE_MODE
            info.type = tarfile.REGTYPE
            size += len(info.tobuf(TAR_FORMAT, "utf-8", "surrogateescape")) + _padded(len(payload), BLOCK)
            infos.append((info, payload))
        return infos, size

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        infos, size = self._infos(key, members)
        if self._tar is not None and self._samples and \
                _padded(self._offset + size + END_OF_ARCHIVE, RECORD) > self.limit:
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        for info, payload in infos:
            self._tar.addfile(info, io.BytesIO(payload))
        self._offset += size
        self._samples += 1

    def _open_shard(self) -> None:
        name = f"{self.split}-{len(self.written):06d}.tar"
        self._context = self.out.open(name)
        self._file = self._context.__enter__()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=TAR_FORMAT, encoding="utf-8",
                                 errors="surrogateescape")
        self._name, self._offset, self._samples = name, 0, 0

    def _close_shard(self) -> None:
        self._tar.close()
        self._context.__exit__(None, None, None)
        self.written.append(self.out.where(self._name))
        self.bytes += _padded(self._offset + END_OF_ARCHIVE, RECORD)
        self._file = self._tar = None

    def close(self) -> None:
        if self._tar is not None:
            self._close_shard()

    def abandon(self, error: BaseException) -> None:
        """Drop the shard being written (a local one leaves no file behind)."""
        if self._tar is not None:
            self._context.__exit__(type(error), error, None)
            self._file = self._tar = None


# ---------------------------------------------------------------------------------------------- samples


def _base_name(item: Path | str) -> str:
    """The image's file name wherever it is: a path, a URL (without its query), a shard member, a table row."""
    if isinstance(item, Path):
        return item.name
    if shards.is_member(item):
        return posixpath.basename(item.rsplit(shards.MEMBER_MARK, 1)[1])
    if data_module.is_url(item):
        return posixpath.basename(urllib.parse.urlsplit(item).path)
    return posixpath.basename(str(item).rstrip("/"))


def _parent_name(item: Path | str) -> str:
    if isinstance(item, Path):
        return item.parent.name
    if shards.is_member(item):
        return posixpath.basename(posixpath.dirname(item.rsplit(shards.MEMBER_MARK, 1)[1]))
    path = urllib.parse.urlsplit(item).path if data_module.is_url(item) else str(item)
    return posixpath.basename(posixpath.dirname(path.rstrip("/")))


def _clean(text: str) -> str:
    """A key part: letters, digits, _ and - only (WebDataset's key ends at the first "." of a member's name)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"


def sample_key(sample: Sample) -> str:
    """`class/stem` (single-label) or `parent-folder/stem` (multi-label), made of [A-Za-z0-9_-] and one "/"; a
    `_nohash_` part of the name stays intact."""
    name = _base_name(sample.path)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    folder = sample.label if isinstance(sample.label, str) else _parent_name(sample.path)
    return f"{_clean(folder)}/{_clean(stem)}" if folder else _clean(stem)


def _unique(key: str, used: set[str]) -> str:
    candidate, n = key, 2
    while candidate in used:
        candidate, n = f"{key}_{n}", n + 1
    used.add(candidate)
    return candidate


def _extension(item: Path | str, payload: bytes) -> str:
    """The image's own lower-case extension (jpg, jpeg, png...); for a name without one (a table row), the format
    its bytes are in. ImageDecodeError for bytes that are no image a shard can hold: only the header is read (a
    truncated picture still passes; training skips it when it decodes it)."""
    if not payload:
        raise ImageDecodeError("empty file", "empty")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(payload)) as image:
            image_format = image.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise ImageDecodeError("not an image (unrecognised format)", "not_image") from None
    except Exception as err:  # any other decoder failure skips this image, never stops the run
        raise ImageDecodeError(f"cannot read its header: {type(err).__name__}: {err}") from None
    suffix = posixpath.splitext(_base_name(item))[1].lower()
    if suffix in data_module.IMAGE_EXTENSIONS:
        return suffix[1:]
    if image_format not in _PIL_EXTENSIONS:
        raise ImageDecodeError(f"a {image_format} image; shards hold {', '.join(_PIL_EXTENSIONS)}", "not_image")
    return _PIL_EXTENSIONS[image_format]


def _read(sample: Sample) -> tuple[bytes | None, str | None]:
    try:
        return data_module.read_item(sample.path), None
    except ImageDecodeError as err:
        return None, str(err)
    except Exception as err:  # any reader failure skips this image, never stops the run
        return None, f"cannot read it: {type(err).__name__}: {err}"


def _read_ahead(samples: list[Sample]) -> Iterator[tuple[Sample, bytes | None, str | None]]:
    """Each sample with its bytes (or why they cannot be read), in order, read by a few threads ahead of the
    writer (more for remote images, whose time goes into waiting for the store)."""
    remote = any(data_module.is_remote(s.path) for s in samples[:1])
    workers = data_module.REMOTE_READ_THREADS if remote else LOCAL_READ_THREADS
    queued = iter(samples)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transferkit-shard-read") as pool:
        pending: deque = deque()
        for sample in queued:
            pending.append((sample, pool.submit(_read, sample)))
            if len(pending) >= READ_AHEAD:
                break
        while pending:
            sample, future = pending.popleft()
            following = next(queued, None)
            if following is not None:
                pending.append((following, pool.submit(_read, following)))
            yield (sample, *future.result())


# ---------------------------------------------------------------------------------------------- the whole thing


def write_shards(
    data,
    out: str | Path,
    size: str | int = "1GB",
    val: str | Path | None = None,
    test: str | Path | None = None,
    val_percent: float = 10.0,
    test_percent: float = 10.0,
    multi_label: bool | None = None,
    label_sep: str | None = None,
    overwrite: bool = False,
    seed: int | None = 0,
    progress: bool | None = None,
) -> ShardsWritten:
    """Write DATA (a folder, CSV, shards, store URL or table, with optional explicit `val` / `test`, as
    `load_dataset` reads them) into WebDataset shards in `out` (a folder or an fsspec URL): `{split}-000000.tar`
    ... per split, each at most `size` (1GB, 500MB, 64MiB or bytes), and `classes.txt`.

    The samples of each split are shuffled with `seed` (None: the order load_dataset gives), so that a streaming
    reader with a small shuffle buffer does not see one class at a time. An `out` that already holds .tar files is
    refused unless `overwrite`, which replaces the shards this writes and removes older `{split}-NNNNNN.tar` files.
    """
    limit = parse_size(size)
    target = _Out(out)
    present = target.names()
    tars = [name for name in present if name.lower().endswith(shards.SHARD_SUFFIX)]
    if tars and not overwrite:
        raise DataError(f"{storage.redact(str(target))} already holds {len(tars)} .tar files ({tars[0]}, ...); give "
                        "a new or empty folder, or --overwrite (overwrite=True) to replace them.")
    started = time.perf_counter()
    dataset = load_dataset(data, val=val, test=test, val_percent=val_percent, test_percent=test_percent,
                           multi_label=multi_label, label_sep=label_sep)
    bad_names = [name for name in dataset.classes if "\n" in name or "\r" in name]
    if bad_names:
        raise DataError(f"the class name {bad_names[0]!r} holds a line break, which classes.txt cannot hold; rename "
                        "the class.")
    splits = [split for split in SPLITS if dataset.splits.get(split)]
    read_shards = {s.path.rsplit(shards.MEMBER_MARK, 1)[0] for split in splits for s in dataset.splits[split]
                   if shards.is_member(s.path)}
    inside = next((shard for shard in sorted(read_shards) if target.holds(shard)), None)
    if inside is not None:
        raise DataError(f"{storage.redact(str(target))} holds the shards being read ({storage.redact(inside)}); write "
                        "the new shards to another folder.")
    target.prepare()
    index = {name: i for i, name in enumerate(dataset.classes)}
    skipped = list(dataset.skipped)
    writers: dict[str, _ShardWriter] = {}
    images = {split: 0 for split in splits}
    used: set[str] = set()
    mtime = int(time.time())
    total = sum(len(dataset.splits[split]) for split in splits)
    bar = progress_bar(total, "writing shards", "images", progress)
    writer = None
    try:
        for split in splits:
            samples = list(dataset.splits[split])
            if seed is not None:
                random.Random(f"{seed}-{split}").shuffle(samples)
            writer = writers[split] = _ShardWriter(target, split, limit, mtime)
            for sample, payload, reason in _read_ahead(samples):
                bar.update(1)
                try:
                    extension = _extension(sample.path, payload) if reason is None else None
                except ImageDecodeError as err:
                    reason = str(err)
                if reason is not None:
                    skipped.append(Skipped(storage.redact(str(sample.path)), reason))
                    continue
                key = _unique(sample_key(sample), used)
                members = [(extension, payload)]
                if dataset.multi_label:
                    members.append(("json", json.dumps({"labels": list(sample.labels)}, ensure_ascii=False).encode()))
                else:
                    members.append(("cls", str(index[sample.label]).encode()))
                    members.append(("json", json.dumps({"label": sample.label}, ensure_ascii=False).encode()))
                writer.add(key, members)
                images[split] += 1
            writer.close()
    except BaseException as err:
        if writer is not None:
            writer.abandon(err)
        raise
    finally:
        bar.close()
    if not any(images.values()):
        first = next((s for s in skipped[len(dataset.skipped):]), None)
        why = f" (first: {first.path}: {first.reason})" if first else ""
        raise DataError(f"none of the {total:,} images could be read{why}; nothing was written.")
    with target.open(shards.CLASSES_FILE) as file:
        file.write("".join(f"{name}\n" for name in dataset.classes).encode("utf-8"))
    written = {split: writers[split].written for split in splits if writers[split].written}
    names = {posixpath.basename(path.replace("\\", "/")) for paths in written.values() for path in paths}
    stale = [name for name in tars if SHARD_NAME.match(name) and name not in names]
    for name in stale:
        target.remove(name)
    others = [name for name in tars if not SHARD_NAME.match(name)]
    if others:
        log.warning("%s also holds %d other .tar files (%s, ...), which a reader of the folder takes for shards too",
                    storage.redact(str(target)), len(others), others[0])
    unreadable = len(skipped) - len(dataset.skipped)
    if unreadable:
        log.warning("skipped %d images that cannot be read (first: %s: %s)", unreadable,
                    skipped[len(dataset.skipped)].path, skipped[len(dataset.skipped)].reason)
    return ShardsWritten(str(target), written, {split: images[split] for split in written},
                         sum(w.bytes for w in writers.values()), skipped, list(dataset.classes), dataset.multi_label,
                         time.perf_counter() - started)
