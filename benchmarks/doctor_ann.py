"""Issue 28: the doctor's comparison stage (`doctor._compare_all`: near duplicates by features and by perceptual hash,
outlier scores) searched exactly and through `transferkit.neighbours` (faiss HNSW + multi-index hashing).

    pip install 'transferkit[scale]'
    python benchmarks/doctor_ann.py [--sizes 20000 100000 200000] [--exact-up-to 100000] [--planted 500]

Images are made as benchmarks/ann_search.py makes its vectors, but in the raw features the doctor is given (it
centres them itself, and scores outliers on the raw ones): each image is a real flowers100 photo's lite0 final
features plus Gaussian noise of 0.6 times its distance from the mean (centred cosine ~0.86 to its source, as
augmented copies of one photo measured), and the photo's real 256-bit perceptual hash with a quarter of its bits
flipped (augmented copies of a flowers100 photo differ in 90 (5 % quantile) to 122 (median) of 256 bits; unrelated
photos in 108 (1 %) to 128: a quarter, 96 bits between two copies, is the crowded end). Planted among them:
`--planted` copies whose features are another image's plus noise of 0.05-0.25 of its length (centred cosine
~0.97-0.999; those under 0.97 are not near duplicates, which exact search decides) and a fresh hash, as a crop or
flip has; as many copies with fresh features and the original's hash with 0-14 bits flipped (a recoloured copy); and
20 outliers (a random direction at ten times the usual distance from the mean).

Per size: the stage's wall time and peak memory (the process's resident high-water mark above what it held before)
exactly, up to --exact-up-to images (N squared: ~7 min at 100,000, ~28 min at 200,000), and through the indexes; the
recall of the near-duplicate pairs exact search finds among the planted images' rows (each planted image against all
images: cheap at any size) and pairs the index path reports that exact search does not; how the index's outlier
scores of 1,000 sampled images and of the planted outliers compare with exact ones, how many planted outliers are
flagged and whether each flagged image's exact distance flags it too; how many images were searched exactly (lost by
the graph, or made outliers); and, where exact search ran, whether the findings are the same. Then the hash search
alone at 1,000,000 images and an extrapolation of both searches to a million. The exact search's time above
--exact-up-to is extrapolated from the largest size measured by N squared. The default run takes ~12 minutes on 2
cores (~5 with --exact-up-to 20000).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "datasets" / "flowers100"
sys.path.insert(0, str(ROOT / "src"))

from transferkit import doctor, neighbours  # noqa: E402
from transferkit.novelty import NEIGHBOURS, unit_rows  # noqa: E402

SAMPLED = 1000
OUTLIERS = 20
HASH_FLIP = 0.25
MILLION = 1_000_000


def real_sources() -> tuple[np.ndarray, np.ndarray]:
    """lite0's final-block features (raw, as the doctor gets them) and 256-bit perceptual hashes (0/1 numbers) of
    flowers100's photos."""
    from transferkit.backbone import open_backbone
    from transferkit.data import DEFAULT_MAX_IMAGE_PIXELS, list_images
    from transferkit.features import Extractor, extract_features, open_cache

    backbone = open_backbone("efficientnet_lite0", None, 224)
    files = list_images([str(FLOWERS)])
    cache = open_cache(None, True)
    try:
        found = extract_features(Extractor(backbone), files, cache, progress=False)
    finally:
        cache.close()
    features = found.features[:, -backbone.block_widths[-1]:].astype(np.float32)
    paths = [files[i] for i in found.kept]
    hashes = [doctor._image_facts(Path(path).read_bytes(), DEFAULT_MAX_IMAGE_PIXELS).phash for path in paths]
    return features, doctor._hash_bits(hashes)[0]


