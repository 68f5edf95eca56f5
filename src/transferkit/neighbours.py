"""Nearest neighbours for the doctor's large data sets: an approximate index proposes, exact arithmetic decides.

Below INDEX_FROM images the doctor compares every image with every other (`doctor._compare_all`, exact, memory
bounded by a block of rows). That search grows with the images squared: ~17 s at 20,000 images on 2 cores, ~7 min at
100,000, ~29 min at 200,000, ~12 h at a million. From INDEX_FROM images on, and when faiss is installed (`pip install
'transferkit[scale]'`), the same three questions are answered without comparing every pair:

- near duplicates by features (`similar_pairs`): a faiss HNSW graph over the mean-centred directions proposes each
  image's nearest candidates (more for an image whose farthest candidate is still near), and the exact cosine of
  every proposed pair decides, so a pair found has the cosine exact search gives it;
- outliers (`neighbour_distances`): the same score `novelty.neighbour_distance` gives (mean cosine distance to the
  NEIGHBOURS nearest, the image itself left out), over exact cosines to the index's candidates: never lower than the
  exact score, so the doctor measures exactly (`exact_distances`) only the images this makes outliers;
- near duplicates by perceptual hash (`hash_pairs`): numpy only and exact, by the pigeonhole principle (two hashes at
  most D bits apart agree on one of D + 1 disjoint parts), so pairs are only looked for among hashes sharing a part.

An image whose own search does not return it sits where the graph does not lead (`_lost`); it is searched exactly.
Without faiss above INDEX_FROM, `index_library` logs one line with the install hint and the doctor keeps the exact
search. The graph is built with OpenMP threads, so which far candidates it proposes can vary between runs.

Measured with benchmarks/doctor_ann.py (the doctor's comparison stage on images made from lite0's final features and
real perceptual hashes of flowers100, with planted near duplicates and outliers; 2 cores shared with other work):

    images     exact all pairs       index path, peak memory   planted pairs found   searched exactly (lost, outliers)
    20,000     17.4 s, +396 MiB      10.2 s,  +247 MiB         921/921               2 + 5, 21
    100,000    432 s, +1,913 MiB     60.4 s,  +788 MiB         931/931               13 + 20, 21
    200,000    ~1,730 s (N squared)  117.7 s, +1,481 MiB       944/944               198 + 291, 41
    1,000,000  ~12 h                 ~11 min, ~+6.9 GiB (extrapolated; the hash pairs alone measured: 8-10 s)

At 20,000 and 100,000 the findings were exactly the all-pairs search's; at every size the outliers flagged were the
ones exact distances flag, and 99.1-99.9 % of 1,000 sampled images had their exact outlier score from the index. Index
variants at 100,000 vectors: HNSW M 32 over fp32 vectors built in 36 s and searched 11 neighbours in 30 s (539 MB),
over 8-bit scalar-quantised vectors (IndexHNSWSQ) in 19 + 11 s (155 MB: 1.3 GB at a million images of 1,280 numbers
instead of 5.1 GB), over fp16 in 31 + 10 s (283 MB); M 16 saved little (the vectors dominate) and was no faster. Every
variant found all 500 planted near duplicates; the 8-bit index misjudges a cosine by up to 0.0097 (99 % within 0.0011)
and found 97.9 % of the exact 10 nearest neighbours, which SIMILARITY_MARGIN and EXTRA_CANDIDATES make up for before
the exact cosines decide. At a million images the stage holds the centred (then the unit) features as float32 (5.1 GB)
beside the 8-bit index (1.3 GB codes + 0.3 GB graph).
"""

from __future__ import annotations

import logging
from types import ModuleType

import numpy as np

from transferkit.novelty import NEIGHBOURS, unit_rows
from transferkit.progress import progress_bar

log = logging.getLogger("transferkit")

