"""`transferkit download` against an HTTP server on loopback (never the internet): verified, resumed, unpacked in a
layout train reads, unsafe archives refused."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_image_folder
from transferkit import DownloadError, download, download_url
from transferkit.cli import app
from transferkit.data import load_dataset
from transferkit.download import DATASETS, Remote, download_spec


class Server:
    """Serves `files` (path -> bytes) with Range support. `cut_after[path] = n` makes the next response for that
    path announce the whole length, send n bytes and drop the connection. `requests` records (path, Range)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_error(416)
                        return
                self.send_response(206 if match else 200)
                if match:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.cut_after.pop(self.path, None)
                self.wfile.write(body[start:] if cut is None else body[start:start + cut])
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    running = Server()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


def _zip_of_folder(folder: Path, top: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for path in sorted(folder.rglob("*")):
            bundle.write(path, f"{top}/{path.relative_to(folder)}")
    return buffer.getvalue()


@pytest.fixture
def shapes_zip(tmp_path) -> bytes:
    return _zip_of_folder(make_image_folder(tmp_path / "src", per_class=4), "shapes")


def test_download_verifies_and_unpacks_into_a_folder_train_reads(server, shapes_zip, tmp_path):
    server.files["/shapes.zip"] = shapes_zip
    digest = hashlib.sha256(shapes_zip).hexdigest()
    result = download_url(server.url("/shapes.zip"), tmp_path / "data", sha256=digest, size=len(shapes_zip))
    assert result.fetched and result.folder == tmp_path / "data" / "shapes"
    assert result.data == result.folder / "shapes"
    assert load_dataset(result.data).classes == ["circles", "squares", "stripes"]
    assert json.loads((result.folder / ".transferkit-download.json").read_text())["files"][0]["sha256"] == digest
    assert not list((tmp_path / "data" / ".downloads").iterdir())  # the archive is removed once unpacked

    again = download_url(server.url("/shapes.zip"), tmp_path / "data", sha256=digest)
    assert not again.fetched and again.data == result.data and len(server.requests) == 1


def test_checksum_mismatch_keeps_nothing(server, shapes_zip, tmp_path):
    server.files["/shapes.zip"] = shapes_zip
    with pytest.raises(DownloadError, match="checksum mismatch .* the file was deleted"):
        download_url(server.url("/shapes.zip"), tmp_path / "data", sha256="0" * 64)
    assert not (tmp_path / "data" / "shapes").exists() and not list((tmp_path / "data" / ".downloads").iterdir())

    with pytest.raises(DownloadError, match="HTTP 404"):
        download_url(server.url("/missing.zip"), tmp_path / "data")


def test_interrupted_transfer_resumes_where_it_stopped(server, shapes_zip, tmp_path):
    server.files["/shapes.zip"] = shapes_zip
    digest = hashlib.sha256(shapes_zip).hexdigest()
    server.cut_after["/shapes.zip"] = 5000
    with pytest.raises(DownloadError, match="5,000 bytes are kept .* run the same command again to resume"):
        download_url(server.url("/shapes.zip"), tmp_path / "data", sha256=digest, retries=0)
    assert (tmp_path / "data" / ".downloads" / "shapes.zip.part").stat().st_size == 5000

    result = download_url(server.url("/shapes.zip"), tmp_path / "data", sha256=digest, retries=0)
    assert server.requests[-1] == ("/shapes.zip", "bytes=5000-")
    assert load_dataset(result.data).classes == ["circles", "squares", "stripes"]

    # with retries, one call resumes by itself
    server.cut_after["/shapes.zip"] = 7000
    server.requests.clear()
    download_url(server.url("/shapes.zip"), tmp_path / "other", sha256=digest, retries=2)
    assert [r for _, r in server.requests] == [None, "bytes=7000-"]


@pytest.mark.parametrize("evil", ["../escaped.txt", "ABSOLUTE", "ok/../../escaped.txt"])
def test_archive_entries_that_lead_out_are_refused(server, tmp_path, evil):
    absolute = tmp_path / "elsewhere" / "escaped.txt"  # an absolute path of this test's own
    evil = str(absolute) if evil == "ABSOLUTE" else evil
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for name, data in (("set/cats/a.txt", b"fine"), (evil, b"gotcha")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    server.files["/evil.tar.gz"] = buffer.getvalue()
    with pytest.raises(DownloadError, match="outside the target folder .* nothing was unpacked"):
        download_url(server.url("/evil.tar.gz"), tmp_path / "data")
    assert not (tmp_path / "escaped.txt").exists() and not absolute.exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".downloads"]


def test_pets_layout_gives_a_csv_with_the_official_split(server, tmp_path):
    """The registry's Oxford-IIIT Pet entry, served locally: breed from the file name, trainval/test lists."""
    images = tmp_path / "pets-src" / "images"
    source = make_image_folder(tmp_path / "drawn", per_class=4, classes={
        "Abyssinian": ("ellipse", (200, 40, 40)), "great_pyrenees": ("rectangle", (40, 40, 200))})
    images.mkdir(parents=True)
    lists = {"trainval.txt": [], "test.txt": []}
    for i, path in enumerate(sorted(source.rglob("*.jpg"))):
        stem = f"{path.parent.name}_{i}"
        path.rename(images / f"{stem}.jpg")
        lists["test.txt" if i % 4 == 0 else "trainval.txt"].append(f"{stem} 1 1 1")
    annotations = io.BytesIO()
    with tarfile.open(fileobj=annotations, mode="w:gz") as bundle:
        for name, lines in lists.items():
            data = ("#Image CLASS-ID SPECIES BREED ID\n" + "\n".join(lines) + "\n").encode()
            info = tarfile.TarInfo(f"annotations/{name}")
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    pictures = io.BytesIO()
    with tarfile.open(fileobj=pictures, mode="w:gz") as bundle:
        bundle.add(images, "images")
    server.files["/images.tar.gz"], server.files["/annotations.tar.gz"] = pictures.getvalue(), annotations.getvalue()

    spec = replace(DATASETS["pets"], files=tuple(Remote(server.url(f"/{name}")) for name in server.files))
    result = download_spec(spec, tmp_path / "data")
    assert result.data == tmp_path / "data" / "pets" / "pets.csv"
    dataset = load_dataset(result.data)
    assert dataset.classes == ["Abyssinian", "great_pyrenees"]
    sizes = {name: len(samples) for name, samples in dataset.splits.items()}
    assert sizes["test"] == 2 and sizes["train"] + sizes.get("val", 0) == 6


def test_registry_and_cli(server, shapes_zip, tmp_path):
    assert set(DATASETS) == {"hymenoptera", "flowers", "pets", "dogs", "food-101"}
    for spec in DATASETS.values():
        for remote in spec.files:
            assert remote.url.startswith(("https://", "http://")) and remote.filename.endswith((".zip", ".tgz",
                                                                                              ".tar", ".tar.gz"))
            assert (remote.sha256 is None) == (remote.size is None) == (spec.name == "hymenoptera")
    listing = CliRunner().invoke(app, ["download", "--list"])
    assert listing.exit_code == 0 and "food-101" in listing.stdout

    unknown = CliRunner().invoke(app, ["download", "imagenet", "--to", str(tmp_path)])
    assert unknown.exit_code == 2 and "unknown dataset 'imagenet'" in unknown.output

    server.files["/shapes.zip"] = shapes_zip
    fetched = CliRunner().invoke(app, ["download", "--url", server.url("/shapes.zip"), "--to", str(tmp_path),
                                       "--sha256", hashlib.sha256(shapes_zip).hexdigest()])
    assert fetched.exit_code == 0, fetched.output
    assert f"transferkit train {tmp_path / 'shapes' / 'shapes'}" in fetched.stdout

    with pytest.raises(DownloadError, match="exists and is not a finished transferkit download"):
        (tmp_path / "hymenoptera").mkdir()
        download("hymenoptera", tmp_path)
