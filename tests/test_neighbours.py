"""The doctor's nearest-neighbour search for large data sets (transferkit.neighbours): the index path must find what
the exact all-pairs search finds. The size from which the index is used is lowered so that a few thousand vectors
take it."""

from __future__ import annotations

import logging
import shutil
import sys

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from transferkit import doctor, neighbours
from transferkit.novelty import NEIGHBOURS, neighbour_distance, unit_rows

faiss = pytest.importorskip("faiss")


@pytest.fixture
def index_builds(monkeypatch) -> list:
    """Each index `neighbours.build_index` builds, counted: proof that the index path was taken."""
    built, build = [], neighbours.build_index
    monkeypatch.setattr(neighbours, "build_index", lambda *args, **kwargs: built.append(1) or build(*args, **kwargs))
    return built


def backbone_like(count: int, width: int = 256, groups: int = 40, seed: int = 0) -> np.ndarray:
    """Vectors shaped like pooled backbone features: non-negative and sparse (a ReLU), a large part shared by all
    (raw cosines ~0.8), and groups (classes, scenes) within which images are alike."""
    rng = np.random.default_rng(seed)
    shared = np.abs(rng.normal(1.0, 0.5, width))
    centres = rng.normal(0, 0.8, (groups, width))
    group = rng.integers(0, groups, count)
    return np.maximum(shared + centres[group] + rng.normal(0, 0.7, (count, width)), 0).astype(np.float32)


def plant_copies(features: np.ndarray, pairs: int, seed: int) -> np.ndarray:
    """Makes the last `pairs` rows noisy copies of others, from barely changed to just under the near-duplicate
    threshold once centred; and rows 0-39 copies of row 40 (a photo with more near copies than the index is first
    asked for)."""
    rng = np.random.default_rng(seed)
    originals = rng.choice(np.arange(41, len(features) - pairs), pairs, replace=False)
    centred_length = np.linalg.norm(features - features.mean(0), axis=1)
    for row, original, scale in zip(range(len(features) - pairs, len(features)), originals,
                                    np.linspace(0.02, 0.3, pairs)):
        noise = rng.normal(0, 1, features.shape[1])
        features[row] = features[original] + noise / np.linalg.norm(noise) * scale * centred_length[original]
    features[:40] = features[40] + rng.normal(0, 0.01, (40, features.shape[1]))
    return features


def exact_pairs(directions: np.ndarray, threshold: float) -> np.ndarray:
    similar = directions @ directions.T
    return np.argwhere(np.triu(similar >= threshold, 1))


@pytest.mark.parametrize("threshold", [0.97, 0.9])
def test_the_index_finds_every_pair_exact_search_finds(threshold):
    """Planted copies at centred cosines from ~1 to ~0.955, a group of 41 copies of one image: the same pairs as
    comparing every pair, with their exact cosines."""
    directions = doctor._directions(plant_copies(backbone_like(3000), 60, seed=1)).astype(np.float32)
    expected = exact_pairs(directions, threshold)
    pairs, cosines = neighbours.similar_pairs(faiss, directions, threshold)
    assert len(expected) > 41 * 40 / 2 + 40  # the group, and planted pairs on both sides of the threshold
    assert pairs.tolist() == expected.tolist()
    assert np.allclose(cosines, np.einsum("ij,ij->i", directions[pairs[:, 0]], directions[pairs[:, 1]]), atol=1e-6)


def test_outlier_distances_from_the_index_are_the_exact_ones():
    """The outlier score (novelty's mean cosine distance to the NEIGHBOURS nearest, the image left out) from the
    index's candidates: equal to the exact score for nearly every image, and the same images stand out."""
    features = plant_copies(backbone_like(3000, seed=2), 30, seed=3)
    features[7] = np.eye(features.shape[1], dtype=np.float32)[3] * 50  # unlike everything else
    unit = unit_rows(features)
    expected = neighbour_distance(unit, unit, NEIGHBOURS, first_self=0)
    found = neighbours.neighbour_distances(faiss, unit, NEIGHBOURS)
    difference = np.abs(found - expected)
    assert np.mean(difference < 1e-5) >= 0.98 and difference.max() < 0.02, (np.mean(difference < 1e-5),
                                                                          difference.max())

    def z(distance):
        return (distance - np.median(distance)) / (1.4826 * np.median(np.abs(distance - np.median(distance))))

    assert np.argmax(found) == 7
    assert set(np.flatnonzero(z(found) > 3)) == set(np.flatnonzero(z(expected) > 3))


def test_exact_distances_are_novelty_s_score_for_rows_anywhere():
    unit = unit_rows(backbone_like(1500, seed=10))
    rows = np.array([0, 7, 8, 900, 1499])
    assert np.allclose(neighbours.exact_distances(unit, rows, NEIGHBOURS),
                       [neighbour_distance(unit[r:r + 1], unit, NEIGHBOURS, first_self=r)[0] for r in rows], atol=1e-6)


