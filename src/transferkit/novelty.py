"""How unlike the training images an image is: one score for "unknown" verdicts (and, its distance part, the
doctor's outliers).

The score has two parts, each standardised by what held-out in-distribution images score: the mean cosine distance
from an image's final features (the last block's part of `blocks` features, all of other kinds) to its `NEIGHBOURS`
nearest training images' (deep nearest neighbours, Sun et al. 2022), which tells far outsiders; plus the energy of
the head's logits (Liu et al. 2020), which tells images the head finds no class for. An image is *unknown* when it
scores above what a share (`accept`) of held-out in-distribution images score: the validation split's, or, with no
validation split, the training images' own (each against the others).

Chosen by measurement (`benchmarks/unknown.py` and the comparisons behind it): far outsiders are 400 flowers100 and
300 demo-digit images against a hymenoptera probe (288 px, 153 validation images); near ones are each flowers100
class against a probe trained on the other four (mean of the five). AUROC, and outsiders still accepted when 95 % of
validation images are:
| score | far: flowers / digits AUROC | accepted | near AUROC |
| --- | --- | --- | --- |
| top probability | 0.906 / 0.902 | 76 % / 97 % | 0.652 |
| energy of the logits | 0.906 / 0.902 | 76 % / 97 % | 0.687 |
| Mahalanobis, shared covariance, final features | 0.964 / 1.000 | 19.5 % / 0 % | 0.61 (PCA 128) |
| relative Mahalanobis (Ren et al. 2021), every block, PCA 128 | - | - | 0.666 |
| 10 nearest, every block's features | 0.922 / 0.993 | 59.5 % / 0 % | 0.631 |
| 10 nearest, final features | 0.978 / 1.000 | 3.3 % / 0 % | 0.618 |
| 10 nearest + top probability | 0.962 / 0.983 | 28.2 % / 0 % | 0.679 |
| **10 nearest, final features + energy** | **0.978 / 1.000** | **0 % / 0 %** | **0.697** |
k = 5 or 20, the last 2, 3 or 6 blocks, class-conditional neighbours moved the far AUROC by under 0.005; centring
the features first lost 0.04. numpy only: the torch-free runtime scores exported models with it.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.errors import DataError, RunError

log = logging.getLogger("transferkit")

NEIGHBOURS = 10
DEFAULT_ACCEPT = 0.95
"""The share of in-distribution (validation) images accepted by default. Measured on hymenoptera: at 0.95, 99.7 % of
1,000 flowers100 photos and all 500 digits are called unknown; at 0.99 only 5.9 % of the flowers are, because the last
few validation photos of ants and bees are themselves unusual (honeycomb, a game's ant, swarms on a wall) and the 99th
percentile of 153 images is the second most unusual of them. So the default gives up 5 % of a user's own photos to
catch nearly every outsider; `--accept 0.99` is the other trade."""
MAX_REFERENCES = 10_000
"""Training images kept to compare with (a random, fixed-seed subset beyond): 10,000 lite0 final features are 25.6 MB
at fp16, and scoring 1,000 images against them is about 0.1 s on 2 cores."""
NOVELTY_FILE = "novelty.npz"
BLOCK_ROWS = 1024
"""Query rows compared at a time: memory grows with this times the references, not with the queries."""


def unit_rows(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def neighbour_distance(queries: np.ndarray, references: np.ndarray, neighbours: int = NEIGHBOURS,
                       first_self: int | None = None) -> np.ndarray:
    """Mean cosine distance of each unit-length query row to its `neighbours` nearest unit-length reference rows.
    `first_self`: the queries are references[first_self:first_self + len(queries)], each not its own neighbour."""
    neighbours = min(neighbours, len(references) - (first_self is not None))
    distance = np.empty(len(queries), dtype=np.float32)
    if neighbours <= 0:
        distance[:] = np.nan
        return distance
    for start in range(0, len(queries), BLOCK_ROWS):
        cosine = queries[start:start + BLOCK_ROWS] @ references.T
        if first_self is not None:
            rows = np.arange(len(cosine))
            cosine[rows, first_self + start + rows] = -np.inf
        nearest = np.partition(cosine, -neighbours, axis=1)[:, -neighbours:]
        distance[start:start + len(cosine)] = 1 - nearest.mean(axis=1)
    return distance


def check_accept(accept: float | None) -> None:
    if accept is not None and not 0 < accept < 1:
        raise DataError(f"--accept is the share of known images to accept, between 0 and 1 (e.g. 0.95), not {accept}.")


def rejection_threshold(novelty: NoveltyModel | None, reject: bool, accept: float | None, model: str) -> float | None:
    """The score above which `model`'s predictions say unknown: None with `reject` off, or when the model keeps no
    statistics (said once per model; asking for an `accept` share of such a model is an error)."""
    check_accept(accept)
    if novelty is None:
        if accept is not None:
            raise RunError(f"{model} keeps no statistics of its training images (written before transferkit scored "
                           f"unknown images), so --accept cannot apply; retrain it (and export it again).")
        if reject and model not in _TOLD_NO_SCORE:
            _TOLD_NO_SCORE.add(model)
            log.warning("%s was written before transferkit scored unknown images: its predictions never say "
                        "unknown; retrain it (and export it again) to get that", model)
        return None
    return novelty.threshold(accept) if reject else None


_TOLD_NO_SCORE: set[str] = set()
"""The models whose missing statistics this process has already reported."""


def energy(logits: np.ndarray) -> np.ndarray:
    """The negative log-sum-exp of the logits (Liu et al. 2020): high when the head finds no class it likes."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1)
    return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))


