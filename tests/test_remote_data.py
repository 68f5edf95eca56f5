"""Data in object storage: real photos in a real S3 API on loopback (moto's server), read through fsspec/s3fs as a
local folder is read, streamed, cached by the objects' ETags, and refused with one line when the store cannot be
used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import transferkit
from conftest import fresh_cache
from transferkit import storage
from transferkit.data import load_dataset, read_item
from transferkit.errors import DataError

PER_CLASS = {"train": 10, "val": 4}


def _photos(hymenoptera: Path, root: Path) -> Path:
    """A small train/ + val/ slice of hymenoptera, as local files."""
    for split, count in PER_CLASS.items():
        for label in ("ants", "bees"):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for source in sorted((hymenoptera / split / label).iterdir())[:count]:
                (root / split / label / source.name).write_bytes(source.read_bytes())
    return root


def _upload(s3, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.pipe(f"{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())


@pytest.fixture
def bucket(s3, hymenoptera, tmp_path):
    """s3://photos/h/ holding the same files as the local folder returned with it."""
    local = _photos(hymenoptera, tmp_path / "local")
    if not s3.exists("photos"):
        s3.mkdir("photos")
    _upload(s3, local, "photos/h")
    s3.pipe("photos/h/train/ants/readme.txt", b"not an image")
    return local


def _relative(samples, root: str) -> list[tuple[str, str]]:
    return sorted((str(s.path).removeprefix(root).lstrip("/"), s.label) for s in samples)


def test_a_prefix_reads_like_the_folder_it_was_copied_from(bucket):
    remote, local = load_dataset("s3://photos/h/"), load_dataset(bucket)
    assert remote.classes == local.classes == ["ants", "bees"]
    for split in ("train", "val"):
        assert _relative(remote.splits[split], "s3://photos/h") == _relative(local.splits[split], str(bucket))
    assert [s.path for s in remote.skipped] == ["s3://photos/h/train/ants/readme.txt"]
    first = remote.splits["train"][0]
    assert read_item(first.path) == (bucket / str(first.path).removeprefix("s3://photos/h/")).read_bytes()


def test_a_csv_in_the_bucket_with_relative_paths_and_full_urls(bucket, s3):
    rows = ["path,label", "train/ants/" + sorted((bucket / "train" / "ants").iterdir())[0].name + ",ants"]
    bee = sorted((bucket / "train" / "bees").iterdir())[0].name
    rows.append(f"s3://photos/h/train/bees/{bee},bees")
    rows.append("train/bees/not-there.jpg,bees")
    s3.pipe("photos/lists/labels.csv", "\n".join(rows).encode())
    s3.pipe("photos/lists/train/ants/" + rows[1].split("/")[-1].split(",")[0],
            (bucket / "train" / "ants" / rows[1].split("/")[-1].split(",")[0]).read_bytes())
    dataset = load_dataset("s3://photos/lists/labels.csv", val_percent=0, test_percent=0)
    paths = sorted(str(s.path) for s in dataset.splits["train"])
    assert paths[0].startswith("s3://photos/h/train/bees/") and paths[1].startswith("s3://photos/lists/train/ants/")
    assert any(p.endswith("not-there.jpg") for p in paths)  # not checked up front: skipped when read, as below
    with pytest.raises(Exception, match="not found"):
        from transferkit.data import ImageDecodeError

        try:
            read_item(next(p for p in paths if p.endswith("not-there.jpg")))
        except ImageDecodeError as err:
            raise AssertionError(str(err)) from None


def _model(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "model.safetensors"))


@pytest.mark.slow
def test_training_from_s3_gives_the_model_training_from_disk_gives(bucket, tmp_path, monkeypatch):
    options = dict(report=False, doctor=False, progress=False, seed=3)
    remote = transferkit.train("s3://photos/h/", out=tmp_path / "runs" / "remote",
                               cache_dir=str(fresh_cache(tmp_path / "c1")), **options)
    local = transferkit.train(bucket, out=tmp_path / "runs" / "local", cache_dir=str(fresh_cache(tmp_path / "c2")),
                              **options)
    assert remote.val_accuracy == local.val_accuracy
    for name, weights in _model(tmp_path / "runs" / "local").items():
        np.testing.assert_allclose(_model(tmp_path / "runs" / "remote")[name], weights, atol=1e-5)
    config = json.loads((tmp_path / "runs" / "remote" / "config.json").read_text())
    assert config["data"]["source"] == "s3://photos/h/"


