"""Fetch the classic transfer-learning image sets (or any archive URL) and unpack them in a layout transferkit reads.

Every file is checked against its known size and SHA-256 before it is unpacked; an interrupted transfer is resumed
from where it stopped (HTTP Range); archive entries that would land outside the target folder are refused before
anything is written; the dataset folder appears only once it is complete.
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import urlparse

from transferkit.errors import DownloadError

MARKER = ".transferkit-download.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """One file to fetch. `sha256` and `size` are checked when known."""

    url: str
    sha256: str | None = None
    size: int | None = None

    @property
    def filename(self) -> str:
        return PurePosixPath(urlparse(self.url).path).name or "download"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    files: tuple[Remote, ...]
    data: str
    """What to give `transferkit train`, relative to the dataset folder."""
    layout: Callable[[Path], None] | None = field(default=None, compare=False)
    """Turns the unpacked files into a layout transferkit reads (class folders, or a CSV with splits)."""


@dataclass(frozen=True)
class Downloaded:
    name: str
    folder: Path
    data: Path
    """The path to train on: a folder of class folders, a train/val layout or a CSV."""
    fetched: bool
    """False when the dataset was already there and nothing was downloaded."""


# ---------------------------------------------------------------------------------------------- layouts


def _pets_layout(root: Path) -> None:
    """Oxford-IIIT Pet: images/Breed_Name_123.jpg and the official trainval/test lists -> pets.csv with splits."""
    rows = ["path,label,split"]
    for list_name, split in (("trainval.txt", "train"), ("test.txt", "test")):
        for line in (root / "annotations" / list_name).read_text(encoding="utf-8").splitlines():
            stem = line.split(" ", 1)[0].strip()
            if stem and not stem.startswith("#"):
                rows.append(f"images/{stem}.jpg,{stem.rsplit('_', 1)[0]},{split}")
    (root / "pets.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def _dogs_layout(root: Path) -> None:
    """Stanford Dogs: Images/n02085620-Chihuahua -> Images/Chihuahua (the WordNet id adds nothing to a label)."""
    for folder in (root / "Images").iterdir():
        synset, _, breed = folder.name.partition("-")
        if breed and synset.startswith("n") and synset[1:].isdigit():
            folder.rename(folder.with_name(breed))


def _food_layout(root: Path) -> None:
    """Food-101: images/<class>/<id>.jpg with the official meta/train.txt and meta/test.txt -> food-101.csv."""
    rows = ["path,label,split"]
    for split in ("train", "test"):
        for line in (root / "food-101" / "meta" / f"{split}.txt").read_text(encoding="utf-8").split():
            rows.append(f"images/{line}.jpg,{line.split('/', 1)[0]},{split}")
    (root / "food-101" / "food-101.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


# Sizes and SHA-256 sums of the publishers' archives, as TensorFlow Datasets records them. The PyTorch tutorial's
# hymenoptera archive has no published checksum: it is checked by unpacking alone (pass --sha256 to pin it).
DATASETS = {spec.name: spec for spec in (
    DatasetSpec("hymenoptera", "ants and bees, 2 classes, 397 images, 45 MB (the PyTorch transfer-learning tutorial)",
                (Remote("https://download.pytorch.org/tutorial/hymenoptera_data.zip"),), "hymenoptera_data"),
    DatasetSpec("flowers", "5 flower classes, 3,670 photos, 218 MB (the TensorFlow image tutorials)",
                (Remote("https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz",
                        "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c", 228813984),),
                "flower_photos"),
    DatasetSpec("pets", "Oxford-IIIT Pet, 37 cat and dog breeds, 7,349 photos, 774 MB, official train/test split",
                (Remote("https://thor.robots.ox.ac.uk/~vgg/data/pets/images.tar.gz",
                        "67195c5e1c01f1ab5f9b6a5d22b8c27a580d896ece458917e61d459337fa318d", 791918971),
                 Remote("https://thor.robots.ox.ac.uk/~vgg/data/pets/annotations.tar.gz",
                        "52425fb6de5c424942b7626b428656fcbd798db970a937df61750c0f1d358e91", 19173078)),
                "pets.csv", _pets_layout),
    DatasetSpec("dogs", "Stanford Dogs, 120 breeds, 20,580 photos, 757 MB",
                (Remote("http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar",
                        "a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58", 793579520),),
                "Images", _dogs_layout),
    DatasetSpec("food-101", "Food-101, 101 dishes, 101,000 photos, 4.7 GB, official train/test split",
                (Remote("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                        "d97d15e438b7f4498f96086a4f7e2fa42a32f2712e87d3295441b2b6314053a4", 4996278331),),
                "food-101/food-101.csv", _food_layout),
)}


# ---------------------------------------------------------------------------------------------- fetching


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Interrupted(Exception):
    """The connection dropped mid-transfer; what arrived is kept for a resume."""


def _transfer(remote: Remote, part: Path, progress: bool | None) -> None:
    """Append the rest of `remote` to `part`, asking the server for the missing range only."""
    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "transferkit"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(remote.url, headers=headers), timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and remote.size is not None and offset == remote.size:
            return  # complete already
        if err.code == 416:
            part.unlink()
            raise _Interrupted("the server refused to resume; starting again") from err
        raise DownloadError(f"{remote.url} answered HTTP {err.code} ({err.reason}); check the URL.") from err
    except (urllib.error.URLError, OSError) as err:
        raise _Interrupted(f"cannot reach {remote.url}: {getattr(err, 'reason', err)}") from err
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the range: the body is the whole file
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else remote.size
        received = 0
        with open(part, "ab" if offset else "wb") as out, \
                tqdm(total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=remote.filename, file=sys.stderr, dynamic_ncols=True,
                     disable=(not sys.stderr.isatty()) if progress is None else not progress) as bar:
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (http.client.IncompleteRead, ConnectionError, TimeoutError) as err:
                raise _Interrupted(f"the connection dropped ({type(err).__name__})") from err
    if length is not None and received < int(length):
        raise _Interrupted(f"the connection closed after {offset + received:,} of {expected:,} bytes")


def fetch(remote: Remote, folder: Path, retries: int = 3, progress: bool | None = None) -> tuple[Path, str]:
    """`remote` downloaded into `folder` and verified, and its SHA-256; a partial file left by an earlier attempt
    is resumed."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / remote.filename
    part = target.with_name(target.name + ".part")
    if remote.size is not None:
        have = part.stat().st_size if part.exists() else 0
        free = shutil.disk_usage(folder).free
        if free < 2 * remote.size - have:
            raise DownloadError(f"{remote.filename} needs {(2 * remote.size - have) / 1e9:.1f} GB free in {folder} "
                                f"(the archive and its contents) but {free / 1e9:.1f} GB are; free space or choose "
                                "another --to.")
    for attempt in range(retries + 1):
        try:
            _transfer(remote, part, progress)
            break
        except _Interrupted as err:
            if attempt == retries:
                kept = part.stat().st_size if part.exists() else 0
                resume = (f"{kept:,} bytes are kept in {part}; run the same command again to resume." if kept
                          else "Check the connection, then run the same command again.")
                raise DownloadError(f"downloading {remote.url} failed: {err}. {resume}") from err
            time.sleep(min(2 ** attempt, 10))
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        part.unlink()
        raise DownloadError(f"{remote.url} gave {size:,} bytes where {remote.size:,} were expected; the file was "
                            "deleted. Run again; if it happens again the file on the server has changed.")
    digest = sha256_of(part)
    if remote.sha256 is not None:
        if digest != remote.sha256.lower():
            part.unlink()
            raise DownloadError(f"checksum mismatch for {remote.url}: SHA-256 {digest}, expected {remote.sha256}; "
                                "the file was deleted. Run again; if it happens again the file on the server has "
                                "changed (or is not the one you meant).")
    os.replace(part, target)
    return target, digest


