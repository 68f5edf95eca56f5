"""WebDataset tar shards as data: local folders of shards, brace patterns, shards in S3; labels in .cls (through
classes.txt), .json or .txt members; the same samples and bytes as the folder they hold; bad shards refused in one
line."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import fresh_cache, make_image_folder
from transferkit import shards, storage
from transferkit.data import hash_split, load_dataset, read_item
from transferkit.errors import DataError


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, bytes, dict[str, bytes]]]) -> Path:
    """A tar of (key, jpg bytes, {extension: label bytes}) samples, as WebDataset's writers lay them out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, labels in samples:
            _add(tar, f"{key}.jpg", image)
            for extension, value in labels.items():
                _add(tar, f"{key}.{extension}", value)
    return path


@pytest.fixture
def shapes(tmp_path) -> tuple[Path, Path]:
    """The synthetic shapes as a train/ + val/ folder, and the same images as shards with .cls labels and a
    classes.txt: train-000000.tar, train-000001.tar, val-000000.tar."""
    folder = tmp_path / "folder"
    make_image_folder(folder / "train", per_class=6, seed=1)
    make_image_folder(folder / "val", per_class=3, seed=2)
    classes = sorted(p.name for p in (folder / "train").iterdir())
    out = tmp_path / "shards"
    out.mkdir()
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    for split in ("train", "val"):
        samples = [(f"{p.parent.name}/{p.stem}", p.read_bytes(), {"cls": str(classes.index(p.parent.name)).encode()})
                   for p in sorted((folder / split).rglob("*.jpg"))]
        parts = [samples[::2], samples[1::2]] if split == "train" else [samples]
        for n, part in enumerate(parts):
            write_shard(out / f"{split}-{n:06d}.tar", part)
    return folder, out


def _by_name(samples) -> dict[str, str]:
    return {Path(str(s.path).split("#")[-1]).name: s.label for s in samples}


def test_a_folder_of_shards_reads_like_the_folder(shapes):
    folder, out = shapes
    from_shards, from_folder = load_dataset(out), load_dataset(folder)
    assert from_shards.classes == from_folder.classes
    for split in ("train", "val"):
        assert _by_name(from_shards.splits[split]) == _by_name(from_folder.splits[split])
        # in the folder's order too (the train shards interleave it), so that training sees the same rows
        assert list(_by_name(from_shards.splits[split])) == list(_by_name(from_folder.splits[split]))
    member = from_shards.splits["val"][0]
    assert shards.is_member(member.path) and str(member.path).startswith(str(out / "val-000000.tar") + "#")
    name = str(member.path).split("#")[1]
    assert read_item(member.path) == (folder / "val" / f"{name}").read_bytes()


def test_a_brace_pattern_and_labels_in_json_and_txt(tmp_path):
    folder = make_image_folder(tmp_path / "flat", per_class=4)
    files = sorted(folder.rglob("*.jpg"))
    write_shard(tmp_path / "s" / "part-0.tar", [(p.stem, p.read_bytes(), {"json": json.dumps(
        {"label": p.parent.name}).encode()}) for p in files[::2]])
    write_shard(tmp_path / "s" / "part-1.tar", [(p.stem, p.read_bytes(), {"txt": p.parent.name.encode()})
                                                for p in files[1::2]])
    dataset = load_dataset(str(tmp_path / "s" / "part-{0..1}.tar"), val_percent=25, test_percent=0)
    every = [s for samples in dataset.splits.values() for s in samples]
    assert {Path(str(s.path).split("#")[1]).stem: s.label for s in every} == {p.stem: p.parent.name for p in files}
    for sample in every:  # no split in the shard names: carved by file name, as a folder's images would be
        assert hash_split(str(sample.path).split("#")[1], 25, 0) == next(k for k, v in dataset.splits.items()
                                                                         if sample in v)


def test_label_sets_in_json_make_multi_label_data(tmp_path):
    folder = make_image_folder(tmp_path / "flat", per_class=3)
    files = sorted(folder.rglob("*.jpg"))
    write_shard(tmp_path / "s" / "train-0.tar", [(p.stem, p.read_bytes(), {"json": json.dumps(
        {"labels": [p.parent.name, "shape"] if i % 2 else [p.parent.name]}).encode()}) for i, p in enumerate(files)])
    dataset = load_dataset(tmp_path / "s", val_percent=0)
    assert dataset.multi_label and "shape" in dataset.classes
    assert sum(len(s.labels) == 2 for s in dataset.splits["train"]) == len(files) // 2