INDEX_FROM = 20_000
"""Images from which the doctor searches the indexes instead of comparing every pair. The comparison stage measured by
benchmarks/doctor_ann.py (2 cores shared with other work, so +-50 %): 10,000 images exact 8.4 s, indexes 8.6 s;
20,000 exact 16-35 s, indexes 11-21 s; 40,000 exact 83 s, indexes 29 s. Below it the findings are exactly the all-pairs
search's; at 10,000-100,000 the indexes gave the same near-duplicate and outlier findings too."""
HNSW_M = 32
"""Links per vector in the graph: 256 bytes a vector at level 0, small beside the 1,280 bytes of its 8-bit codes. At
100,000 vectors M 64 lost 3 raw-feature vectors where 32 lost 20 (`_lost`), at 1.8 times the build time."""
HNSW_EF_CONSTRUCTION = 80
"""Candidates weighed when linking a vector into the graph (faiss's default is 40): at 80 the planted near duplicates
were all found at 200,000 vectors (benchmarks/ann_search.py)."""
HNSW_EF_SEARCH = 64
"""Candidates kept while searching (at least the neighbours asked for): with the candidates re-ranked exactly, 64 gave
99.1-99.9 % of 1,000 sampled images their exact outlier score (benchmarks/doctor_ann.py); 128 gained 0.5 %."""
SIMILARITY_MARGIN = 0.02
"""A candidate pair is checked exactly when the index puts it within this of the near-duplicate threshold: its 8-bit
codes misjudged a cosine by at most 0.0097 among 1.1 million pairs (100,000 vectors x 11 neighbours)."""
FIRST_CANDIDATES = 16
"""Candidates asked of the index per image for near duplicates; an image whose last candidate is still near the
threshold (a photo with more than 15 near copies) is asked again for four times as many, until one is not."""
EXTRA_CANDIDATES = 10
"""Candidates asked beyond NEIGHBOURS + 1 for the outlier score and then re-ranked by exact cosine: 8-bit codes order
close neighbours imperfectly (97.9 % of the exact 10 nearest among the index's 11 at 100,000 vectors); 30 gained
nothing over 10 at 20,000."""
ADD_ROWS = 16_384
"""Vectors added to the graph (and queries searched) at a time: progress is reported between batches."""
EXACT_ROWS = 64
"""Rows searched exactly at a time: 64 x 1,000,000 float32 cosines are 256 MB."""
RERANK_ROWS = 512
"""Queries whose candidates are gathered at a time for exact cosines: 512 x 21 x 1,280 float32 numbers are 55 MB."""
SCALE_HINT = "pip install 'transferkit[scale]'"


def index_library(count: int) -> ModuleType | None:
    """faiss when `count` images are enough for an index to pay (INDEX_FROM) and it is installed; None: search
    exactly (with one warning line when faiss is what is missing)."""
    if count < INDEX_FROM:
        return None
    try:
        import faiss
    except ImportError:
        log.warning("comparing all %d images with each other, which grows with their square (hours past ~200,000); "
                    "%s for an approximate nearest-neighbour index", count, SCALE_HINT)
        return None
    return faiss


def unit_rows_in_blocks(features: np.ndarray) -> np.ndarray:
    """`novelty.unit_rows(features)`, the same numbers, made ADD_ROWS rows at a time: numpy's row lengths hold a
    squared copy of what they measure, which for all the rows at once doubles the peak memory."""
    unit = np.empty(features.shape, dtype=np.float32)
    for start in range(0, len(features), ADD_ROWS):
        unit[start:start + ADD_ROWS] = unit_rows(features[start:start + ADD_ROWS])
    return unit