# ---------------------------------------------------------------------------------------------- unpacking


def _unsafe(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")


def unpack(archive: Path, into: Path) -> None:
    """Unpack a zip or tar (gz, bz2, xz) archive into `into`. An archive with an entry that would be written
    outside `into` (an absolute path, `..`, a link leading out) is refused before anything is written."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            _refuse_unsafe(archive, bundle.namelist())
            bundle.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            members = bundle.getmembers()
            _refuse_unsafe(archive, [m.name for m in members])
            try:  # the "data" filter also refuses links that lead out, device files and setuid bits
                bundle.extractall(into, filter="data")
            except tarfile.FilterError as err:
                raise DownloadError(f"{archive.name} is unsafe to unpack ({err}); nothing of it is kept.") from err
    else:
        raise DownloadError(f"{archive.name} is neither a zip nor a tar archive; give the URL of an archive.")


def _refuse_unsafe(archive: Path, names: list[str]) -> None:
    unsafe = [name for name in names if _unsafe(name)]
    if unsafe:
        raise DownloadError(f"{archive.name} holds entries that would be written outside the target folder "
                            f"({', '.join(repr(n) for n in unsafe[:3])}); refused, nothing was unpacked. Do not "
                            "unpack this archive by hand either.")


# ---------------------------------------------------------------------------------------------- datasets


def download(name: str, to: str | Path = "data", *, force: bool = False, keep_archives: bool = False,
             retries: int = 3, progress: bool | None = None) -> Downloaded:
    """Fetch one of `DATASETS` into `to/NAME` and return where to train. Example:
    ``transferkit.train(transferkit.download("flowers").data)``."""
    if name not in DATASETS:
        close = difflib.get_close_matches(name.lower(), DATASETS, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise DownloadError(f"unknown dataset {name!r}.{hint} Choose one of {', '.join(DATASETS)} "
                            "(`transferkit download --list`), or give a URL.")
    return download_spec(DATASETS[name], to, force=force, keep_archives=keep_archives, retries=retries,
                         progress=progress)


def download_url(url: str, to: str | Path = "data", *, name: str | None = None, sha256: str | None = None,
                 size: int | None = None, force: bool = False, keep_archives: bool = False, retries: int = 3,
                 progress: bool | None = None) -> Downloaded:
    """Fetch any zip/tar archive into `to/NAME` (NAME from the file name unless given). When the archive holds one
    top folder, that folder is where to train."""
    remote = Remote(url, sha256, size)
    name = name or remote.filename.split(".")[0] or "dataset"
    return download_spec(DatasetSpec(name, url, (remote,), ""), to, force=force, keep_archives=keep_archives,
                         retries=retries, progress=progress)


def download_spec(spec: DatasetSpec, to: str | Path = "data", *, force: bool = False, keep_archives: bool = False,
                  retries: int = 3, progress: bool | None = None) -> Downloaded:
    to = Path(to).expanduser()
    folder = to / spec.name
    if (folder / MARKER).is_file() and not force:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))["data"]
        return Downloaded(spec.name, folder, folder / data, fetched=False)
    if folder.exists() and not force:
        raise DownloadError(f"{folder} exists and is not a finished transferkit download; remove it, choose "
                            "another --to, or pass --force to replace it.")
    archives = to / ".downloads"
    fetched = [fetch(remote, archives, retries, progress) for remote in spec.files]
    paths = [path for path, _ in fetched]
    staging = to / f".{spec.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for path in paths:
            unpack(path, staging)
        if spec.layout is not None:
            spec.layout(staging)
        data = spec.data or _single_top_folder(staging)
        (staging / MARKER).write_text(json.dumps({"name": spec.name, "data": data, "files": [
            {"url": r.url, "sha256": digest, "size": p.stat().st_size} for r, (p, digest) in zip(spec.files, fetched)]},
            indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_archives:
        for path in paths:
            path.unlink(missing_ok=True)
    return Downloaded(spec.name, folder, folder / data, fetched=True)


def _single_top_folder(root: Path) -> str:
    entries = [p for p in root.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
    return entries[0].name if len(entries) == 1 and entries[0].is_dir() else ""
