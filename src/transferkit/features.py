"""Bottleneck features: the frozen backbone run once per image, kept in an on-disk cache that every run shares.

The cache is a folder holding one SQLite index and append-only shards of float32 rows, read back memory-mapped.
A writer appends a batch to its own shard, flushes it to disk, and only then commits the batch's index rows, so a
crash (Ctrl-C, kill -9) loses at most the batch in flight and nobody ever reads a half-written row; concurrent
runs write separate shards and SQLite serialises their index commits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import uuid
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from transferkit import shards, storage, tables
from transferkit.backbone import Backbone, PixelFeatures
from transferkit.data import (DEFAULT_MAX_IMAGE_PIXELS, JPEG_DRAFT_MARGIN, Skipped, default_workers, is_remote,
                              iter_prepared, make_preparer)
from transferkit.errors import BackboneError
from transferkit.onnx_engine import (ExportError, backbone_onnx, onnx_session, onnxruntime_installed,
                                     onnxruntime_provider, recorded_failure)
from transferkit.progress import progress_bar
from transferkit.storage import cache_root, default_cache_dir  # noqa: F401 (both part of this module's API)

CACHE_FORMAT = 2
BLOCKS_CACHE_FORMAT = 3  # `blocks` features (format 2 spaces hold pre-logits features and keep serving those runs)
_SQL_CHUNK = 500


def cpu_has_fast_bf16() -> bool:
    """Native bf16 matrix instructions (AVX512-BF16 or AMX); elsewhere bf16 autocast is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------------------------------------- extractor