@pytest.fixture
def unreachable(monkeypatch) -> np.ndarray:
    """Rows the index cannot lead to (HNSW leaves some on clustered data): no search finds them, and their own return
    other, random rows, as a search stuck in another part of the graph does."""
    rows, search = np.arange(40, 3000, 97), neighbours.search

    def lost_search(index, vectors, queries, k):
        similar, ids = search(index, vectors, queries, k)
        hidden = np.isin(ids, rows)
        ids[hidden], similar[hidden] = -1, -np.inf
        stuck = np.isin(queries, rows)
        ids[stuck] = np.random.default_rng(0).choice(np.setdiff1d(np.arange(len(vectors)), rows), (stuck.sum(), k))
        similar[stuck] = 0.0
        return similar, ids

    monkeypatch.setattr(neighbours, "search", lost_search)
    return rows


def test_rows_the_index_cannot_reach_are_searched_exactly(unreachable):
    features = plant_copies(backbone_like(3000, seed=11), 60, seed=12)
    directions = doctor._directions(features).astype(np.float32)
    pairs, _ = neighbours.similar_pairs(faiss, directions, 0.97)
    assert pairs.tolist() == exact_pairs(directions, 0.97).tolist()
    assert np.isin(pairs, unreachable).any()  # the group of copies of row 40, planted pairs
    unit = unit_rows(features)
    assert np.allclose(neighbours.neighbour_distances(faiss, unit, NEIGHBOURS)[unreachable],
                       neighbour_distance(unit, unit, NEIGHBOURS, first_self=0)[unreachable], atol=1e-6)


def test_images_the_index_puts_too_far_are_measured_exactly_before_they_are_called_outliers(monkeypatch):
    """An image whose neighbours the index missed looks far from everything: the doctor measures exactly before it
    calls an image an outlier."""
    features = plant_copies(backbone_like(2000, seed=13), 20, seed=14)
    features[5] = np.eye(features.shape[1], dtype=np.float32)[3] * 50  # a real outlier
    hashes = [None] * len(features)
    exact = compare(features, hashes)
    distances = neighbours.neighbour_distances

    def missed(faiss, vectors, *args, **kwargs):
        distance = distances(faiss, vectors, *args, **kwargs)
        distance[100:130] += 0.5  # as if a search went astray
        return distance

    monkeypatch.setattr(doctor, "neighbour_distances", missed)
    monkeypatch.setattr(neighbours, "INDEX_FROM", 1000)
    assert exact[1][0] == "img5" and compare(features, hashes) == exact


def hashes_like_photos(count: int, seed: int) -> np.ndarray:
    """256-bit perceptual hashes: a few hundred 'sources', each image its source with a quarter of the bits flipped
    (as augmented copies of one photo differ), the first bit always set (phash's DC term)."""
    rng = np.random.default_rng(seed)
    sources = rng.random((300, 256)) < 0.5
    bits = sources[rng.integers(0, 300, count)] ^ (rng.random((count, 256)) < 0.25)
    bits[:, 0] = True
    return bits.astype(np.uint8)


@pytest.mark.parametrize("max_distance", [12, 5])
def test_hash_pairs_are_exactly_the_pairs_within_the_distance(max_distance):
    rng = np.random.default_rng(max_distance)
    bits = hashes_like_photos(4000, seed=max_distance)
    for row, flips in zip(range(3900, 4000), np.arange(100) % (max_distance + 3)):  # 0 to max_distance + 2 bits
        bits[row] = bits[row - 3000]
        spread = np.linspace(0, 255, flips).astype(int) if row % 2 else rng.choice(256, flips, replace=False)
        bits[row, spread] ^= 1  # every other copy with its changes spread evenly over the hash
    bits[50:60] = bits[60]  # ten identical hashes
    signs = bits * 2.0 - 1.0
    differ = (256 - signs @ signs.T) / 2
    expected = np.argwhere(np.triu(differ <= max_distance, 1))
    pairs, distances = neighbours.hash_pairs(bits, max_distance)
    assert len(expected) > 100
    assert pairs.tolist() == expected.tolist()
    assert distances.tolist() == differ[expected[:, 0], expected[:, 1]].astype(int).tolist()


def test_below_the_size_the_search_stays_exact(monkeypatch, caplog):
    monkeypatch.setattr(neighbours, "INDEX_FROM", 1000)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        assert neighbours.index_library(999) is None
        assert neighbours.index_library(1000) is faiss
    assert not caplog.records


def compare(features, hashes, threshold=doctor.NEAR_DUPLICATE_COSINE, splits=None):
    paths = [f"img{i}" for i in range(len(features))]
    duplicates, outliers = doctor._compare_all(paths, splits or ["train"] * len(paths), features, hashes, set(),
                                               threshold, progress=False)
    return [(f.kind, f.path, f.other, f.detail) for f in duplicates], [f.path for f in outliers]


