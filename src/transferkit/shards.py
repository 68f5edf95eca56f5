"""WebDataset tar shards as a data source: local or remote, brace patterns included (`train-{000..099}.tar`).

A sample is the group of members sharing a key (the member path up to the first "." of its base name): one image
member and its label, from `KEY.json` ({"label": name} or {"labels": [names]}), else `KEY.cls` (a class index, named
through a `classes.txt` beside the shards when there is one), else `KEY.txt`. Each shard is read through once, as a
stream, to index it: where each image member starts, how long it is, its label and its content digest. Images are
then read by range (a seek, or one ranged GET), and an image whose features are cached is not read at all. The index
of a remote shard is kept under the cache folder by the shard's version tag, so a second run over unchanged shards
downloads nothing but the listing.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

from transferkit import storage
from transferkit.errors import DataError

SHARD_SUFFIX = ".tar"
MEMBER_MARK = "#"
"""A shard member is named `SHARD#MEMBER` (train-000000.tar#daisy/img_01.jpg) wherever an image path goes."""
LABEL_EXTENSIONS = ("json", "cls", "txt")
CLASSES_FILE = "classes.txt"
INDEX_FORMAT = 1
_IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff"})


@dataclass(frozen=True)
class Member:
    """One image of a shard: where its bytes are and what it is labelled."""

    ref: str
    offset: int
    size: int
    digest: str
    label: str | tuple[str, ...]


def is_member(item: object) -> bool:
    if not isinstance(item, str) or MEMBER_MARK not in item:
        return False
    return item.rsplit(MEMBER_MARK, 1)[0].lower().endswith(SHARD_SUFFIX)


def member_ref(shard: str, name: str) -> str:
    return f"{shard}{MEMBER_MARK}{name}"


def expand(pattern: str) -> list[str]:
    """Brace patterns (`shards/train-{000..009}.tar`, `{a,b}`) as the shard names they stand for."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def is_shard_pattern(source: str) -> bool:
    return str(source).lower().endswith(SHARD_SUFFIX) and not is_member(str(source))


_members: dict[str, Member] = {}
"""Every member indexed in this process, by ref: what reading it and looking its features up need."""
_lock = threading.Lock()


def known_digest(ref: str) -> str | None:
    member = _members.get(ref)
    return member.digest if member else None


def read_member(ref: str) -> bytes:
    """A member's bytes by range; OSError / storage.StorageError when they cannot be read."""
    member = _members.get(ref)
    if member is None:
        shard, name = ref.rsplit(MEMBER_MARK, 1)
        index_shard(shard)
        member = _members.get(ref)
        if member is None:
            raise FileNotFoundError(f"{name} is not an image member of {storage.redact(shard)}")
    shard = ref.rsplit(MEMBER_MARK, 1)[0]
    if storage.is_store_url(shard):
        data = storage.read_bytes(shard, member.offset, member.offset + member.size)
    else:
        with open(shard, "rb") as file:
            file.seek(member.offset)
            data = file.read(member.size)
    if len(data) != member.size:
        raise OSError(f"shard changed since it was indexed: {len(data)} of {member.size} bytes")
    return data


def _key_and_extension(name: str) -> tuple[str, str]:
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem), extension.lower()


def _classes_beside(shard: str) -> list[str] | None:
    """The class names of a `classes.txt` in the shard's folder, or None."""
    if storage.is_store_url(shard):
        url = storage.join(storage.parent(shard), CLASSES_FILE)
        try:
            text = storage.read_text(url)
        except storage.StorageError:
            return None
    else:
        path = Path(shard).parent / CLASSES_FILE
        if not path.is_file():
            return None
        text = path.read_text(encoding="utf-8-sig")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _label(shard: str, key: str, labels: dict[str, bytes], classes: list[str] | None) -> str | tuple[str, ...]:
    where = f"{storage.redact(shard)}, sample {key}"
    if "json" in labels:
        try:
            value = json.loads(labels["json"])
        except ValueError as err:
            raise DataError(f"{where}: the .json member is not JSON ({err}); write {{\"label\": name}}.") from None
        if isinstance(value, dict) and isinstance(value.get("labels"), list):
            return tuple(str(v) for v in value["labels"])
        for name in ("label", "class", "cls"):  # a name stays a name (class "5"); a number is an index
            if isinstance(value, dict) and isinstance(value.get(name), str):
                return value[name].strip()
            if isinstance(value, dict) and isinstance(value.get(name), int):
                return _class_name(where, str(value[name]), classes)
        if "cls" not in labels and "txt" not in labels:
            raise DataError(f"{where}: the .json member has no \"label\" or \"labels\" field; add one.")
    if "cls" in labels:
        return _class_name(where, labels["cls"].decode("utf-8", "replace").strip(), classes)
    return labels["txt"].decode("utf-8", "replace").strip()


def _class_name(where: str, value: str, classes: list[str] | None) -> str:
    if classes is None or not re.fullmatch(r"\d+", value):
        return value
    if int(value) >= len(classes):
        raise DataError(f"{where}: class index {value} is past the {len(classes)} names of {CLASSES_FILE}; fix the "
                        f"label or {CLASSES_FILE}.")
    return classes[int(value)]


