"""Where image bytes live besides local files: fsspec URLs (s3://, gs://, az://, file://, memory://, ...).

Credentials and endpoints are fsspec's and the store's own business (environment variables, ~/.aws, AWS_ENDPOINT_URL,
gcloud's and Azure's defaults): transferkit passes none, stores none, and prints URLs without any user:password part.
Reads and listings that fail for a reason that may pass (a dropped connection, a timeout, throttling) are retried
with exponential backoff; a missing object, a refused permission or missing credentials are not retried.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from transferkit.errors import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")

def default_cache_dir() -> Path:
    if os.environ.get("TRANSFERKIT_CACHE_DIR"):
        return Path(os.environ["TRANSFERKIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transferkit"

def cache_root(cache_dir: str | Path | None = None) -> Path:
    """transferkit's cache folder: features, the backbones' ONNX files and model summaries; `cache_dir` when given,
    else TRANSFERKIT_CACHE_DIR, else ~/.cache/transferkit."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
"""scheme://... with a scheme of two or more characters, so that a Windows drive (C:\\) is never taken for one."""
HTTP_SCHEMES = ("http", "https")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
"""The extra that installs each protocol's fsspec implementation (`pip install 'transferkit[s3]'`)."""

RETRIES = 4
"""Attempts per read or listing. With BACKOFF_S doubling (0.5, 1, 2 s) a store that is away for ~3 s is ridden out;
the store's own client (botocore) retries throttling inside each attempt as well."""
BACKOFF_S = 0.5
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                      "NoAuthTokenError", "DefaultCredentialsError", "ClientAuthenticationError"}
_ENDPOINT_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "InvalidEndpointError"}


class StorageError(Exception):
    """A read or listing that failed for good; the message says why in words (URL redacted)."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind
        """not_found, permission, credentials, endpoint, missing_package or unreadable."""


def is_store_url(item: object) -> bool:
    """An fsspec URL other than http(s): s3://bucket/key, gs://..., file:///..., memory://..."""
    if not isinstance(item, str):
        return False
    match = _URL.match(item)
    return match is not None and match.group(1).lower() not in HTTP_SCHEMES


def scheme(url: str) -> str:
    match = _URL.match(url)
    return match.group(1).lower() if match else ""


def redact(url: str) -> str:
    """The URL without any user:password@ part, as it may be shown or stored."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]+://)[^/@]*@", r"\1", str(url))


def join(base: str, relative: str) -> str:
    """`relative` (a path a CSV holds, or a key below a prefix) resolved against the URL `base`; full URLs stay."""
    if _URL.match(relative):
        return relative
    prefix = f"{scheme(base)}://"
    return prefix + posixpath.normpath(posixpath.join(base[len(prefix):], relative))


def parent(url: str) -> str:
    prefix = f"{scheme(url)}://"
    return prefix + posixpath.dirname(url[len(prefix):].rstrip("/"))


def base_name(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


_filesystems: dict[str, object] = {}
_lock = threading.Lock()


def filesystem(url: str):
    """The fsspec file system serving `url`'s protocol (one per protocol and process), or a one-line DataError saying
    which package to install."""
    protocol = scheme(url)
    with _lock:
        if protocol not in _filesystems:
            import fsspec

            try:
                _filesystems[protocol] = fsspec.filesystem(protocol, skip_instance_cache=True)
            except ImportError as err:
                extra = EXTRAS.get(protocol)
                hint = f"pip install 'transferkit[{extra}]'" if extra else f"install fsspec's {protocol} package"
                raise DataError(f"{redact(url)}: reading {protocol}:// needs a package that is not installed "
                                f"({err}); {hint}.") from None
            except ValueError as err:
                raise DataError(f"{redact(url)}: {protocol}:// is not a protocol fsspec knows ({err}); give a local "
                                "path or an s3://, gs://, az:// or file:// URL.") from None
        return _filesystems[protocol]


def _kind(err: BaseException) -> str:
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & _CREDENTIAL_ERRORS:
        return "credentials"
    if isinstance(err, FileNotFoundError):
        return "not_found"
    if isinstance(err, PermissionError):
        return "permission"
    if names & _ENDPOINT_ERRORS:
        return "endpoint"
    return "unreadable"


_WHY = {"not_found": "not found", "permission": "permission denied (check the credentials' rights)",
        "credentials": "no credentials for the store: set them where its client looks (for S3: AWS_ACCESS_KEY_ID and "
                       "AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials)",
        "endpoint": "cannot reach the store (check AWS_ENDPOINT_URL or the network)"}


def retrying(action: Callable[[], T], url: str, what: str = "read") -> T:
    """`action()`, tried RETRIES times with exponential backoff while it fails for a reason that may pass; a
    StorageError naming the (redacted) URL once it fails for good."""
    for attempt in range(RETRIES):
        try:
            return action()
        except (StorageError, DataError):
            raise
        except Exception as err:  # the stores' clients raise their own classes; classified by name in _kind
            kind = _kind(err)
            if kind in ("not_found", "permission", "credentials") or attempt == RETRIES - 1:
                why = _WHY.get(kind) or f"{type(err).__name__}: {err}"
                raise StorageError(f"cannot {what} {redact(url)}: {why}", kind) from None
            delay = BACKOFF_S * 2 ** attempt
            log.debug("%s %s failed (%s); retrying in %.1f s", what, redact(url), err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class StoredObject:
    url: str
    size: int
    version: str | None
    """The store's version tag for this content (version id, generation or ETag), None when it gives none."""

    @property
    def identity(self) -> str | None:
        """What changes when the object's bytes change, as far as the store says: its version tag and size."""
        return None if self.version is None else f"{self.version}:{self.size}"