def test_a_truncated_shard_and_a_shard_without_labels_are_one_line_each(shapes, tmp_path):
    _, out = shapes
    whole = (out / "val-000000.tar").read_bytes()
    cut = tmp_path / "cut" / "val-000000.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole[:len(whole) // 2 + 100])
    with pytest.raises(DataError, match=r"val-000000.tar is truncated or not a tar file after member .*; copy"):
        load_dataset(str(cut))
    image = sorted(Path(out.parent / "folder").rglob("*.jpg"))[0].read_bytes()
    bare = write_shard(tmp_path / "bare" / "train-0.tar", [("one", image, {}), ("two", image, {})])
    with pytest.raises(DataError, match=r"train-0.tar has images without a label \(first: sample one\)"):
        load_dataset(bare)
    with pytest.raises(DataError, match=r"missing-\{0..2\}.tar|missing-0.tar does not exist"):
        load_dataset(str(tmp_path / "missing-{0..2}.tar"))


def test_cached_features_of_shard_members_need_no_read(shapes, tmp_path, monkeypatch):
    from transferkit.backbone import open_backbone
    from transferkit.features import Extractor, FeatureCache, extract_features

    _, out = shapes
    paths = [s.path for s in load_dataset(out).splits["train"]]
    extractor = Extractor(open_backbone(image_size=96), engine="onnxruntime")
    cache = FeatureCache(fresh_cache(tmp_path / "cache"))
    first = extract_features(extractor, paths, cache, progress=False)
    reads = []
    real = shards.read_member
    monkeypatch.setattr(shards, "read_member", lambda ref: reads.append(ref) or real(ref))
    again = extract_features(extractor, paths, cache, progress=False)
    assert reads == [] and again.computed == 0
    np.testing.assert_array_equal(again.features, first.features)


def test_shards_in_a_bucket_are_indexed_once(shapes, s3, monkeypatch):
    folder, out = shapes
    if not s3.exists("data"):
        s3.mkdir("data")
    for path in sorted(out.iterdir()):
        s3.pipe(f"data/shards/{path.name}", path.read_bytes())
    dataset = load_dataset("s3://data/shards/")
    assert dataset.classes == load_dataset(folder).classes
    assert _by_name(dataset.splits["train"]) == _by_name(load_dataset(folder).splits["train"])
    member = dataset.splits["val"][1]
    assert str(member.path).startswith("s3://data/shards/val-000000.tar#")
    name = str(member.path).split("#")[1]
    assert read_item(member.path) == (folder / "val" / name).read_bytes()
    opened = []
    real_open = shards._open
    monkeypatch.setattr(shards, "_open", lambda shard: opened.append(shard) or real_open(shard))
    monkeypatch.setattr(shards, "_members", {})  # a new process: the index comes from the cache folder
    monkeypatch.setattr(storage, "_objects", {})
    assert _by_name(load_dataset("s3://data/shards/").splits["val"]) == _by_name(dataset.splits["val"])
    assert opened == []
    s3.pipe("data/shards/val-000000.tar", (out / "val-000000.tar").read_bytes() + b"\0" * 1024)  # a new ETag
    monkeypatch.setattr(storage, "_objects", {})
    load_dataset("s3://data/shards/")
    assert opened == ["s3://data/shards/val-000000.tar"]


@pytest.mark.slow
def test_shard_then_train_on_the_shards_gives_the_folder_model(tmp_path):
    """`transferkit shard` writes a folder's splits as shards; training on them gives the model training on the
    folder gives (same images, same splits, same features)."""
    import subprocess
    import sys

    from safetensors.numpy import load_file

    folder = tmp_path / "folder"
    make_image_folder(folder / "train", per_class=10, seed=1)
    make_image_folder(folder / "val", per_class=4, seed=2)
    cache = fresh_cache(tmp_path / "cache")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True,
                              timeout=600)

    written = cli("shard", str(folder), str(tmp_path / "shards"), "--size", "40KB", "--json")
    assert written.returncode == 0, written.stderr
    summary = json.loads(written.stdout)
    assert len(summary["shards"]["train"]) == len(list((tmp_path / "shards").glob("train-*.tar"))) > 1
    assert summary["images"] == {"train": 30, "val": 12} and summary["classes"] == ["circles", "squares", "stripes"]
    assert cli("shard", str(folder), str(tmp_path / "shards")).returncode == 2  # already written: not overwritten
    runs = {}
    for name, data in (("folder", folder), ("shards", tmp_path / "shards")):
        done = cli("train", str(data), "--out", str(tmp_path / "runs" / name), "--image-size", "96", "--no-report",
                   "--no-doctor", "--cache-dir", str(cache), "--json")
        assert done.returncode == 0, done.stderr
        runs[name] = json.loads(done.stdout)
    assert runs["shards"]["images"] == runs["folder"]["images"]
    assert runs["shards"]["features_computed"] == 0  # the same bytes: every feature already in the cache
    assert runs["shards"]["val_accuracy"] == runs["folder"]["val_accuracy"]
    # the shards hold each split shuffled; read back in member-name order, they train exactly the folder's model
    shards_model = load_file(str(tmp_path / "runs" / "shards" / "model.safetensors"))
    for name, weights in load_file(str(tmp_path / "runs" / "folder" / "model.safetensors")).items():
        np.testing.assert_allclose(shards_model[name], weights, atol=1e-6)