def _index_file(shard: str, identity: str) -> Path:
    digest = hashlib.sha256(f"{INDEX_FORMAT}\n{shard}\n{identity}".encode()).hexdigest()[:32]
    return storage.cache_root() / "shard-index" / f"{digest}.json"


def _stored_index(shard: str, identity: str | None) -> list[Member] | None:
    if identity is None:
        return None
    try:
        rows = json.loads(_index_file(shard, identity).read_text())
    except (OSError, ValueError):
        return None
    return [Member(row[0], row[1], row[2], row[3], tuple(row[4]) if isinstance(row[4], list) else row[4])
            for row in rows]


def _store_index(shard: str, identity: str | None, members: list[Member]) -> None:
    if identity is None:
        return
    path = _index_file(shard, identity)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps([[m.ref, m.offset, m.size, m.digest, m.label] for m in members]))
        os.replace(temporary, path)
    except OSError:
        pass  # an index that cannot be kept is read again next time


def _open(shard: str):
    if storage.is_store_url(shard):
        fs = storage.filesystem(shard)
        return storage.retrying(lambda: fs.open(shard, "rb", block_size=1 << 23), shard, "open")
    return open(shard, "rb")


def index_shard(shard: str) -> list[Member]:
    """The image members of one shard, in order (read once per process; a remote shard's index is kept by its
    version tag). DataError for a shard that cannot be read, is truncated, or has a sample without a label."""
    identity = storage.stored_object(shard).identity if storage.is_store_url(shard) else None
    members = _stored_index(shard, identity)
    if members is None:
        members = _scan(shard)
        _store_index(shard, identity, members)
    with _lock:
        _members.update((m.ref, m) for m in members)
    return members


def _scan(shard: str) -> list[Member]:
    where = storage.redact(shard)
    classes = _classes_beside(shard)
    images: dict[str, tuple[str, int, int, str]] = {}
    labels: dict[str, dict[str, bytes]] = {}
    try:
        file = _open(shard)
    except storage.StorageError as err:
        raise DataError(str(err)) from None
    except OSError as err:
        raise DataError(f"cannot read shard {where}: {err.strerror or err}") from None
    name = None
    try:
        with file, tarfile.open(fileobj=file, mode="r|") as tar:
            for info in tar:
                name = info.name
                if not info.isfile():
                    continue
                key, extension = _key_and_extension(info.name)
                if extension in _IMAGE_EXTENSIONS:
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError("unexpected end of data")
                    images[key] = (info.name, info.offset_data, info.size, hashlib.sha256(data).hexdigest()[:32])
                elif extension in LABEL_EXTENSIONS:
                    labels.setdefault(key, {})[extension] = tar.extractfile(info).read()
            if _size(shard) < tar.offset + 2 * tarfile.BLOCKSIZE:  # no end-of-archive blocks: cut short
                raise tarfile.ReadError("it ends without the end-of-archive blocks")
    except (tarfile.TarError, EOFError) as err:
        at = f" after member {name}" if name else ""
        raise DataError(f"shard {where} is truncated or not a tar file{at} ({err}); copy or write the shard "
                        "again.") from None
    except storage.StorageError as err:
        raise DataError(str(err)) from None
    except OSError as err:
        raise DataError(f"cannot read shard {where}: {err}") from None
    unlabelled = [key for key in images if key not in labels]
    if unlabelled:
        raise DataError(f"shard {where} has images without a label (first: sample {unlabelled[0]}); each sample needs "
                        "a .cls, .txt or .json member beside its image (transferkit shard writes them).")
    return [Member(member_ref(shard, member), offset, size, digest, _label(shard, key, labels[key], classes))
            for key, (member, offset, size, digest) in images.items()]


def _size(shard: str) -> int:
    return storage.stored_object(shard).size if storage.is_store_url(shard) else os.path.getsize(shard)


def list_shards(source: str) -> list[str]:
    """The shards a source names: a pattern or one .tar (local or URL), or a folder / prefix of only .tar files."""
    if is_shard_pattern(source):
        shards = expand(source)
    else:
        shards = sorted(str(p) for p in Path(source).iterdir() if p.suffix.lower() == SHARD_SUFFIX)
    if not storage.is_store_url(source):
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise DataError(f"shard {missing[0]} does not exist ({len(missing)} of the {len(shards)} shards {source} "
                            "names are missing); check the pattern.")
    return shards


def split_words(shard: str) -> tuple[str, str]:
    """The words of a shard's name that may name its split: the start of its base name (train-000000.tar,
    val_3.tar) and its folder (train/000.tar)."""
    base = storage.base_name(shard) if storage.is_store_url(shard) else Path(shard).name
    folder = posixpath.basename(posixpath.dirname(shard.replace("\\", "/")))
    return re.split(r"[-_.]", base, maxsplit=1)[0].lower(), folder.lower()