_VERSION_FIELDS = ("VersionId", "version_id", "generation", "ETag", "etag", "md5Hash", "content_md5", "checksum")
_objects: dict[str, StoredObject] = {}
"""Every object listed in this process, by URL: a listing already says each object's version, so reading the cache
needs no request per object."""


def _stored_object(url: str, info: dict) -> StoredObject:
    version = next((str(info[name]) for name in _VERSION_FIELDS if info.get(name) not in (None, "")), None)
    if version is None and scheme(url) == "file" and info.get("mtime") is not None:
        version = f"{info['mtime']}:{info.get('ino', '')}"
    found = StoredObject(url, int(info.get("size") or 0), version)
    _objects[url] = found
    return found


def list_objects(url: str) -> list[StoredObject]:
    """Every object at or below the URL (a prefix is a folder), sorted by URL; a DataError when there is none or the
    listing fails for good."""
    fs = filesystem(url)
    protocol = f"{scheme(url)}://"
    path = fs._strip_protocol(url)
    fs.invalidate_cache(path)  # a listing is of the store as it is now, not as this process last saw it
    listing = retrying(lambda: fs.find(path, detail=True, withdirs=False), url, "list")
    fs.invalidate_cache(path)  # the versions are kept below, once; fsspec's copy would grow with the listing
    objects = [_stored_object(protocol + name.lstrip("/") if protocol != "file://" else protocol + name, info)
               for name, info in sorted(listing.items()) if info.get("type", "file") != "directory"]
    if not objects:
        raise DataError(f"{redact(url)} holds no objects (an empty prefix, or a bucket or path that is not there); "
                        "check the URL.")
    return objects


def stored_object(url: str) -> StoredObject:
    """The object's size and version, from this process's listings or else asked of the store."""
    if url in _objects:
        return _objects[url]
    fs = filesystem(url)
    return _stored_object(url, retrying(lambda: fs.info(url), url, "look up"))


def stored_objects(urls: list[str]) -> dict[str, str | None]:
    """Each object's identity (version and size; None when unknown or unreadable): listed ones from the listing,
    the others asked of the store, many at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def identity(url: str) -> str | None:
        try:
            return stored_object(url).identity
        except (StorageError, DataError):
            return None

    if all(url in _objects for url in urls):
        return {url: _objects[url].identity for url in urls}
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="transferkit-stat") as pool:
        return dict(zip(urls, pool.map(identity, urls)))


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The object's bytes (or bytes start..end), retried; StorageError when it cannot be read."""
    fs = filesystem(url)
    return retrying(lambda: fs.cat_file(url, start=start, end=end), url)


def read_text(url: str) -> str:
    data = read_bytes(url)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{redact(url)} is not a UTF-8 text file ({err.reason}); save it as UTF-8.") from None


def is_object(url: str) -> bool:
    """Whether the URL names one object (not a prefix); False when it cannot be told."""
    fs = filesystem(url)
    try:
        return bool(retrying(lambda: fs.isfile(url), url, "look up"))
    except StorageError as err:
        if err.kind in ("credentials", "endpoint"):
            raise DataError(str(err)) from None
        return False
