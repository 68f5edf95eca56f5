"""Issue 28 groundwork: can an approximate nearest-neighbour index take over the doctor's exact all-pairs search?

    pip install faiss-cpu usearch        # not dependencies of transferkit yet: this measures which one to add
    python benchmarks/ann_search.py [--sizes 20000 100000 200000] [--planted 500]

The doctor compares every image with every other (`doctor._compare_all`): near duplicates are pairs of mean-centred
final-block features at cosine >= 0.97, outliers the images whose 10 nearest neighbours are far. Exact search grows
with the square of the images. Here, for N vectors made from real features (lite0's final block on flowers100: each
vector a real image's features plus Gaussian noise of the spread augmented copies of one photo measured, so copies
of one source are not near duplicates of each other) with P planted near duplicates (a vector and a copy at cosine
~0.98), each index (faiss HNSW, usearch HNSW, both inner product on unit vectors) is built and asked for every
vector's 10 nearest neighbours. Printed per N: build and search seconds, the index's size in memory, the recall of the
planted pairs (found among a vector's neighbours at cosine >= 0.97), the recall of the exact 10 nearest neighbours on
1,000 sampled queries, and the exact search's seconds (measured at the smallest N, extrapolated by N^2 above it).

Measured here (2 cores; HNSW M 32, efConstruction 80, efSearch 64; 500 planted pairs at cosine 0.981):

    N        exact all pairs   faiss build + search, index   usearch build + search, index   planted found / 10-NN
    20,000        ~11 s           3.7 + 3.7 s,   108 MB           6.1 + 7.6 s,   134 MB         1.000 / 1.000 both
    100,000      ~264 s          25.3 + 18.1 s,  539 MB          43.7 + 37.7 s,  588 MB         1.000 (usearch 0.998)
    200,000     ~1057 s          47.0 + 30.2 s, 1078 MB          85.2 + 61.9 s, 1193 MB         1.000 / 1.000 both

faiss is about twice as fast as usearch at the same recall; both hold the vectors in fp32 (5 GB at a million images
of 1,280 numbers), so the million-image doctor needs fp16 or int8 vectors in the index. These vectors are real
features plus noise; augmented photos may be harder neighbours than that, which issue 28 must measure on real ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "datasets" / "flowers100"
sys.path.insert(0, str(ROOT / "src"))

NEIGHBOURS = 10
NEAR_DUPLICATE_COSINE = 0.97
SAMPLED_QUERIES = 1000


def real_features() -> np.ndarray:
    """lite0's final-block features of flowers100's photos, mean-centred and at unit length (the doctor's
    directions)."""
    from transferkit.backbone import open_backbone
    from transferkit.data import list_images
    from transferkit.features import Extractor, extract_features, open_cache

    backbone = open_backbone("efficientnet_lite0", None, 224)
    cache = open_cache(None, True)
    try:
        found = extract_features(Extractor(backbone), list_images([str(FLOWERS)]), cache)
    finally:
        cache.close()
    final = found.features[:, -backbone.block_widths[-1]:]
    centred = final - final.mean(0)
    return (centred / np.linalg.norm(centred, axis=1, keepdims=True)).astype(np.float32)


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def make_set(sources: np.ndarray, size: int, planted: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`size` unit vectors: real sources plus noise at cosine ~0.85 to their source (augmented copies of one photo are
    not near duplicates), the last `planted` of them near duplicates (cosine ~0.98) of planted partners; returns the
    vectors and the (copy, original) pairs."""
    rng = np.random.default_rng(seed)
    picked = sources[rng.integers(0, len(sources), size)]
    width = sources.shape[1]
    vectors = unit(picked + rng.normal(0, 0.6 / np.sqrt(width), picked.shape).astype(np.float32))
    originals = rng.choice(size - planted, planted, replace=False)
    copies = np.arange(size - planted, size)
    vectors[copies] = unit(vectors[originals] + rng.normal(0, 0.2 / np.sqrt(width), (planted, width)))
    return vectors, np.stack([copies, originals], axis=1)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of each query row's k most similar vectors (itself excluded), by blocks of queries."""
    found = []
    for start in range(0, len(queries), 256):
        similar = vectors[queries[start:start + 256]] @ vectors.T
        similar[np.arange(len(similar)), queries[start:start + 256]] = -np.inf
        found.append(np.argpartition(-similar, k, axis=1)[:, :k])
    return np.concatenate(found)


def search_faiss(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float, float, int]:
    import faiss

    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(vectors)
    built = time.perf_counter() - started
    index.hnsw.efSearch = 64
    started = time.perf_counter()
    similarity, neighbours = index.search(vectors, k + 1)
    return neighbours, similarity, built, time.perf_counter() - started, faiss.serialize_index(index).nbytes


def search_usearch(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float, float, int]:
    from usearch.index import Index

    started = time.perf_counter()
    index = Index(ndim=vectors.shape[1], metric="ip", dtype="f32", connectivity=32, expansion_add=80,
                  expansion_search=64)
    index.add(np.arange(len(vectors)), vectors)
    built = time.perf_counter() - started
    started = time.perf_counter()
    matches = index.search(vectors, k + 1)
    return matches.keys, 1 - matches.distances, built, time.perf_counter() - started, index.memory_usage


def measure(name: str, search, vectors: np.ndarray, pairs: np.ndarray, sampled: np.ndarray,
            truth: np.ndarray) -> None:
    neighbours, similarity, built, searched, size = search(vectors, NEIGHBOURS)
    found = 0
    for copy, original in pairs:
        row = neighbours[copy]
        found += bool(np.any((row == original) & (similarity[copy] >= NEAR_DUPLICATE_COSINE)))
    recall = np.mean([len(set(neighbours[q][neighbours[q] != q][:NEIGHBOURS]) & set(t)) / NEIGHBOURS
                      for q, t in zip(sampled, truth)])
    print(f"  {name:<8} build {built:6.1f} s, search {searched:6.1f} s, index {size / 1e6:5.0f} MB; planted near "
          f"duplicates found {found / len(pairs):.3f}; 10-NN recall {recall:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 200_000])
    parser.add_argument("--planted", type=int, default=500)
    args = parser.parse_args()
    sources = real_features()
    print(f"{len(sources)} flowers100 feature vectors of {sources.shape[1]} numbers", flush=True)
    exact_seconds_per_pair = None
    for size in args.sizes:
        vectors, pairs = make_set(sources, size, args.planted, seed=size)
        rng = np.random.default_rng(0)
        sampled = rng.choice(size, SAMPLED_QUERIES, replace=False)
        started = time.perf_counter()
        truth = exact_neighbours(vectors, sampled, NEIGHBOURS)
        per_pair = (time.perf_counter() - started) / (SAMPLED_QUERIES * size)
        exact_seconds_per_pair = exact_seconds_per_pair or per_pair
        copies = vectors[pairs[:, 0]] @ vectors[pairs[:, 1]].T
        print(f"{size:,} vectors: planted pairs at cosine {np.median(np.diag(copies)):.3f} (median); exact all-pairs "
              f"search ~{exact_seconds_per_pair * size * size:.0f} s (measured on {SAMPLED_QUERIES} queries)",
              flush=True)
        for name, search in (("faiss", search_faiss), ("usearch", search_usearch)):
            measure(name, search, vectors, pairs, sampled, truth)


if __name__ == "__main__":
    main()