def build_index(faiss: ModuleType, vectors: np.ndarray, progress: bool | None = False, desc: str = "Indexing images"):
    """An HNSW graph over 8-bit scalar-quantised unit-length `vectors` (inner product: cosine). The quantiser's
    per-number range is learnt from every vector, so no outlier is clipped."""
    index = faiss.IndexHNSWSQ(vectors.shape[1], faiss.ScalarQuantizer.QT_8bit, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.train(vectors)
    bar = progress_bar(len(vectors), desc, "img", progress)
    for start in range(0, len(vectors), ADD_ROWS):
        index.add(vectors[start:start + ADD_ROWS])
        bar.update(len(vectors[start:start + ADD_ROWS]))
    bar.close()
    index.hnsw.efSearch = HNSW_EF_SEARCH
    return index


def search(index, vectors: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The index's `k` most similar vectors to each of vectors[rows] (the row itself usually among them): similarities
    as the index judges them, and ids (-1 where it found fewer)."""
    similar = np.empty((len(rows), k), dtype=np.float32)
    ids = np.empty((len(rows), k), dtype=np.int64)
    for start in range(0, len(rows), ADD_ROWS):
        part = slice(start, start + ADD_ROWS)
        similar[part], ids[part] = index.search(np.ascontiguousarray(vectors[rows[part]]), k)
    return similar, ids


def row_dots(vectors: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The exact dot product of vectors[first[i]] and vectors[second[i]] for each i (cosines of unit rows)."""
    dots = np.empty(len(first), dtype=np.float32)
    for start in range(0, len(first), RERANK_ROWS * 16):
        part = slice(start, start + RERANK_ROWS * 16)
        dots[part] = np.einsum("ij,ij->i", vectors[first[part]], vectors[second[part]])
    return dots


def _ordered_unique(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Pairs (smaller, larger) without repeats or an image paired with itself, sorted: an (n, 2) int64 array."""
    pairs = np.stack([np.minimum(first, second), np.maximum(first, second)], axis=1).astype(np.int64)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def exact_similar(vectors: np.ndarray, rows: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every (row, other) with vectors[row] . vectors[other] >= threshold, each of `rows` against every vector (the
    exact search, for the rows the index failed): EXACT_ROWS at a time."""
    first, second = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for start in range(0, len(rows), EXACT_ROWS):
        part = rows[start:start + EXACT_ROWS]
        row, column = np.nonzero(vectors[part] @ vectors.T >= threshold)
        first.append(part[row])
        second.append(column)
    return np.concatenate(first), np.concatenate(second)


def exact_distances(vectors: np.ndarray, rows: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """novelty.neighbour_distance's score of vectors[rows] against every vector, each row not its own neighbour (the
    same arithmetic for rows anywhere, where novelty's `first_self` takes one block): EXACT_ROWS at a time."""
    neighbours = min(neighbours, len(vectors) - 1)
    distance = np.full(len(rows), np.nan, dtype=np.float32)
    if neighbours <= 0:
        return distance
    for start in range(0, len(rows), EXACT_ROWS):
        part = rows[start:start + EXACT_ROWS]
        cosine = vectors[part] @ vectors.T
        cosine[np.arange(len(part)), part] = -np.inf
        nearest = np.partition(cosine, -neighbours, axis=1)[:, -neighbours:]
        distance[start:start + len(part)] = 1 - nearest.mean(axis=1)
    return distance


def _lost(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The rows whose search did not return the row itself: they sit where the graph does not lead (HNSW leaves a
    few unreachable, more on clustered data: at 100,000 vectors made as benchmarks/doctor_ann.py makes them, 20 of
    the raw features (9 of them planted outliers) and 13 of the centred; M 64 left 3, at twice the time), and 85-92 %
    of them got wrong neighbours, so they are searched exactly instead."""
    return rows[~(ids == rows[:, None]).any(axis=1)]


def similar_pairs(faiss: ModuleType, vectors: np.ndarray, threshold: float,
                  progress: bool | None = False) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of unit-length rows at cosine `threshold` or more that the index proposes, or an exact search of the
    rows the index lost (MISSED_SELF): pairs (i < j, sorted) and their exact cosines. Memory grows with the images,
    not their square."""
    index = build_index(faiss, vectors, progress, "Indexing images")
    found_first, found_second, lost = [], [], []
    rows, k = np.arange(len(vectors)), min(FIRST_CANDIDATES, len(vectors))
    bar = progress_bar(len(vectors), "Finding near duplicates", "img", progress)
    while len(rows):
        similar, ids = search(index, vectors, rows, k)
        near = (similar >= threshold - SIMILARITY_MARGIN) & (ids >= 0)
        more = near[:, -1] & (k < len(vectors))  # its last candidate is near: there may be more past it
        lost.append(_lost(rows[~more], ids[~more]))
        row, column = np.nonzero(near & ~more[:, None])
        found_first.append(rows[row])
        found_second.append(ids[row, column])
        bar.update(int((~more).sum()))
        rows, k = rows[more], min(4 * k, len(vectors))
    bar.close()
    del index
    lost = np.concatenate(lost)
    if len(lost):
        log.info("the index lost %d of %d images; compared them with every image", len(lost), len(vectors))
        first, second = exact_similar(vectors, lost, threshold)
        found_first.append(first)
        found_second.append(second)
    pairs = _ordered_unique(np.concatenate(found_first), np.concatenate(found_second))
    cosines = row_dots(vectors, pairs[:, 0], pairs[:, 1])
    keep = cosines >= threshold
    return pairs[keep], cosines[keep]


def neighbour_distances(faiss: ModuleType, vectors: np.ndarray, neighbours: int = NEIGHBOURS,
                        progress: bool | None = False) -> np.ndarray:
    """`novelty.neighbour_distance(vectors, vectors, neighbours, first_self=0)` from an index: each unit-length row's
    mean cosine distance to its `neighbours` nearest other rows, over exact cosines to the index's NEIGHBOURS + 1 +
    EXTRA_CANDIDATES candidates (the same value when the true nearest are among them; never less, as the nearest are
    the most similar there are), or by exact search for the rows the index lost (`_lost`)."""
    neighbours = min(neighbours, len(vectors) - 1)
    distance = np.full(len(vectors), np.nan, dtype=np.float32)
    if neighbours <= 0:
        return distance
    index = build_index(faiss, vectors, progress, "Indexing images for outliers")
    k = min(neighbours + 1 + EXTRA_CANDIDATES, len(vectors))
    bar = progress_bar(len(vectors), "Measuring neighbour distances", "img", progress)
    lost = []
    for start in range(0, len(vectors), ADD_ROWS):
        rows = np.arange(start, min(start + ADD_ROWS, len(vectors)))
        _, ids = search(index, vectors, rows, k)
        lost.append(_lost(rows, ids))
        for first in range(0, len(rows), RERANK_ROWS):
            query, candidates = rows[first:first + RERANK_ROWS], ids[first:first + RERANK_ROWS]
            cosine = np.einsum("qd,qkd->qk", vectors[query], vectors[np.maximum(candidates, 0)])
            cosine[(candidates == query[:, None]) | (candidates < 0)] = -np.inf
            nearest = np.partition(cosine, -neighbours, axis=1)[:, -neighbours:]
            distance[query] = 1 - nearest.mean(axis=1)
        bar.update(len(rows))
    bar.close()
    lost = np.concatenate(lost)
    if len(lost):
        log.info("the index lost %d of %d images; compared them with every image", len(lost), len(vectors))
        distance[lost] = exact_distances(vectors, lost, neighbours)
    return distance


_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint16)


def hamming(packed: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Bits differing between packed[first[i]] and packed[second[i]] (rows of np.packbits bytes)."""
    return _POPCOUNT[packed[first] ^ packed[second]].sum(axis=1)


def hash_pairs(bits: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of rows of `bits` (an (n, width) 0/1 array) at most `max_distance` bits apart: pairs (i < j,
    sorted) and their distances. Exact: the width is cut into max_distance + 1 parts, two such rows agree on one part,
    so only rows sharing a part's value are compared (each pair once, in the first part it agrees on). Random
    256-bit hashes share one of 13 parts of 19 bits with 1 in ~40,000 others; work grows with the images times those.
    Measured on hashes made as benchmarks/doctor_ann.py makes them, with 500 planted pairs: 0.9 s at 200,000, 8.3 s at
    1,000,000; faiss's IndexBinaryMultiHash(256, 13, 19) range search found the same pairs in 2.4 and 16.6 s."""
    count, width = bits.shape
    parts = max_distance + 1
    part = min(width // parts, 62)
    if part < 1:
        raise ValueError(f"{width}-bit hashes cannot be cut into {parts} parts")
    packed = np.packbits(bits.astype(bool), axis=1)
    weights = np.int64(1) << np.arange(part, dtype=np.int64)
    keys = np.empty((count, parts), dtype=np.int64)
    for start in range(0, count, ADD_ROWS):
        rows = bits[start:start + ADD_ROWS].astype(np.int64)
        keys[start:start + ADD_ROWS] = np.stack([rows[:, p * part:(p + 1) * part] @ weights for p in range(parts)], 1)
    found_first, found_second = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for p in range(parts):
        order = np.argsort(keys[:, p], kind="stable")
        ordered = keys[order, p]
        live, step = np.flatnonzero(ordered[1:] == ordered[:-1]), 1  # sorted: equal at +step means equal between
        while len(live):
            first, second = order[live], order[live + step]
            fresh = np.all(keys[first, :p] != keys[second, :p], axis=1)  # agreeing on an earlier part: found there
            first, second = first[fresh], second[fresh]
            close = hamming(packed, first, second) <= max_distance
            found_first.append(first[close])
            found_second.append(second[close])
            step += 1
            live = live[live + step < count]
            live = live[ordered[live + step] == ordered[live]]
    pairs = _ordered_unique(np.concatenate(found_first), np.concatenate(found_second))
    return pairs, hamming(packed, pairs[:, 0], pairs[:, 1])
