"""`transferkit shard`: any source written as WebDataset tar shards, the original bytes and the splits kept."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import uuid
from collections import Counter
from pathlib import Path

import pytest
from conftest import shared_dataset

from transferkit.data import load_dataset
from transferkit.errors import DataError
from transferkit.make_shards import parse_size, write_shards

SPLIT_NAMES = ("train", "val", "test")


def _copy_photos(source: Path, target: Path, per_class: int, skip: int = 0) -> None:
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / class_dir.name).mkdir(parents=True, exist_ok=True)
        photos = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        for photo in photos[skip:skip + per_class]:
            shutil.copyfile(photo, target / class_dir.name / photo.name)


@pytest.fixture
def photo_layout(hymenoptera, tmp_path) -> Path:
    """train/ and val/ of real ant and bee photos, with a .jpeg, a name with dots, a _nohash_ name and one stem
    twice in a class (in two subfolders)."""
    root = tmp_path / "photos"
    _copy_photos(hymenoptera / "train", root / "train", 8)
    _copy_photos(hymenoptera / "val", root / "val", 4)
    shutil.copyfile(hymenoptera / "train" / "ants" / "formica.jpeg", root / "train" / "ants" / "formica.jpeg")
    ants = sorted((hymenoptera / "train" / "ants").glob("*.jpg"))
    shutil.copyfile(ants[20], root / "train" / "ants" / "ant.v2.final.jpg")
    shutil.copyfile(ants[21], root / "train" / "ants" / "ant_nohash_3.jpg")
    for sub, photo in (("a", ants[22]), ("b", ants[23])):
        (root / "train" / "ants" / sub).mkdir()
        shutil.copyfile(photo, root / "train" / "ants" / sub / "same.jpg")
    return root


@pytest.fixture
def flat_photos(hymenoptera, tmp_path) -> Path:
    """40 photos a class in class folders, no split folders: val and test are carved by the hash rule."""
    root = tmp_path / "flat"
    _copy_photos(hymenoptera / "train", root, 40)
    return root


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_shards(paths: list[str]) -> list[dict]:
    """Every sample of the shards (read with the standard library's tarfile), in order: key -> {ext: bytes}."""
    samples: list[dict] = []
    for path in paths:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            assert members, path
            for info in members:
                assert info.isreg(), f"{info.name} in {path} is not a regular file"
                folder, _, base = info.name.rpartition("/")
                stem, _, extension = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key, "__shard__": path})
                samples[-1][extension] = tar.extractfile(info).read()
    return samples


def _image(sample: dict) -> tuple[str, bytes]:
    found = [(k, v) for k, v in sample.items() if k in ("jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff")]
    assert len(found) == 1, sample.keys()
    return found[0]


def _source_counts(dataset) -> Counter:
    return Counter((split, s.label if isinstance(s.label, str) else tuple(sorted(s.label)),
                    _digest(Path(s.path).read_bytes()))
                   for split, samples in dataset.splits.items() for s in samples)


def _shard_counts(result) -> Counter:
    counts: Counter = Counter()
    for split, paths in result.shards.items():
        for sample in _read_shards(paths):
            value = json.loads(sample["json"])
            label = value["label"] if "label" in value else tuple(sorted(value["labels"]))
            counts[(split, label, _digest(_image(sample)[1]))] += 1
    return counts


def test_shards_hold_the_original_bytes_labels_and_classes(photo_layout, tmp_path):
    out = tmp_path / "shards"
    result = write_shards(photo_layout, out, progress=False)
    dataset = load_dataset(photo_layout)
    assert (out / "classes.txt").read_text().splitlines() == dataset.classes == ["ants", "bees"]
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "train-000000.tar", "val-000000.tar"]
    assert result.shards == {"train": [str(out / "train-000000.tar")], "val": [str(out / "val-000000.tar")]}
    assert result.images == {split: len(samples) for split, samples in dataset.splits.items()}
    assert result.bytes == sum(p.stat().st_size for p in out.glob("*.tar"))
    assert not result.skipped

    samples = _read_shards(result.shards["train"]) + _read_shards(result.shards["val"])
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == sum(result.images.values())
    for sample in samples:
        extension, _ = _image(sample)
        assert set(sample) - {"__key__", "__shard__"} == {extension, "cls", "json"}
        assert "." not in sample["__key__"]
        label = json.loads(sample["json"])["label"]
        assert dataset.classes[int(sample["cls"].decode())] == label
        assert sample["__key__"].split("/")[0] == label  # photos of class folders: key = class/stem
    assert {"ants/ant_v2_final", "ants/ant_nohash_3", "ants/same", "ants/same_2", "ants/formica"} <= set(keys)
    assert "jpeg" in next(s for s in samples if s["__key__"] == "ants/formica")
    # the bytes are the files' own, each in the split load_dataset gives it
    assert _shard_counts(result) == _source_counts(dataset)