def make_images(features: np.ndarray, bits: np.ndarray, size: int, planted: int,
                seed: int) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """`size` images' features and hashes (see the module's docstring); the rows of the planted feature copies, hash
    copies and outliers."""
    rng = np.random.default_rng(seed)
    mean, width = features.mean(0), features.shape[1]

    def noisy(rows: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
        spread = np.linalg.norm(rows - mean, axis=1, keepdims=True) * np.reshape(scale, (-1, 1))
        return (rows + rng.normal(0, 1 / np.sqrt(width), rows.shape) * spread).astype(np.float32)

    sources = rng.integers(0, len(features), size)
    made = noisy(features[sources], 0.6)
    hash_bits = bits[sources] ^ (rng.random((size, bits.shape[1])) < HASH_FLIP)
    rows = rng.permutation(size)
    feature_copies, hash_copies = rows[:planted], rows[planted:2 * planted]
    outliers = rows[2 * planted:2 * planted + OUTLIERS]
    originals = rows[2 * planted + OUTLIERS:4 * planted + OUTLIERS]
    made[feature_copies] = noisy(made[originals[:planted]], rng.uniform(0.05, 0.25, planted))
    flips = rng.integers(0, 15, planted)
    hash_bits[hash_copies] = hash_bits[originals[planted:]]
    for row, count in zip(hash_copies, flips):
        hash_bits[row, rng.choice(bits.shape[1], count, replace=False)] ^= 1
    typical = np.median(np.linalg.norm(made - mean, axis=1))
    away = rng.normal(size=(OUTLIERS, width))
    made[outliers] = mean + 10 * typical * away / np.linalg.norm(away, axis=1, keepdims=True)
    hashes = [bytes(np.packbits(row)).hex() for row in hash_bits]
    return made, hashes, np.concatenate([feature_copies, hash_copies]), outliers


def peak_rss_reset() -> int:
    """Resets the process's resident high-water mark; returns the resident bytes now."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def stage(features: np.ndarray, hashes: list[str], index_from: float) -> tuple[list, list, float, int]:
    """`doctor._compare_all` with the index from `index_from` images: findings, seconds, peak bytes added."""
    neighbours.INDEX_FROM = index_from
    paths, splits = [f"img{i}" for i in range(len(features))], ["train"] * len(features)
    before = peak_rss_reset()
    started = time.perf_counter()
    duplicates, outliers = doctor._compare_all(paths, splits, features, hashes, set(), doctor.NEAR_DUPLICATE_COSINE,
                                               progress=False)
    return duplicates, outliers, time.perf_counter() - started, _status("VmHWM") - before


def exact_truth(features: np.ndarray, hashes: list[str], rows: np.ndarray) -> dict[tuple[int, int], tuple]:
    """The near-duplicate pairs exact search finds that involve `rows` (those rows against every image), each with
    its cosine and hash distance."""
    directions = doctor._directions(features).astype(np.float32)
    bits, present = doctor._hash_bits(hashes)
    signs = np.where(present[:, None], bits * 2.0 - 1.0, 0.0).astype(np.float32)
    truth = {}
    for start in range(0, len(rows), 256):
        part = rows[start:start + 256]
        similar = directions[part] @ directions.T
        differ = (bits.shape[1] - signs[part] @ signs.T) / 2
        near = (similar >= doctor.NEAR_DUPLICATE_COSINE) | (differ <= doctor.PHASH_DISTANCE)
        for row, column in zip(*np.nonzero(near)):
            if part[row] != column:
                truth[min(part[row], column), max(part[row], column)] = (similar[row, column], differ[row, column])
    return truth


def exact_distances(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`novelty.neighbour_distance` of `rows` against every image, each not its own neighbour."""
    unit = unit_rows(features)
    found = []
    for start in range(0, len(rows), 256):
        part = rows[start:start + 256]
        cosine = unit[part] @ unit.T
        cosine[np.arange(len(part)), part] = -np.inf
        found.append(1 - np.partition(cosine, -NEIGHBOURS, axis=1)[:, -NEIGHBOURS:].mean(axis=1))
    return np.concatenate(found)


def recorded(function, kept: dict):
    """`function`, keeping what it returns in kept["value"]."""
    def wrapper(*args, **kwargs):
        kept["value"] = function(*args, **kwargs)
        return kept["value"]
    return wrapper


def counted(function, counts: dict, name: str):
    """`function(vectors, rows, ...)`, adding the rows it is given to counts[name]."""
    def wrapper(vectors, rows, *args, **kwargs):
        counts[name] = counts.get(name, 0) + len(rows)
        return function(vectors, rows, *args, **kwargs)
    wrapper.__wrapped__ = function
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 200_000])
    parser.add_argument("--exact-up-to", type=int, default=100_000, help="largest size searched exactly as well")
    parser.add_argument("--planted", type=int, default=500)
    args = parser.parse_args()
    import faiss

    began = time.perf_counter()
    features, bits = real_sources()
    print(f"{len(features)} flowers100 photos: {features.shape[1]} final features and {bits.shape[1]}-bit hashes; "
          f"{faiss.omp_get_max_threads()} threads; index from {neighbours.INDEX_FROM:,} images in the product",
          flush=True)
    exact_per_pair = None
    measured = []  # (images, index seconds, peak bytes)
    for size in args.sizes:
        made, hashes, planted, outliers = make_images(features, bits, size, args.planted, seed=size)
        truth = exact_truth(made, hashes, planted)
        line = f"{size:,} images:"
        exact = None
        if size <= args.exact_up_to:
            exact = stage(made, hashes, math.inf)
            exact_per_pair = exact[2] / size ** 2
            line += f" exact {exact[2]:.1f} s, peak +{exact[3] / 2 ** 20:,.0f} MiB;"
        else:
            line += f" exact ~{exact_per_pair * size ** 2:,.0f} s (N squared);"
        kept, checked = {}, {}
        doctor.neighbour_distances = recorded(neighbours.neighbour_distances, kept)
        for module, name in ((neighbours, "exact_similar"), (neighbours, "exact_distances"),
                             (doctor, "exact_distances")):
            setattr(module, name, counted(getattr(module, name), checked, f"{module.__name__}.{name}"))
        duplicates, found_outliers, seconds, peak = stage(made, hashes, 0)
        doctor.neighbour_distances = neighbours.neighbour_distances
        for module, name in ((neighbours, "exact_similar"), (neighbours, "exact_distances"),
                             (doctor, "exact_distances")):
            setattr(module, name, getattr(module, name).__wrapped__)
        measured.append((size, seconds, peak))
        pairs = {(int(f.path[3:]), int(f.other[3:])) for f in duplicates}
        planted_set = set(planted.tolist())
        reported = {pair for pair in pairs if pair[0] in planted_set or pair[1] in planted_set}
        flagged = {int(f.path[3:]) for f in found_outliers}
        found = truth.keys() & reported
        missed = ", ".join(f"cosine {truth[pair][0]:.4f} and {truth[pair][1]:.0f} bits"
                           for pair in sorted(truth.keys() - found))
        line += (f" index {seconds:.1f} s, peak +{peak / 2 ** 20:,.0f} MiB\n  near-duplicate pairs of the planted "
                 f"rows: {len(found)}/{len(truth)} found (recall {len(found) / max(len(truth), 1):.3f})"
                 + (f", missed {missed}" if missed else "") + f"; {len(reported - truth.keys())} not exact; "
                 f"{len(pairs)} pairs in all")
        rows = np.concatenate([np.random.default_rng(0).choice(size, SAMPLED, replace=False), outliers])
        difference = np.abs(exact_distances(made, rows) - kept["value"][rows])
        scores = kept["value"]
        typical = np.median(scores)
        spread = 1.4826 * np.median(np.abs(scores - typical))
        confirmed = (exact_distances(made, np.array(sorted(flagged), dtype=np.int64)) - typical) / spread
        confirmed = int(np.sum(confirmed > doctor.OUTLIER_Z)) if flagged else 0
        line += (f"\n  outlier distances of {SAMPLED:,} sampled images: {np.mean(difference[:SAMPLED] < 1e-5):.1%} "
                 f"equal to exact (1e-5), largest difference {difference[:SAMPLED].max():.1e} (the scores' robust "
                 f"spread {spread:.1e}); of the planted outliers {difference[SAMPLED:].max():.1e}; flagged "
                 f"{len(flagged & set(outliers.tolist()))}/{OUTLIERS}; {len(flagged)} outliers in all, {confirmed} "
                 f"of them by their exact distances too")
        line += (f"\n  searched exactly: {checked.get('transferkit.neighbours.exact_similar', 0)} images the "
                 f"features' index lost, {checked.get('transferkit.neighbours.exact_distances', 0)} the raw "
                 f"features' index lost, {checked.get('transferkit.doctor.exact_distances', 0)} it made outliers")
        if exact is not None:
            same = [(f.kind, f.path, f.other, f.detail) for f in duplicates] == [
                (f.kind, f.path, f.other, f.detail) for f in exact[0]]
            line += (f"\n  same near-duplicate findings as exact: {same}; same outliers: "
                     f"{[f.path for f in found_outliers] == [f.path for f in exact[1]]}")
        print(line, flush=True)
    rng = np.random.default_rng(1)
    million = bits[rng.integers(0, len(bits), MILLION)] ^ (rng.random((MILLION, bits.shape[1])) < HASH_FLIP)
    started = time.perf_counter()
    found, _ = neighbours.hash_pairs(million, doctor.PHASH_DISTANCE)
    hash_seconds = time.perf_counter() - started
    print(f"hash pairs alone at {MILLION:,} images: {hash_seconds:.1f} s ({len(found)} pairs within "
          f"{doctor.PHASH_DISTANCE} bits)", flush=True)
    size, seconds, peak = measured[-1]
    slope = (peak - measured[-2][2]) / (size - measured[-2][0]) if len(measured) > 1 else peak / size
    print(f"at {MILLION:,} images (from {size:,}): exact ~{exact_per_pair * MILLION ** 2 / 3600:.1f} h; index "
          f"~{seconds * MILLION / size * math.log(MILLION) / math.log(size) / 60:.0f} min (N log N), peak "
          f"~+{(peak + slope * (MILLION - size)) / 2 ** 30:.1f} GiB (linear from the last two sizes); benchmark "
          f"{time.perf_counter() - began:.0f} s", flush=True)

if __name__ == "__main__":
    main()