@dataclass
class NoveltyModel:
    """A run's training features to compare with, how its two parts are put on one scale, and the scores held-out
    in-distribution images got."""

    references: np.ndarray
    """Unit-length final features of (up to MAX_REFERENCES) training images."""
    reference_scores: np.ndarray
    """Sorted scores of held-out in-distribution images: where thresholds come from."""
    scored_on: str
    """"val" (the validation split) or "train" (the training images, each against the others)."""
    accept: float | None
    """The share of `reference_scores` accepted by default; None: no verdicts unless an accept share is given."""
    final_width: int | None
    """Features used: the last `final_width` columns (None: all)."""
    scales: dict[str, list[float]]
    """{"distance": [mean, std], "energy": [mean, std]} of the held-out images: each part is standardised by them."""
    neighbours: int = NEIGHBOURS

    def __post_init__(self):
        self.references = np.asarray(self.references, dtype=np.float32)  # fp16 on disk; converted once, not per batch

    def parts(self, features: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        """The two unstandardised parts of the score: distance to the nearest training images, and energy."""
        part = features if self.final_width is None else features[:, -self.final_width:]
        return {"distance": neighbour_distance(unit_rows(part), self.references, self.neighbours),
                "energy": energy(logits)}

    def scores(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """How unlike the training images each input is (higher: more unlike), from the run's features and the
        head's logits (not divided by the temperature)."""
        return _combined(self.parts(features, logits), self.scales)

    def threshold(self, accept: float | None = None) -> float | None:
        """The score above which an image is unknown, accepting the share `accept` (default: the run's own) of
        held-out images; None when there is no such share."""
        accept = self.accept if accept is None else accept
        check_accept(accept)
        return None if accept is None else float(np.quantile(self.reference_scores, accept))

    def describe(self, accept: float | None = None) -> str:
        accept = self.accept if accept is None else accept
        if accept is None:
            return "unknown images are not flagged (the run has no validation split; give --accept to flag them)"
        where = "validation" if self.scored_on == "val" else "training (each against the others)"
        return (f"unknown when more unlike the training images than {accept:.0%} of {where} images "
                f"(score above {self.threshold(accept):.3f})")

    def to_bytes(self) -> bytes:
        meta = {"scored_on": self.scored_on, "accept": self.accept, "final_width": self.final_width,
                "neighbours": self.neighbours, "scales": self.scales,
                "score": "standardised mean cosine distance to the nearest training images + standardised energy"}
        buffer = io.BytesIO()
        np.savez(buffer, references=self.references.astype(np.float16),
                 reference_scores=self.reference_scores.astype(np.float32), meta=np.array(json.dumps(meta)))
        return buffer.getvalue()

    @classmethod
    def load(cls, folder: str | Path) -> NoveltyModel | None:
        """The model kept in a run or export folder; None when it has none (written before unknown images were
        scored)."""
        path = Path(folder) / NOVELTY_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                return cls(stored["references"], stored["reference_scores"], meta["scored_on"], meta["accept"],
                           meta["final_width"], meta["scales"], meta["neighbours"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # truncated or not an npz
            raise RunError(f"{path} cannot be read ({type(err).__name__}: {err}); retrain the run or delete the "
                           f"file to predict without unknown verdicts.") from None


def _combined(parts: dict[str, np.ndarray], scales: dict[str, list[float]]) -> np.ndarray:
    return sum((parts[name] - mean) / spread for name, (mean, spread) in scales.items())


def fit_novelty(train_features: np.ndarray, train_logits: np.ndarray, val_features: np.ndarray | None,
                val_logits: np.ndarray | None, accept: float | None, final_width: int | None,
                seed: int = 0) -> NoveltyModel:
    """References from the training features; the scales and held-out scores from the validation images (or, with
    none, the training images each against the others, and `accept` then stays as given: None means no verdicts)."""
    check_accept(accept)
    part = (lambda f: f) if final_width is None else (lambda f: f[:, -final_width:])
    kept = np.arange(len(train_features))
    if len(kept) > MAX_REFERENCES:
        kept = np.sort(np.random.default_rng(seed).permutation(len(kept))[:MAX_REFERENCES])
    # rounded as novelty.npz keeps them (fp16), so the held-out scores are the ones a loaded run would give
    references = unit_rows(part(train_features[kept])).astype(np.float16).astype(np.float32)
    if val_features is not None and len(val_features):
        held_out = {"distance": neighbour_distance(unit_rows(part(val_features)), references),
                    "energy": energy(val_logits)}
        scored_on, accept = "val", DEFAULT_ACCEPT if accept is None else accept
    else:
        held_out = {"distance": neighbour_distance(references, references, first_self=0),
                    "energy": energy(train_logits[kept])}
        scored_on = "train"
    scales = {name: [float(np.nanmean(values)), float(max(np.nanstd(values), 1e-6))]
              for name, values in held_out.items()}
    scores = _combined(held_out, scales)
    return NoveltyModel(references, np.sort(scores[np.isfinite(scores)]), scored_on, accept, final_width, scales)


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The probability that an outsider scores above an in-distribution image (ties count half): the Mann-Whitney
    statistic, from ranks."""
    both = np.concatenate([inside, outside])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # tied values share their mean rank
    outside_ranks = ranks[len(inside):].sum()
    return float((outside_ranks - len(outside) * (len(outside) + 1) / 2) / (len(inside) * len(outside)))