def test_carved_splits_are_load_datasets_and_read_back(flat_photos, tmp_path):
    out = tmp_path / "shards"
    result = write_shards(flat_photos, out, val_percent=20, test_percent=20, progress=False)
    dataset = load_dataset(flat_photos, val_percent=20, test_percent=20)
    assert set(result.shards) == set(dataset.splits) == set(SPLIT_NAMES)
    assert _shard_counts(result) == _source_counts(dataset)
    # transferkit's own reader and webdataset read them back as the same samples
    again = load_dataset(out)
    assert again.classes == dataset.classes
    assert {split: Counter(s.label for s in samples) for split, samples in again.splits.items()} == \
        {split: Counter(s.label for s in samples) for split, samples in dataset.splits.items()}
    import webdataset

    streamed = list(webdataset.WebDataset(result.shards["val"], shardshuffle=False))
    assert sorted(s["__key__"] for s in streamed) == sorted(s["__key__"] for s in _read_shards(result.shards["val"]))
    assert all({"jpg", "cls", "json"} <= set(s) for s in streamed)


def _end_of_content(path: str) -> tuple[int, int, list[str]]:
    """A shard's bytes up to the end of its last member, its file size, and its sample keys in order."""
    keys: list[str] = []
    end = 0
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            end = info.offset_data + -(-info.size // 512) * 512
            key = info.name.partition(".")[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return end, Path(path).stat().st_size, keys


def _check_filled(result, limit: int) -> None:
    """Each shard is at most `limit` bytes (unless it holds one sample), and the next shard's first sample would
    have taken it past `limit`: shards are closed neither too late nor too early."""
    for split, paths in result.shards.items():
        for path, following in zip(paths, paths[1:] + [None]):
            end, size, keys = _end_of_content(path)
            assert size == -(-(end + 1024) // 10240) * 10240  # members, end-of-archive blocks, padded to a record
            assert size <= limit or len(keys) == 1, f"{path}: {size} bytes for {len(keys)} samples"
            if following is not None:
                with tarfile.open(following) as tar:
                    infos = tar.getmembers()
                first = infos[0].name.partition(".")[0]
                needed = sum(512 + -(-i.size // 512) * 512 for i in infos if i.name.partition(".")[0] == first)
                assert -(-(end + needed + 1024) // 10240) * 10240 > limit, f"{following} started too early"
    assert result.bytes == sum(Path(p).stat().st_size for paths in result.shards.values() for p in paths)
    assert sum(result.images.values()) == sum(len(_read_shards(paths)) for paths in result.shards.values())


def test_shards_of_photos_stay_under_the_size(flat_photos, tmp_path):
    result = write_shards(flat_photos, tmp_path / "shards", size="400KB", progress=False)
    assert len(result.shards["train"]) >= 5
    assert max(p.stat().st_size for p in flat_photos.rglob("*.jpg")) > 150_000  # a few photos fill a shard
    _check_filled(result, 400_000)


def test_shards_of_thumbnails_are_filled_to_the_byte(tmp_path):
    source = tmp_path / "thumbnails"
    _copy_photos(shared_dataset("flowers100"), source, 30)
    result = write_shards(source, tmp_path / "shards", size="64KiB", progress=False)
    assert sum(len(paths) for paths in result.shards.values()) >= 8
    _check_filled(result, 64 * 1024)


def test_an_image_larger_than_the_size_gets_a_shard_of_its_own(photo_layout, tmp_path):
    result = write_shards(photo_layout, tmp_path / "shards", size="50KB", progress=False)
    shard_samples = [_read_shards([p]) for p in result.shards["train"]]
    assert len(shard_samples) >= result.images["train"] - 2
    for path, samples in zip(result.shards["train"], shard_samples):
        if Path(path).stat().st_size > 50_000:
            assert len(samples) == 1


def test_unreadable_images_are_skipped_and_reported(photo_layout, tmp_path):
    ants = photo_layout / "train" / "ants"
    (ants / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (ants / "empty.jpg").write_bytes(b"")
    (ants / "notes.jpg").write_text("not a photo")
    result = write_shards(photo_layout, tmp_path / "shards", progress=False)
    reasons = {Path(s.path).name: s.reason for s in result.skipped}
    assert reasons.keys() == {"broken.jpg", "empty.jpg", "notes.jpg"}
    assert "broken symbolic link" in reasons["broken.jpg"]
    assert "empty" in reasons["empty.jpg"]
    assert "not an image" in reasons["notes.jpg"]
    keys = {s["__key__"] for s in _read_shards(result.shards["train"])}
    assert not keys & {"ants/broken", "ants/empty", "ants/notes"}
    assert result.images["train"] == len(load_dataset(photo_layout).splits["train"]) - 3 == len(keys)


@pytest.mark.parametrize("text, expected", [("1GB", 10**9), ("500MB", 500 * 10**6), ("64MiB", 64 * 2**20),
                                            ("1048576", 1048576), (" 1.5 gb ", 1_500_000_000), (4096, 4096),
                                            ("2KiB", 2048), ("1e6", 10**6)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "12XB", "-5MB", "0", "0.2", "1.5.3GB", "1 G B", None, True])
def test_a_bad_size_is_refused(text, photo_layout, tmp_path):
    with pytest.raises(DataError, match="--size") as raised:
        write_shards(photo_layout, tmp_path / "shards", size=text, progress=False)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "shards").exists()


def test_existing_shards_are_refused_unless_overwritten(photo_layout, tmp_path):
    out = tmp_path / "shards"
    first = write_shards(photo_layout, out, size="200KB", progress=False)
    assert len(first.shards["train"]) > 1
    with pytest.raises(DataError, match="already holds .* .tar files"):
        write_shards(photo_layout, out, progress=False)
    second = write_shards(photo_layout, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "train-000000.tar", "val-000000.tar"]
    assert second.images == first.images
    with pytest.raises(DataError, match="holds the shards being read"):
        write_shards(out, out, overwrite=True, progress=False)


def test_shards_go_to_an_fsspec_url(photo_layout):
    import fsspec

    url = f"memory://transferkit-test-{uuid.uuid4().hex}/shards"
    try:
        result = write_shards(photo_layout, url + "/", progress=False)
        assert result.shards == {"train": [f"{url}/train-000000.tar"], "val": [f"{url}/val-000000.tar"]}
        with fsspec.open(f"{url}/classes.txt", "rb") as file:
            assert file.read() == b"ants\nbees\n"
        counts, total = Counter(), 0
        for split, (shard,) in result.shards.items():
            with fsspec.open(shard, "rb") as file:
                data = file.read()
            total += len(data)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for info in tar.getmembers():
                    if info.name.endswith(".jpg") or info.name.endswith(".jpeg"):
                        counts[(split, _digest(tar.extractfile(info).read()))] += 1
        assert total == result.bytes
        dataset = load_dataset(photo_layout)
        assert counts == Counter((split, _digest(Path(s.path).read_bytes()))
                                 for split, samples in dataset.splits.items() for s in samples)
        with pytest.raises(DataError, match="already holds"):
            write_shards(photo_layout, url, progress=False)
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)


def test_multi_label_csv_gives_label_sets_and_no_class_index(hymenoptera, tmp_path):
    root = tmp_path / "tagged"
    _copy_photos(hymenoptera / "train", root, 12)
    rows = ["path,labels"]
    for i, photo in enumerate(sorted(root.rglob("*.jpg"))):
        tags = [photo.parent.name] + (["insect"] if i % 2 else []) + (["outdoor"] if i % 3 == 0 else [])
        rows.append(f"{photo.relative_to(root)},{';'.join(tags)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    result = write_shards(root / "labels.csv", out, val_percent=0, test_percent=0, progress=False)
    dataset = load_dataset(root / "labels.csv", val_percent=0, test_percent=0)
    assert result.multi_label and dataset.multi_label
    assert (out / "classes.txt").read_text().splitlines() == dataset.classes == ["ants", "bees", "insect", "outdoor"]
    samples = _read_shards(result.shards["train"])
    assert len(samples) == 24
    for sample in samples:
        assert "cls" not in sample
        assert set(json.loads(sample["json"])) == {"labels"}
    assert _shard_counts(result) == _source_counts(dataset)
    again = load_dataset(out)
    assert again.multi_label and sorted(again.classes) == dataset.classes


def test_a_failure_leaves_only_whole_shards(photo_layout, tmp_path, monkeypatch):
    from transferkit import make_shards

    added = []
    add = make_shards._ShardWriter.add

    def failing_add(self, key, members):
        if len(added) == 5:
            raise RuntimeError("disk on fire")
        added.append(key)
        add(self, key, members)

    monkeypatch.setattr(make_shards._ShardWriter, "add", failing_add)
    out = tmp_path / "shards"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(photo_layout, out, size="300KB", progress=False)
    left = sorted(p.name for p in out.iterdir())
    assert left and all(name.startswith("train-") for name in left)  # no temporary file, no classes.txt
    assert sum(len(_read_shards([str(out / name)])) for name in left) < 5