ENGINES = ("auto", "torch", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise BackboneError(f"unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {device} was asked for but torch sees no CUDA GPU; use --device cpu.")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 autocast is for CUDA GPUs; elsewhere it is refused instead of running slowly or not at all."""
    if precision == "fp16" and device.type != "cuda":
        raise BackboneError(f"fp16 runs on CUDA GPUs only; on {device} use precision bf16, fp32 or auto.")


class Extractor:
    """Runs the frozen backbone on uint8 pixel batches with the fastest numerically safe engine of this machine.

    engine="auto": ONNX Runtime fp32 on CPU when the `onnx` extra is installed (measured here: 1.7x the torch bf16
    path at 288 px, and exact); otherwise torch with channels_last plus bf16 autocast on CPUs with native bf16
    (features within cosine ~0.999 of fp32), or fp16 autocast on CUDA.
    """

    def __init__(self, backbone: Backbone, device: str | torch.device = "auto", precision: str = "auto",
                 engine: str = "auto", cache_dir: str | Path | None = None):
        if engine not in ENGINES:
            raise BackboneError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}.")
        if precision not in PRECISIONS:
            raise BackboneError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
        self.backbone = backbone
        self.device = resolve_device(device)
        self.export_dir = cache_root(cache_dir) / "onnx"  # the backbone's ONNX file, exported once
        self.requested_engine = engine
        self.engine, self.precision = self._resolve(engine, precision)

    def _resolve(self, engine: str, precision: str) -> tuple[str, str]:
        if engine == "onnxruntime":
            if not onnxruntime_installed():
                raise BackboneError("--engine onnxruntime needs ONNX Runtime: pip install 'transferkit[onnx]' "
                                    "(or use --engine torch).")
            if precision not in ("auto", "fp32"):
                raise BackboneError(f"ONNX Runtime runs the backbone in fp32, not {precision}; "
                                    "use --engine torch for reduced precision.")
            if onnxruntime_provider(self.device) is None:
                raise BackboneError(f"this ONNX Runtime build cannot run on {self.device}; install "
                                    "onnxruntime-gpu, or use --engine torch.")
            return "onnxruntime", "fp32"
        if (engine == "auto" and precision in ("auto", "fp32") and self.device.type == "cpu"
                and onnxruntime_installed() and recorded_failure(self.backbone, self.export_dir) is None):
            return "onnxruntime", "fp32"
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else ("bf16" if cpu_has_fast_bf16() else "fp32")
        check_precision(precision, self.device)
        return "torch", precision

    @cached_property
    def _torch_model(self) -> PixelFeatures:
        return self.backbone.pixel_model().to(self.device, memory_format=torch.channels_last)

    @cached_property
    def _session(self):
        """The ONNX Runtime session, or None after an auto engine fell back to torch (same fp32 numerics)."""
        try:
            return onnx_session(backbone_onnx(self.backbone, self.export_dir), self.device)
        except ExportError as err:
            if self.requested_engine == "onnxruntime":
                raise BackboneError(f"{err}. Use --engine torch.") from err
            warnings.warn(f"{err}; using the torch engine instead.", stacklevel=3)
            self.engine = "torch"
            return None

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _run_torch(self, pixels: np.ndarray, forward: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        batch = torch.from_numpy(pixels)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            return forward(batch).float().cpu().numpy()

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) pixels, as `Preprocessing.pixels` makes them -> float32 (N, D) features."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if self.engine == "onnxruntime" and self._session is not None:
            return self._session.run(None, {"pixels": pixels})[0]
        return self._run_torch(pixels, self._torch_model)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """The backbone's own classifier outputs (always run in torch)."""
        return self._run_torch(np.ascontiguousarray(pixels, dtype=np.uint8), self._torch_model.logits)

    @property
    def cache_key(self) -> dict:
        """Everything that determines a feature vector besides the image bytes (fp32 engines share features)."""
        key = {"format": CACHE_FORMAT, "architecture": self.backbone.architecture,
               "weights_id": self.backbone.weights_id, "preprocessing": self.backbone.preprocessing.to_dict(),
               "precision": self.precision, "jpeg_draft": JPEG_DRAFT_MARGIN}
        if self.backbone.feature_kind == "blocks":
            key.update(format=BLOCKS_CACHE_FORMAT, features="blocks")
        return key

    def describe(self) -> dict:
        return {"engine": self.engine, "precision": self.precision, "device": str(self.device)}


# ---------------------------------------------------------------------------------------------- cache


class CacheUnavailable(Exception):
    pass


class FeatureCache:
    """Content-addressed feature store shared by all runs: (feature space, image digest) -> float32 row."""

    def __init__(self, root: str | Path | None = None):
        self.root = cache_root(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.root / "index.sqlite", timeout=120, isolation_level=None,
                                       check_same_thread=False)
            self._set_up_index()
        except (OSError, sqlite3.Error) as err:
            raise CacheUnavailable(f"cannot use feature cache {self.root}: {err}") from err

    def _set_up_index(self, attempts: int = 100) -> None:
        """SQLite can answer 'database is locked' at once, without waiting, when two processes set up a new index
        together (switching to WAL needs an exclusive lock); the one that lost retries for a few seconds."""
        for attempt in range(attempts):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript("""
                    CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,
                                                      inode INTEGER, digest TEXT);
                    CREATE TABLE IF NOT EXISTS spaces (space TEXT PRIMARY KEY, dim INTEGER, key TEXT);
                    CREATE TABLE IF NOT EXISTS features (space TEXT, digest TEXT, shard TEXT, row INTEGER,
                                                         PRIMARY KEY (space, digest));
                    CREATE TABLE IF NOT EXISTS objects (url TEXT PRIMARY KEY, version TEXT, digest TEXT);
                    CREATE TABLE IF NOT EXISTS image_facts (digest TEXT PRIMARY KEY, facts TEXT);
                """)
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or attempt == attempts - 1:
                    raise
                time.sleep(0.05)

    @staticmethod
    def space_id(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def close(self) -> None:
        self._db.close()

    def _select(self, sql: str, keys: Sequence, *prefix) -> list[tuple]:
        rows: list[tuple] = []
        for start in range(0, len(keys), _SQL_CHUNK):
            chunk = list(keys[start:start + _SQL_CHUNK])
            marks = ",".join("?" * len(chunk))
            rows += self._db.execute(sql.format(marks=marks), (*prefix, *chunk)).fetchall()
        return rows

    def known_digests(self, paths: Sequence[Path | str]) -> dict[int, str]:
        """Content digests by position in `paths` of files seen before and unchanged since (size, mtime, inode), of
        store objects seen before at the same version, and of shard members (their shard's index holds them).

        Nothing is read: new and changed files are hashed as they are decoded, so extraction starts at once.
        """
        stats: dict[int, os.stat_result] = {}
        result: dict[int, str] = {}
        objects: dict[int, str] = {}
        for i, path in enumerate(paths):
            if shards.is_member(path):
                digest = shards.known_digest(path)
                if digest is not None:
                    result[i] = digest
            elif storage.is_store_url(path) and not tables.is_row(path):
                objects[i] = path
            elif is_remote(path):
                continue
            else:
                try:
                    stats[i] = os.stat(path)
                except OSError:
                    pass  # reported when the file is prepared
        result.update(self._known_objects(objects))
        names = {i: str(Path(paths[i]).absolute()) for i in stats}
        known = {row[0]: row[1:] for row in self._select(
            "SELECT path, size, mtime_ns, inode, digest FROM files WHERE path IN ({marks})", list(names.values()))}
        for i, st in stats.items():
            row = known.get(names[i])
            if row and tuple(row[:3]) == (st.st_size, st.st_mtime_ns, st.st_ino):
                result[i] = row[3]
        return result

    def _known_objects(self, urls: dict[int, str]) -> dict[int, str]:
        """Digests of store objects whose version (as listed, else asked of the store) is the one remembered."""
        if not urls:
            return {}
        remembered = {row[0]: row[1:] for row in self._select(
            "SELECT url, version, digest FROM objects WHERE url IN ({marks})", list(urls.values()))}
        asked = [u for u in urls.values() if u in remembered]
        versions = storage.stored_objects(asked)
        return {i: remembered[url][1] for i, url in urls.items()
                if url in remembered and versions.get(url) is not None and versions[url] == remembered[url][0]}

    def remember_objects(self, objects: Sequence[tuple[str, str, str]]) -> None:
        """Record (url, version, digest) of store objects, so unchanged ones are not downloaded again."""
        self._write("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)", list(objects))

    def remember(self, files: Sequence[tuple[Path, tuple[int, int, int], str]]) -> None:
        """Record (path, (size, mtime_ns, inode), digest) so unchanged files are not read again."""
        self._write("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                    [(str(Path(path).absolute()), *stat, digest) for path, stat, digest in files])

    def image_facts(self, digests: Iterable[str]) -> dict[str, dict]:
        """What `transferkit doctor` learnt from decoding these contents before (format, size, frames, error)."""
        rows = self._select("SELECT digest, facts FROM image_facts WHERE digest IN ({marks})", sorted(set(digests)))
        return {digest: json.loads(facts) for digest, facts in rows}

    def remember_image_facts(self, facts: dict[str, dict]) -> None:
        self._write("INSERT OR REPLACE INTO image_facts VALUES (?, ?)",
                    [(digest, json.dumps(value)) for digest, value in facts.items()])

    def _write(self, sql: str, records: list[tuple]) -> None:
        if not records:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(sql, records)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def lookup(self, space: str, digests: Iterable[str]) -> dict[str, tuple[str, int]]:
        rows = self._select("SELECT digest, shard, row FROM features WHERE space = ? AND digest IN ({marks})",
                            sorted(set(digests)), space)
        return {digest: (shard, row) for digest, shard, row in rows}

    def read(self, space: str, locations: Sequence[tuple[str, int]]) -> np.ndarray:
        (dim,) = self._db.execute("SELECT dim FROM spaces WHERE space = ?", (space,)).fetchone()
        out = np.empty((len(locations), dim), dtype=np.float32)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position, (shard, row) in enumerate(locations):
            by_shard.setdefault(shard, []).append((position, row))
        for shard, pairs in by_shard.items():
            path = self.root / space / shard
            rows = os.path.getsize(path) // (dim * 4)
            table = np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dim))
            positions, indices = zip(*pairs)
            out[list(positions)] = table[list(indices)]
            del table
        return out

    def writer(self, space: str, key: dict) -> ShardWriter:
        return ShardWriter(self, space, key)


class ShardWriter:
    """Appends batches to a new shard of one feature space; each batch is on disk before its index rows commit."""

    def __init__(self, cache: FeatureCache, space: str, key: dict):
        self.cache, self.space, self.key = cache, space, key
        self.name = f"{uuid.uuid4().hex}.f32"
        self._file = None
        self._rows = 0

    def append(self, digests: Sequence[str], features: np.ndarray) -> None:
        features = np.ascontiguousarray(features, dtype=np.float32)
        if self._file is None:
            (self.cache.root / self.space).mkdir(exist_ok=True)
            self.cache._write("INSERT OR IGNORE INTO spaces VALUES (?, ?, ?)",
                              [(self.space, features.shape[1], json.dumps(self.key, sort_keys=True))])
            self._file = open(self.cache.root / self.space / self.name, "ab")
        self._file.write(features.tobytes())
        self._file.flush()
        os.fsync(self._file.fileno())
        rows = range(self._rows, self._rows + len(digests))
        self._rows += len(digests)
        self.cache._write("INSERT OR IGNORE INTO features VALUES (?, ?, ?, ?)",
                          [(self.space, d, self.name, r) for d, r in zip(digests, rows)])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# ---------------------------------------------------------------------------------------------- extraction


@dataclass
class FeatureSet:
    """Features of the inputs that could be read: row j belongs to `paths[kept[j]]`."""

    features: np.ndarray
    kept: np.ndarray
    skipped: list[Skipped]
    computed: int
    from_cache: int


def open_cache(cache_dir: str | Path | None, use_cache: bool) -> FeatureCache | None:
    """The feature cache, or None (with a warning) when it is switched off or cannot be used."""
    if not use_cache:
        return None
    try:
        return FeatureCache(cache_dir)
    except CacheUnavailable as err:
        warnings.warn(f"{err}; continuing without a cache (pass --cache-dir to use another folder).", stacklevel=2)
        return None


def extract_features(extractor: Extractor, paths: Sequence[Path], cache: FeatureCache | None = None,
                     batch_size: int | None = None, workers: int | None = None,
                     max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, progress: bool | None = None,
                     desc: str = "Extracting features") -> FeatureSet:
    """Features for every readable image in `paths`, from the cache where possible, the backbone otherwise.

    Each file is read once: decoded and hashed together. A file that is new or changed but whose content is
    already cached (a copy, a touched or renamed file) costs a decode and no backbone work.
    """
    workers = workers or default_workers()
    batch_size = batch_size or (256 if extractor.device.type == "cuda" else 32)
    space = FeatureCache.space_id(extractor.cache_key)
    found: dict[int, np.ndarray] = {}
    if cache is not None:
        _read_cached(cache, space, cache.known_digests(paths), found)
    todo = [i for i in range(len(paths)) if i not in found]
    skipped: list[Skipped] = []
    computed = 0
    writer = cache.writer(space, extractor.cache_key) if cache is not None else None
    bar = progress_bar(len(todo), desc, "img", progress, quiet_when_empty=True)
    try:
        prepare = make_preparer(extractor.backbone.preprocessing, max_pixels) if todo else None
        for batch in iter_prepared([paths[i] for i in todo], prepare, batch_size, workers):
            good = [(todo[j], p) for j, p in batch if p.pixels is not None]
            skipped += [Skipped(str(paths[todo[j]]), p.error) for j, p in batch if p.pixels is None]
            if cache is not None and good:
                _read_cached(cache, space, {i: p.digest for i, p in good}, found)
                good = [(i, p) for i, p in good if i not in found]
            if good:
                features = extractor.features(np.stack([p.pixels for _, p in good]))
                computed += len(good)
                found.update((i, row) for (i, _), row in zip(good, features))
                if writer is not None:
                    writer = _append_or_give_up(writer, [p.digest for _, p in good], features)
            if writer is not None:
                writer = _remember_or_give_up(writer, [(paths[todo[j]], p.file_stat, p.digest) for j, p in batch
                                                       if p.file_stat is not None and p.digest is not None],
                                              [(paths[todo[j]], p.version, p.digest) for j, p in batch
                                               if p.version is not None and p.digest is not None])
            bar.update(len(batch))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    kept = np.array(sorted(found), dtype=np.int64)
    dim = next(iter(found.values())).shape[0] if found else 0
    from_cache = len(found) - computed
    matrix = np.empty((len(kept), dim), dtype=np.float32)
    for row, i in enumerate(kept):  # popped as copied: the batches are freed as they go, never held twice
        matrix[row] = found.pop(i)
    return FeatureSet(matrix, kept, skipped, computed=computed, from_cache=from_cache)


def _read_cached(cache: FeatureCache, space: str, digests: dict[int, str], found: dict[int, np.ndarray]) -> None:
    hits = cache.lookup(space, digests.values())
    cached = [i for i, digest in digests.items() if digest in hits]
    if cached:
        found.update(zip(cached, cache.read(space, [hits[digests[i]] for i in cached])))


def _remember_or_give_up(writer: ShardWriter, files: list, objects: list) -> ShardWriter | None:
    try:
        writer.cache.remember(files)
        writer.cache.remember_objects(objects)
        return writer
    except sqlite3.Error as err:
        return _give_up(writer, err)


def _append_or_give_up(writer: ShardWriter, digests: list[str], features: np.ndarray) -> ShardWriter | None:
    """A full disk or read-only cache must not stop extraction: warn once and carry on without caching."""
    try:
        writer.append(digests, features)
        return writer
    except (OSError, sqlite3.Error) as err:
        return _give_up(writer, err)


def _give_up(writer: ShardWriter, err: Exception) -> None:
    warnings.warn(f"feature cache {writer.cache.root} cannot be written ({err}); continuing without caching.",
                  stacklevel=4)
    writer.close()