def test_a_second_run_over_unchanged_objects_downloads_nothing(bucket, s3, tmp_path, monkeypatch):
    """The cache knows each object by its ETag and size: unchanged objects are not read again; a changed one is."""
    from transferkit.backbone import open_backbone
    from transferkit.features import Extractor, FeatureCache, extract_features

    reads: list[str] = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda url, *a: reads.append(url) or real_read(url, *a))
    extractor = Extractor(open_backbone(image_size=96), engine="onnxruntime")
    paths = [s.path for s in load_dataset("s3://photos/h/").splits["val"]]
    cache = FeatureCache(fresh_cache(tmp_path / "cache"))
    first = extract_features(extractor, paths, cache, progress=False)
    assert sorted(reads) == sorted(paths) and first.computed == len(paths)
    reads.clear()
    monkeypatch.setattr(storage, "_objects", {})  # a new process: versions come from a new listing
    again = extract_features(extractor, [s.path for s in load_dataset("s3://photos/h/").splits["val"]], cache,
                             progress=False)
    assert reads == [] and again.computed == 0
    np.testing.assert_array_equal(again.features, first.features)
    changed = paths[0]
    s3.pipe(changed.removeprefix("s3://"), (bucket / "train" / "bees" / sorted(
        os.listdir(bucket / "train" / "bees"))[-1]).read_bytes())
    monkeypatch.setattr(storage, "_objects", {})
    third = extract_features(extractor, [s.path for s in load_dataset("s3://photos/h/").splits["val"]], cache,
                             progress=False)
    assert reads == [changed] and third.computed == 1
    assert not np.allclose(third.features[0], first.features[0])


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.slow
def test_cli_trains_from_a_bucket_and_never_writes_the_credentials(bucket, s3_server, tmp_path):
    env = s3_server.environment()
    done = _cli(["train", "s3://photos/h/", "--out", str(tmp_path / "run"), "--image-size", "96", "--no-report",
                 "--json"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"] == {"train": 2 * PER_CLASS["train"], "val": 2 * PER_CLASS["val"]}
    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in done.stdout + done.stderr
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes() and env["AWS_ACCESS_KEY_ID"].encode() not in \
                path.read_bytes(), path
    predicted = _cli(["predict", str(tmp_path / "run"), "s3://photos/h/val/bees/", "--format", "csv"], env, tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    inputs = {line.split(",")[0] for line in predicted.stdout.splitlines()[1:]}
    assert len(inputs) == PER_CLASS["val"] and all(i.startswith("s3://photos/h/val/bees/") for i in inputs)


@pytest.mark.parametrize("url, env_change, words", [
    ("s3://no-such-bucket/photos/", {}, ["s3://no-such-bucket/photos/", "not found"]),
    ("s3://photos/h/train/ants/missing.csv", {}, ["s3://photos/h/train/ants/missing.csv", "not found"]),
    ("s3://photos/h/", {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}, ["s3://photos/h/", "credentials"]),
    ("s3://photos/h/", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, ["s3://photos/h/", "cannot reach"]),
    ("zz3://photos/h/", {}, ["zz3://", "protocol"]),
])
def test_stores_that_cannot_be_used_are_one_line_and_exit_2(bucket, s3_server, tmp_path, url, env_change, words):
    env = {**s3_server.environment(), "AWS_MAX_ATTEMPTS": "1", **env_change}
    env = {k: v for k, v in env.items() if v}
    if "AWS_ACCESS_KEY_ID" in env_change:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.pop(name, None)
    done = _cli(["train", url, "--out", str(tmp_path / "run"), "--no-report"], env, tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and all(word in lines[0] for word in words), done.stderr
    assert "transferkit-test-secret" not in done.stderr


def test_missing_s3_support_names_the_extra(monkeypatch):
    from fsspec.registry import _registry

    monkeypatch.setattr(storage, "_filesystems", {})
    monkeypatch.delitem(_registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    with pytest.raises(DataError, match=r"s3://photos/h/.*pip install 'transferkit\[s3\]'"):
        load_dataset("s3://photos/h/")


def test_passing_failures_are_retried_and_lasting_ones_are_not(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.001)
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionResetError("connection reset by peer")
        return b"ok"

    assert storage.retrying(flaky, "s3://b/k") == b"ok" and len(attempts) == 3
    attempts.clear()

    def missing():
        attempts.append(1)
        raise FileNotFoundError("b/k")

    with pytest.raises(storage.StorageError, match="not found") as caught:
        storage.retrying(missing, "s3://user:pass@b/k")
    assert len(attempts) == 1 and caught.value.kind == "not_found" and "pass" not in str(caught.value)
    attempts.clear()

    def down():
        attempts.append(1)
        raise TimeoutError("timed out")

    with pytest.raises(storage.StorageError):
        storage.retrying(down, "s3://b/k")
    assert len(attempts) == storage.RETRIES


def test_an_unreadable_object_is_skipped_and_listed(bucket, s3, tmp_path):
    s3.pipe("photos/h/val/ants/broken.jpg", b"\xff\xd8 this is not a jpeg")
    from transferkit.backbone import open_backbone
    from transferkit.features import Extractor, extract_features

    paths = [s.path for s in load_dataset("s3://photos/h/").splits["val"]]
    extractor = Extractor(open_backbone(image_size=96), engine="onnxruntime")
    result = extract_features(extractor, paths, None, progress=False)
    assert [s.path for s in result.skipped] == ["s3://photos/h/val/ants/broken.jpg"]
    assert len(result.kept) == len(paths) - 1


@pytest.mark.slow
def test_doctor_and_evaluate_read_a_bucket(bucket, s3, s3_server, tmp_path):
    s3.pipe("photos/h/val/ants/broken.jpg", b"\xff\xd8 this is not a jpeg")
    s3.pipe("photos/h/val/bees/copy.jpg", s3.cat_file(next(p for p in s3.find("photos/h/train/bees"))))
    env = s3_server.environment()
    doctor = _cli(["doctor", "s3://photos/h/", "--json"], env, tmp_path)
    assert doctor.returncode == 0, doctor.stderr
    findings = json.loads(doctor.stdout)["findings"]
    assert {(f["kind"], f["path"]) for f in findings if f["kind"] in ("unreadable", "leak_exact")} >= {
        ("unreadable", "s3://photos/h/val/ants/broken.jpg"), ("leak_exact", "s3://photos/h/val/bees/copy.jpg")}
    trained = _cli(["train", str(bucket), "--out", str(tmp_path / "run"), "--image-size", "96", "--no-report",
                    "--no-doctor"], env, tmp_path)
    assert trained.returncode == 0, trained.stderr
    evaluated = _cli(["evaluate", str(tmp_path / "run"), "s3://photos/h/val/", "--json"], env, tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["accuracy"] >= 0.8 and result["n"] == 2 * PER_CLASS["val"] + 1  # broken.jpg skipped