def test_without_faiss_the_doctor_searches_exactly_and_says_how_to_install_it(monkeypatch, caplog):
    features = plant_copies(backbone_like(2000, seed=4), 20, seed=5)
    hashes = [bytes(np.packbits(row)).hex() for row in hashes_like_photos(2000, seed=6)]
    exact = compare(features, hashes)
    monkeypatch.setattr(neighbours, "INDEX_FROM", 1000)
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError

    def no_index(*args, **kwargs):
        raise AssertionError("an index was built without faiss")

    monkeypatch.setattr(neighbours, "build_index", no_index)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        assert compare(features, hashes) == exact
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pip install 'transferkit[scale]'" in warnings[0] and "2000" in warnings[0]


@pytest.mark.parametrize("threshold", [0.97, 0.93])
def test_compare_all_through_the_index_finds_what_the_exact_search_finds(monkeypatch, index_builds, threshold):
    """`doctor._compare_all` past the size: the same findings, in the same order and words, as the exact search, at
    the default threshold and another one (leaks across splits, pairs by hash only)."""
    features = plant_copies(backbone_like(2500, seed=7), 40, seed=8)
    bits = hashes_like_photos(2500, seed=9)
    bits[2400:2410] = bits[100:110]  # recoloured copies: the hash alike, the features not
    bits[2400:2410, :8] ^= 1
    hashes = [bytes(np.packbits(row)).hex() for row in bits]
    hashes[3] = None  # unreadable by imagehash: never a hash pair
    splits = ["val" if i % 7 == 0 else "train" for i in range(len(features))]
    exact = compare(features, hashes, threshold, splits)
    assert not index_builds
    monkeypatch.setattr(neighbours, "INDEX_FROM", 1000)
    found = compare(features, hashes, threshold, splits)
    assert len(index_builds) == 2  # the features, then the raw features for the outliers
    assert {kind for kind, *_ in exact[0]} == {"near_duplicate", "leak_near"} and len(exact[0]) > 800
    assert sum(", 8 of 256 hash bits differ" in detail for *_, detail in exact[0]) == 10
    assert found == exact


def test_the_doctor_reports_the_same_near_duplicates_of_real_photos_through_the_index(hymenoptera, tmp_path,
                                                                                      cache_dir, monkeypatch,
                                                                                      index_builds):
    """`diagnose` on 40 hymenoptera photos and the placeholder picture, with an edited copy (features and hash alike),
    a greyscale copy (the hash) and a mirrored copy (the features, at cosine ~0.92: the threshold is set to 0.9)
    planted across splits: through the index (lowered to their number), the same near-duplicate and outlier findings
    as exactly."""
    root = tmp_path / "photos"
    for split, start, count in (("train", 0, 15), ("val", 15, 5)):
        for label in ("ants", "bees"):
            (root / split / label).mkdir(parents=True)
            for photo in sorted((hymenoptera / "train" / label).glob("*.jpg"))[start:start + count]:
                shutil.copy(photo, root / split / label / photo.name)
    shutil.copy(hymenoptera / "train" / "ants" / "imageNotFound.gif", root / "train" / "ants")  # the outlier
    train_bee, train_ant = sorted((root / "train" / "bees").glob("*.jpg"))[0], sorted(
        (root / "train" / "ants").glob("*.jpg"))[1]
    with Image.open(train_bee) as image:
        ImageEnhance.Brightness(image).enhance(1.05).save(root / "val" / "bees" / "resaved.jpg", quality=95)
    with Image.open(train_ant) as image:
        ImageOps.grayscale(image).save(root / "val" / "ants" / "grey.png")
        ImageOps.mirror(image).save(root / "val" / "ants" / "mirrored.jpg", quality=95)

    def near(report):
        return [(f.kind, f.path, f.other, f.detail) for f in report.findings
                if f.kind in {"near_duplicate", "leak_near", "outlier"}]

    monkeypatch.setattr(doctor, "_read_conclusions", lambda *args: None)  # each run compares afresh
    exact = near(doctor.diagnose(root, cache_dir=cache_dir, progress=False, near_duplicate_cosine=0.9))
    assert not index_builds
    monkeypatch.setattr(neighbours, "INDEX_FROM", 40)
    found = near(doctor.diagnose(root, cache_dir=cache_dir, progress=False, near_duplicate_cosine=0.9))
    assert len(index_builds) == 2
    leaks = {(path.rsplit("/", 1)[-1], other.rsplit("/", 1)[-1]) for kind, path, other, _ in exact
             if kind == "leak_near"}
    assert leaks == {(train_bee.name, "resaved.jpg"), (train_ant.name, "grey.png"), (train_ant.name, "mirrored.jpg")}
    assert [path.rsplit("/", 1)[-1] for kind, path, *_ in exact if kind == "outlier"] == ["imageNotFound.gif"]
    assert found == exact
