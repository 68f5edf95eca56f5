"""`transferkit doctor`: problems in an image dataset, found from the files and from the backbone features.

Checks each file (unreadable, empty, wrong extension, animated, tiny, extreme aspect ratio), exact duplicates (and the
same bytes under two labels), near duplicates (backbone features or perceptual hashes; above all across splits:
train/validation leakage), class balance, label issues (cleanlab on out-of-fold probabilities of a logistic regression
on the cached features, ranked, with a measured cut for "likely label error") and outliers (images whose nearest
neighbours are unusually far). What to act on comes first: leakage, unreadable files, conflicting and likely wrong
labels.

Multi-label data (a set of labels an image) gets the same checks: counts count each label, an exact copy under another
label set is a conflict, and label issues come from cleanlab's multi-label filter on out-of-fold probabilities of one
sigmoid per class, naming the labels of each flagged image that look wrong (missing, or there by mistake).
"""

from __future__ import annotations

import io
import sqlite3
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from transferkit.data import (DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, content_digest, decode_image, default_workers,
                             load_dataset, read_file_and_stat, read_item)
from transferkit.multilabel import is_multilabel, label_matrix, sigmoid
from transferkit.neighbours import (exact_distances, hamming, hash_pairs, index_library, neighbour_distances,
                                    row_dots, similar_pairs, unit_rows_in_blocks)
from transferkit.novelty import NEIGHBOURS, neighbour_distance, unit_rows
from transferkit.text import plural

TINY_SIDE = 32
EXTREME_ASPECT = 4.0
NEAR_DUPLICATE_COSINE = 0.97
# Near duplicates are also images whose perceptual hashes (imagehash's phash, 16 x 16 = 256 bits) differ in at most
# PHASH_DISTANCE bits: they catch recoloured, greyscale and re-encoded copies whose backbone features differ, while
# the features catch flips and crops. Measured in benchmarks/doctor_image_checks.py: 256 bits at <= 12 pair no two
# of the demo's 1,797 handwritten digits, where 64 bits at <= 4 paired 72 different scans.
PHASH_SIZE = 16
PHASH_DISTANCE = 12
PHASH_SIDE = 4 * PHASH_SIZE  # phash's DCT input: decoding larger gains nothing
MIN_IMAGES_PER_CLASS = 10
FOLDS = 5
# The out-of-fold regression sees mean-centred unit features scaled to this length, which sets how strongly its
# weight penalty holds it back. Measured with benchmarks/doctor_labels.py: at 4 the planted label errors rank best
# on hard data (flowers100) and the digits; at 1 or 2 the model is too timid, at 8 or more too sure of its mistakes.
OOF_FEATURE_LENGTH = 4.0
# cleanlab flags every image its noise-rate pruning picks; "likely label error" is kept for those whose given label
# the out-of-fold model gives under 5 %: the precision of that cut is measured in benchmarks/doctor_labels.py.
LIKELY_LABEL_ERROR_SCORE = 0.05
# Multi-label data: an image's score is the out-of-fold probability of its given label set (one sigmoid per class:
# the product over the classes of p for a given label and 1 - p for one not given); cleanlab's multi-label filter
# flags the images, and "likely label error" is kept for those whose set scores under LIKELY_MULTILABEL_ERROR_SCORE
# (a set wrong in several labels) or whose least believed label decision (p or 1 - p) is under LIKELY_WRONG_LABEL
# (one label missing or there by mistake). Neither alone does both. On 150 mosaics with 8 label sets replaced by their
# complement (tests/test_multilabel_doctor.py) the set's probability under 0.003 finds 6 with no clean image, the
# least believed decision under 0.03 none (a fold's probe learns from 120 mosaics and is sure of no single label).
# On mosaics with one label removed or added in 5 % of the images (benchmarks/multilabel_doctor.py, seed 0) the
# decision under 0.03 is the more precise: 1,500 mosaics 6 flagged at precision 0.33 and 0.50 (noise seeds 0, 1),
# the set 14 at 0.07 and 0.14, both together 19 and 18 at 0.16 and 0.22, recall 0.04 and 0.05; 3,000 mosaics the
# decision 10 at 0.60, both 30 at 0.23 (noise seed 0). The clean 1,500 get 20 likely label errors (1.3 %), 3,000
# 26 (0.9 %). Short of the issue's 0.6: the probe on pooled features misses a flower in a quarter of the picture (on
# clean mosaics 21 % of its label decisions are wrong), so one missing or added label mostly looks like its mistakes.
LIKELY_MULTILABEL_ERROR_SCORE = 0.003
LIKELY_WRONG_LABEL = 0.03
# The multi-label out-of-fold regression's penalty is at least this over its training images: a fixed 2e-3 leaves the
# sigmoids sure of their mistakes on a few hundred images (on the test's 150 mosaics, 120 a fold, with 8 label sets
# replaced, their out-of-fold binary cross-entropy was worse than the class frequencies': 3.9 and 3.3 for two
# plantings against 3.4; at 2e-2 3.2 and 2.9), while on the benchmark's 1,500 with 5 % of the labels changed it was
# flat from 1e-3 to 2e-3 (2.26, 2.28) and worse at 8e-3 (2.41). Measured with the doctor's out-of-fold fit on cached
# features of benchmarks/multilabel_mosaics.py's mosaics, outside the benchmark.
OOF_MULTILABEL_PENALTY = 3.0
# A flagged multi-label image's labels that look wrong: the classes whose given decision the out-of-fold model
# believes less than this (at least the worst one).
WRONG_LABEL_SCORE = 0.5
OOF_WEIGHT_DECAY = 2e-3  # the out-of-fold regression's penalty: 1e-3 x the squared weights
# What the out-of-fold model sees: every block's features ("blocks", as the probe) or the final ones ("final").
# Measured with benchmarks/doctor_labels.py --label-features (5 % of labels moved, seeds 0 and 1; precision / recall of
# the likely label errors): flowers100 blocks 0.72 / 0.54 and 0.67 / 0.52, final 0.66 / 0.57 and 0.58 / 0.55; the demo
# digits blocks 0.92 / 0.73 and 0.93 / 0.76, final 0.87 / 0.72 and 0.89 / 0.74; hymenoptera blocks 0.94 / 0.75 and
# 1.00 / 0.55, final 1.00 / 0.85 and 1.00 / 0.45.
LABEL_FEATURES = "blocks"
OUTLIER_Z = 5.0
MIN_IMAGES_FOR_OUTLIERS = 20
COMPARE_BLOCK = 512
DIRECTION_ROWS = 4096  # rows made unit-length at a time: each row's length is its own, so blocks change no number
SHOW_COMPARE_PROGRESS = 5000  # images; fewer are compared in a few seconds
_FORMAT_EXTENSIONS = {"JPEG": {".jpg", ".jpeg"}, "PNG": {".png"}, "GIF": {".gif"}, "BMP": {".bmp"},
                      "WEBP": {".webp"}, "TIFF": {".tif", ".tiff"}, "MPO": {".jpg", ".jpeg"}}
SEVERITY = {"unreadable": 3, "no_images": 3, "leak_exact": 3, "leak_near": 3, "label_conflict": 3,
            "label_error": 2, "outlier": 2,
            "duplicate": 1, "near_duplicate": 1, "tiny": 1, "wrong_extension": 1, "animated": 1, "extreme_aspect": 1,
            "few_images": 2, "imbalance": 1}

# What a user should look at before anything else: leakage inflates every score, unreadable files and empty classes
# are silently missing from training, and wrong labels teach the model wrong answers.
ACT_ON = ("leak_exact", "leak_near", "unreadable", "no_images", "label_conflict", "label_error")
# (one, several): the words after a count in the summary.
PHRASES = {"unreadable": ("unreadable file", "unreadable files"),
           "no_images": ("class with no usable image", "classes with no usable image"),
           "leak_exact": ("exact duplicate across splits", "exact duplicates across splits"),
           "leak_near": ("near duplicate across splits", "near duplicates across splits"),
           "label_conflict": ("image with two labels", "images with two labels"),
           "label_error": ("likely label error", "likely label errors"), "outlier": ("outlier", "outliers"),
           "duplicate": ("exact duplicate", "exact duplicates"),
           "near_duplicate": ("near duplicate", "near duplicates"),
           "tiny": ("tiny image", "tiny images"), "wrong_extension": ("wrong extension", "wrong extensions"),
           "animated": ("animated image", "animated images"),
           "extreme_aspect": ("extreme aspect ratio", "extreme aspect ratios"),
           "few_images": ("class with too few images", "classes with too few images"),
           "imbalance": ("class imbalance", "class imbalances")}


@dataclass
class Finding:
    kind: str
    path: str
    detail: str
    score: float = 0.0
    other: str | None = None


@dataclass
class LabelIssue:
    """One image cleanlab finds mislabelled, with its score: the out-of-fold probability of its given label.

    Multi-label data: `given` and `suggested` are label sets written as `a|b` ("(no label)" when empty), the score is
    the out-of-fold probability of the given label set (one sigmoid per class: the product of p for each given label
    and 1 - p for each other class), `suggested_probability` that of the suggested set;
    `missing` holds the labels the image looks to have but is not given, `extra` the given ones it looks not to have,
    each with its out-of-fold probability."""

    path: str
    given: str
    suggested: str
    score: float
    suggested_probability: float
    likely: bool
    missing: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class DoctorReport:
    data: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    findings: list[Finding] = field(default_factory=list)
    features_computed: int = 0
    label_issues: list[LabelIssue] = field(default_factory=list)
    label_noise: float | None = None
    multi_label: bool = False
    """Each image has a set of labels: `counts` count each label, so the images are counted in `images`."""
    images: int | None = None

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def totals(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.findings))

    def summary(self) -> str:
        """One paragraph: what to act on first (leakage, unreadable files, likely label errors, with the worst
        label error named), then the other counts, worst first, then cleanlab's estimate of wrong labels."""
        totals = self.totals()
        labels = sum(sum(c.values()) for c in self.counts.values())
        images = self.images if self.images is not None else labels
        text = f"doctor: {plural(images, 'image')} in {plural(len(self.classes), 'class')}"
        phrases = PHRASES
        if self.multi_label:
            text += f" (multi-label, {labels / max(1, images):.1f} labels an image)"
            phrases = {**PHRASES, **MULTILABEL_PHRASES}
        ranked = sorted(totals, key=lambda kind: (-SEVERITY.get(kind, 0), kind))
        act = [kind for kind in ACT_ON if kind in totals]
        rest = [kind for kind in ranked if kind not in ACT_ON]
        if act:
            text += "; act on " + ", ".join(plural(totals[kind], *phrases[kind]) for kind in act)
            worst = next((issue for issue in self.label_issues if issue.likely), None)
            if worst is not None and self.multi_label:
                text += (f" (worst: {_short(worst.path)} labelled {worst.given}, looks like {worst.suggested} "
                         f"at {worst.suggested_probability:.0%}: {_changes(worst)})")
            elif worst is not None:
                text += (f" (worst: {_short(worst.path)} labelled {worst.given}, looks like {worst.suggested} "
                         f"at {worst.suggested_probability:.0%})")
        if rest:
            text += ("; also " if act else "; found ") + ", ".join(plural(totals[kind], *phrases[kind])
                                                                   for kind in rest)
        if not totals:
            text += ", no problems found"
        if self.label_noise is not None and self.label_noise > 0:
            text += (f". cleanlab estimates {self.label_noise:.1%} of the images have a wrong label set"
                     if self.multi_label else f". cleanlab estimates {self.label_noise:.1%} of the labels are wrong")
        return text + "."

    def to_dict(self) -> dict:
        kept = {"data": self.data, "classes": self.classes, "counts": self.counts, "totals": self.totals(),
                "findings": [asdict(f) for f in self.findings],
                "label_noise": self.label_noise, "label_issues": [asdict(issue) for issue in self.label_issues]}
        if self.multi_label:
            kept.update(multi_label=True, images=self.images)
        else:  # single-label data: the label issues as they always were
            for issue in kept["label_issues"]:
                del issue["missing"], issue["extra"]
        return kept


MULTILABEL_PHRASES = {"label_conflict": ("image with two label sets", "images with two label sets")}
NO_LABEL = "(no label)"


def _label_text(labels: str | tuple[str, ...]) -> str:
    """A sample's label, or its label set as `a|b` (NO_LABEL when empty)."""
    if isinstance(labels, str):
        return labels
    return "|".join(labels) if labels else NO_LABEL


def _changes(issue: LabelIssue) -> str:
    """What looks wrong in a multi-label image's labels: "tulip missing (0.97), rose not there (0.03)"."""
    return ", ".join([f"{name} missing ({p:.2f})" for name, p in issue.missing.items()]
                     + [f"{name} not there ({p:.2f})" for name, p in issue.extra.items()])


def _short(path: str) -> str:
    """The file and its folder, enough to find it in a one-line summary."""
    return "/".join(Path(path).parts[-2:])


@dataclass(frozen=True)
class ImageFacts:
    """What decoding a file's content tells the checks; cached by content digest, so unchanged files are not read."""

    format: str | None = None
    frames: int = 1
    width: int = 0
    height: int = 0
    error: str | None = None
    phash: str | None = None  # imagehash's perceptual hash (PHASH_SIZE squared bits, as hex)


def _image_facts(data: bytes, max_pixels: int) -> ImageFacts:
    if not data:
        return ImageFacts(error="empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format, frames, (width, height) = image.format, getattr(image, "n_frames", 1), image.size
    except Exception:  # noqa: BLE001 - decode_image below says precisely why
        image_format, frames, width, height = None, 1, 0, 0
    try:  # a JPEG decoded at 1/8 scale is still read to its end, so truncation shows, at a fraction of the cost
        image = decode_image(data, max_pixels, (PHASH_SIDE, PHASH_SIDE))
    except ImageDecodeError as err:
        return ImageFacts(image_format, frames, width, height, str(err))
    return ImageFacts(image_format, frames, width, height, phash=str(imagehash.phash(image, hash_size=PHASH_SIZE)))


def _file_findings(path: Path | str, facts: ImageFacts) -> list[Finding]:
    name = str(path)
    if facts.error is not None:
        return [Finding("unreadable", name, facts.error, 1.0)]
    found = []
    suffix, width, height = Path(name).suffix.lower(), facts.width, facts.height
    if facts.format in _FORMAT_EXTENSIONS and suffix not in _FORMAT_EXTENSIONS[facts.format]:
        found.append(Finding("wrong_extension", name, f"{facts.format} data in a {suffix or 'no-extension'} file"))
    if facts.frames > 1:
        found.append(Finding("animated", name, f"{facts.frames} frames; only the first is used", float(facts.frames)))
    if min(width, height) < TINY_SIDE:
        found.append(Finding("tiny", name, f"{width}x{height} pixels", float(TINY_SIDE - min(width, height))))
    aspect = max(width, height) / max(1, min(width, height))
    if aspect > EXTREME_ASPECT:
        found.append(Finding("extreme_aspect", name, f"{width}x{height} (aspect {aspect:.1f}); a centre crop "
                                                     "loses most of it", aspect))
    return found


def _check_files(paths: list[Path], cache, progress: bool | None) -> list[tuple[str | None, ImageFacts]]:
    """(content digest, facts) per path; a file that cannot be read gets no digest. Files the cache has seen
    unchanged (same size, mtime and inode) are not read again."""
    from concurrent.futures import ThreadPoolExecutor

    from transferkit.progress import progress_bar

    known = cache.known_digests(paths) if cache is not None else {}
    stored = cache.image_facts(known.values()) if cache is not None else {}
    stored = {digest: facts for digest, facts in stored.items() if "phash" in facts}  # older facts: learnt again
    learnt: dict[str, dict] = {}
    seen: list[tuple[Path, tuple[int, int, int], str]] = []
    bar = progress_bar(sum(known.get(i) not in stored for i in range(len(paths))), "Checking files", "file",
                       progress, quiet_when_empty=True)

    def check(i: int) -> tuple[str | None, ImageFacts]:
        if known.get(i) in stored:
            return known[i], ImageFacts(**stored[known[i]])
        bar.update()
        try:
            data, file_stat = read_file_and_stat(paths[i])
        except ImageDecodeError as err:
            return None, ImageFacts(error=str(err))
        digest, facts = content_digest(data), _image_facts(data, DEFAULT_MAX_IMAGE_PIXELS)
        learnt[digest] = asdict(facts)
        if file_stat is not None:
            seen.append((paths[i], file_stat, digest))
        return digest, facts

    with ThreadPoolExecutor(default_workers()) as pool:
        results = list(pool.map(check, range(len(paths))))
    bar.close()
    if cache is not None and learnt:
        try:
            cache.remember(seen)
            cache.remember_image_facts(learnt)
        except (OSError, sqlite3.Error):
            pass  # the checks are done; only the next run's shortcut is lost
    return results


def _oof_probabilities(features: np.ndarray, targets: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Out-of-fold class probabilities of a multinomial logistic regression (L2, fitted with L-BFGS: the probe's
    `head.fit_linear`): each image is predicted by a model that never saw it. Multi-label `targets` (an (images,
    classes) 0/1 matrix) get one sigmoid per class, fitted with binary cross-entropy, as the multi-label probe."""
    import torch

    from transferkit.head import fit_linear

    multi = is_multilabel(targets)
    probabilities = np.zeros((len(targets), num_classes))
    rng = np.random.default_rng(seed)
    if multi:
        folds = min(FOLDS, len(targets))
        if folds < 2:
            return probabilities
        fold_of = _multilabel_folds(targets, folds, rng)
    else:
        per_class = np.bincount(targets, minlength=num_classes)
        folds = min(FOLDS, int(per_class[per_class > 0].min()))
        if folds < 2:
            return probabilities
        fold_of = np.empty(len(targets), dtype=np.int64)
        for c in range(num_classes):  # stratified: each class spread evenly over the folds
            members = rng.permutation(np.flatnonzero(targets == c))
            fold_of[members] = np.arange(len(members)) % folds
    x, y = torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(targets)
    for fold in range(folds):
        train, held_out = torch.as_tensor(fold_of != fold), torch.as_tensor(fold_of == fold)
        decay = max(OOF_WEIGHT_DECAY, OOF_MULTILABEL_PENALTY / int(train.sum())) if multi else OOF_WEIGHT_DECAY
        weight, bias = fit_linear(x[train], y[train], num_classes, decay)
        with torch.no_grad():
            logits = x[held_out] @ weight.T + bias
            probabilities[held_out.numpy()] = (sigmoid(logits.numpy()) if multi else
                                               torch.softmax(logits, dim=1).numpy())
    return probabilities


def _multilabel_folds(targets: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """The fold of each image of multi-label `targets`, stratified by its rarest label: the images whose rarest label
    is one class (or that have none) are dealt round the folds in a random order, so each class is spread over them."""
    frequency = targets.sum(0)
    rarest = np.where(targets.any(1), np.where(targets > 0, frequency[None, :], np.inf).argmin(1), -1)
    fold_of = np.empty(len(targets), dtype=np.int64)
    dealt = 0
    for c in np.unique(rarest):
        members = rng.permutation(np.flatnonzero(rarest == c))
        fold_of[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return fold_of


def _directions(features: np.ndarray) -> np.ndarray:
    """Features less the dataset's mean, at unit length. Pooled backbone features share a large common part (on
    the demo's digits, two random images have a raw cosine of 0.83), which would make every pair look alike."""
    centred = features - features.mean(0)
    for start in range(0, len(centred), DIRECTION_ROWS):  # in place, by blocks: one images x numbers array in memory
        block = centred[start:start + DIRECTION_ROWS]
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return centred


def _label_issues(paths: list[str], features: np.ndarray, targets: np.ndarray, classes: list[str],
                  seed: int) -> tuple[list[LabelIssue], float | None]:
    """cleanlab's label issues (`find_label_issues`, pruned by its estimated noise rates) ranked worst first by
    self-confidence, the out-of-fold probability of the given label; and cleanlab's estimate of the share of wrong
    labels. An issue is `likely` when its score is under LIKELY_LABEL_ERROR_SCORE."""
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues

    probabilities = _oof_probabilities(_directions(features) * OOF_FEATURE_LENGTH, targets, len(classes), seed)
    if not probabilities.any():
        return [], None
    ranked = find_label_issues(targets, probabilities, filter_by="prune_by_noise_rate",
                               return_indices_ranked_by="self_confidence", n_jobs=1)
    noise_rate = float(num_label_issues(targets, probabilities)) / len(targets)
    issues = []
    for i in ranked:
        suggested, score = int(probabilities[i].argmax()), float(probabilities[i, targets[i]])
        issues.append(LabelIssue(paths[i], classes[targets[i]], classes[suggested], score,
                                 float(probabilities[i, suggested]), score < LIKELY_LABEL_ERROR_SCORE))
    return issues, noise_rate


def _multilabel_issues(paths: list[str], features: np.ndarray, targets: np.ndarray, classes: list[str],
                       seed: int) -> tuple[list[LabelIssue], float | None]:
    """Label issues of multi-label data: the images cleanlab's multi-label filter flags (`multilabel_classification.
    filter.find_label_issues`, one-vs-rest pruning by noise rate per class) on out-of-fold sigmoid probabilities,
    ranked worst first by their score, the out-of-fold probability of the given label set (ties by cleanlab's label
    quality score); and cleanlab's estimate of the share of images with a wrong label set. Each names the labels that
    look wrong (the decisions believed under WRONG_LABEL_SCORE, at least the least believed one) and suggests the set
    with those changed, with its out-of-fold probability; it is `likely` when its score is under
    LIKELY_MULTILABEL_ERROR_SCORE or its least believed decision under LIKELY_WRONG_LABEL, and the likely ones come
    first, each ranked by how far under its cut it is."""
    from cleanlab.count import num_label_issues
    from cleanlab.multilabel_classification import get_label_quality_scores
    from cleanlab.multilabel_classification.filter import find_label_issues

    probabilities = _oof_probabilities(_directions(features) * OOF_FEATURE_LENGTH, targets, len(classes), seed)
    if not probabilities.any():
        return [], None
    given = targets > 0
    labels = [np.flatnonzero(row).tolist() for row in given]
    flagged = find_label_issues(labels, probabilities, filter_by="prune_by_noise_rate", n_jobs=1)
    with warnings.catch_warnings():  # cleanlab 2.x calls its own deprecated multi_label filter here
        warnings.simplefilter("ignore", DeprecationWarning)
        noise_rate = float(num_label_issues(labels, probabilities, multi_label=True)) / len(targets)
    agree = np.where(given, probabilities, 1 - probabilities)  # the probability of each given decision
    score, worst = _set_probability(agree), agree.min(1)
    under = np.minimum(score / LIKELY_MULTILABEL_ERROR_SCORE, worst / LIKELY_WRONG_LABEL)  # likely under 1
    quality = get_label_quality_scores(labels, probabilities)
    issues = []
    for i in sorted(np.flatnonzero(flagged), key=lambda i: (under[i], quality[i], i)):
        wrong = (agree[i] < WRONG_LABEL_SCORE) | (agree[i] == worst[i])
        suggested = given[i] ^ wrong
        issues.append(LabelIssue(
            paths[i], _label_text(tuple(classes[k] for k in np.flatnonzero(given[i]))),
            _label_text(tuple(classes[k] for k in np.flatnonzero(suggested))), float(score[i]),
            float(_set_probability(np.where(wrong, 1 - agree[i], agree[i]))),
            bool(under[i] < 1),
            missing={classes[k]: float(probabilities[i, k]) for k in np.flatnonzero(wrong & ~given[i])},
            extra={classes[k]: float(probabilities[i, k]) for k in np.flatnonzero(wrong & given[i])}))
    return issues, noise_rate


def _set_probability(agree: np.ndarray) -> np.ndarray:
    """The probability of a label set from the probabilities of its decisions (one sigmoid per class: a product)."""
    return np.exp(np.log(np.clip(agree, 1e-12, 1.0)).sum(-1))


def _label_findings(issues: list[LabelIssue]) -> list[Finding]:
    return [Finding("label_error", issue.path,
                    f"labelled {issue.given} ({issue.score:.2f}), looks like {issue.suggested} "
                    f"({issue.suggested_probability:.2f}): {_changes(issue)}"
                    if issue.missing or issue.extra else
                    f"labelled {issue.given} ({issue.score:.2f}), looks like {issue.suggested} "
                    f"({issue.suggested_probability:.2f})", 1 - issue.score)
            for issue in issues if issue.likely]


def _hash_bits(hashes: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Each image's perceptual hash as PHASH_SIZE squared 0/1 numbers (zeros without a hash), and which have one."""
    bits = np.zeros((len(hashes), PHASH_SIZE * PHASH_SIZE), dtype=np.uint8)
    present = np.array([text is not None for text in hashes], dtype=bool)
    rows = np.flatnonzero(present)
    if len(rows):  # imagehash's hex is the bits in order, first bit highest: 40 us a hash through hex_to_hash
        packed = np.frombuffer(bytes.fromhex("".join(hashes[i] for i in rows)), dtype=np.uint8)
        bits[rows] = np.unpackbits(packed.reshape(len(rows), -1), axis=1)
    return bits, present


def _near_finding(paths: list[str], splits: list[str], i: int, j: int, cosine: float, differ: float) -> Finding:
    """Image i looks like image j (i < j): a leak when they are in different splits."""
    bits = PHASH_SIZE * PHASH_SIZE
    leak = splits[i] != splits[j]
    return Finding("leak_near" if leak else "near_duplicate", paths[i],
                   f"looks like {paths[j]} (cosine {cosine:.3f}, {differ:.0f} of {bits} hash bits differ)"
                   + (f"; {splits[i]} vs {splits[j]}" if leak else ""),
                   float(max(cosine, 1 - differ / bits)), paths[j])


def _compare_all(paths: list[str], splits: list[str], features: np.ndarray, hashes: list[str | None],
                 exact: set[frozenset], threshold: float, progress: bool | None) -> tuple[list[Finding], list[Finding]]:
    """Near duplicates and outliers, from every image compared with every other, a block of rows at a time: memory
    grows with the block times the images, never with the images squared, and the search is exact. From
    neighbours.INDEX_FROM images on (with faiss installed) an approximate nearest-neighbour index proposes the pairs
    and neighbours instead, and exact cosines and hash distances decide (`_compare_by_index`).

    Near duplicates: mean-centred directions (`_directions`) at `threshold` cosine or more, or perceptual hashes at
    most PHASH_DISTANCE bits apart (Hamming distances from a product of +-1 vectors). Outliers are the images whose
    nearest neighbours are unusually far (a robust z-score of the mean cosine distance to the NEIGHBOURS nearest, over
    the dataset), in the raw features: centring would make two-class data all look like its two class directions, and
    a placeholder picture (hymenoptera's imageNotFound.gif) would no longer stand out."""
    from transferkit.progress import progress_bar

    hash_bits, has_hash = _hash_bits(hashes)
    shown = progress if len(features) >= SHOW_COMPARE_PROGRESS else False
    library = index_library(len(features))
    neighbours = min(NEIGHBOURS, len(features) - 1)
    if library is not None:
        duplicates, distance = _compare_by_index(library, paths, splits, features, hash_bits, has_hash, exact,
                                                 threshold, shown)
    else:
        directions = _directions(features).astype(np.float32, copy=False)
        bits = PHASH_SIZE * PHASH_SIZE
        # an image without a hash is 128 bits from every other
        signs = np.where(has_hash[:, None], hash_bits * 2.0 - 1.0, 0.0).astype(np.float32)
        unit = unit_rows(features)
        distance = np.zeros(len(unit))
        duplicates = []
        bar = progress_bar(len(unit), "Comparing images", "img", shown)
        for start in range(0, len(unit), COMPARE_BLOCK):
            rows = slice(start, start + COMPARE_BLOCK)
            similar = directions[rows] @ directions.T
            differ = (bits - signs[rows] @ signs.T) / 2
            for row, column in zip(*np.nonzero((similar >= threshold) | (differ <= PHASH_DISTANCE))):
                i = start + row
                if column <= i or frozenset((paths[i], paths[column])) in exact:
                    continue
                duplicates.append(_near_finding(paths, splits, i, column, similar[row, column], differ[row, column]))
            if neighbours > 0:  # the same score that calls a trained model's inputs unknown
                distance[rows] = neighbour_distance(unit[rows], unit, neighbours, first_self=start)
            bar.update(len(similar))
        bar.close()
    outliers = []
    if neighbours > 0 and len(features) >= MIN_IMAGES_FOR_OUTLIERS:
        typical, z = _robust_z(distance)
        outliers = [Finding("outlier", paths[i], f"far from every other image (distance {distance[i]:.2f} to its "
                            f"{neighbours} nearest; typical {typical:.2f})", float(z[i]))
                    for i in np.flatnonzero(z > OUTLIER_Z)]
    return duplicates, outliers


def _robust_z(distance: np.ndarray) -> tuple[float, np.ndarray]:
    """The median of the distances, and each one's distance from it in robust standard deviations."""
    typical = np.median(distance)
    spread = 1.4826 * np.median(np.abs(distance - typical))  # the standard deviation, were it normal
    return typical, (distance - typical) / max(spread, 1e-6)


def _compare_by_index(library, paths: list[str], splits: list[str], features: np.ndarray, hash_bits: np.ndarray,
                      has_hash: np.ndarray, exact: set[frozenset], threshold: float,
                      progress: bool | None) -> tuple[list[Finding], np.ndarray]:
    """`_compare_all`'s near duplicates (in the same order) and neighbour distances, from nearest-neighbour indexes
    (one at a time: the centred directions, then the raw unit features) and multi-index hashing of the perceptual
    hashes, never every pair: `transferkit.neighbours` says how, and what was measured."""
    directions = _directions(features).astype(np.float32, copy=False)
    similar, _ = similar_pairs(library, directions, threshold, progress)
    hashed = np.flatnonzero(has_hash)
    pairs = np.unique(np.concatenate([similar, hashed[hash_pairs(hash_bits[hashed], PHASH_DISTANCE)[0]]]), axis=0)
    cosines = row_dots(directions, pairs[:, 0], pairs[:, 1])
    del directions
    differ = np.where(has_hash[pairs[:, 0]] & has_hash[pairs[:, 1]],
                      hamming(np.packbits(hash_bits, axis=1), pairs[:, 0], pairs[:, 1]), PHASH_SIZE * PHASH_SIZE / 2)
    duplicates = [_near_finding(paths, splits, i, j, cosine, difference)
                  for (i, j), cosine, difference in zip(pairs.tolist(), cosines.tolist(), differ.tolist())
                  if frozenset((paths[i], paths[j])) not in exact]
    unit = unit_rows_in_blocks(features)
    distance = neighbour_distances(library, unit, NEIGHBOURS, progress)
    # The index's distances are never too low (what it misses can only be nearer), so every outlier is among those it
    # makes outliers: they are measured exactly. At 200,000 images it made 41, 23 of them outliers
    # (benchmarks/doctor_ann.py).
    suspects = np.flatnonzero(_robust_z(distance)[1] > OUTLIER_Z)
    distance[suspects] = exact_distances(unit, suspects, NEIGHBOURS)
    return duplicates, distance


def diagnose(data: str | Path, val: str | Path | None = None, test: str | Path | None = None,
             val_percent: float = 10.0, test_percent: float = 10.0, backbone: str = "efficientnet_lite0",
             weights: str | None = None, image_size: int | None = None,
             near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE, cache_dir: str | Path | None = None,
             use_cache: bool = True, use_features: bool = True, seed: int = 0, progress: bool | None = None,
             multi_label: bool | None = None, label_sep: str | None = None, **engine_options) -> DoctorReport:
    """Every problem found in DATA, each kind ranked worst first. `use_features=False` keeps to the checks that
    need no backbone (files, exact duplicates, class counts). `multi_label` and `label_sep` read DATA as
    `load_dataset` does (None: label sets detected)."""
    from transferkit.backbone import open_backbone
    from transferkit.features import Extractor, extract_features, open_cache

    dataset = load_dataset(data, val, test, val_percent, test_percent, multi_label, label_sep)
    report = DoctorReport(str(data), dataset.classes, {}, multi_label=dataset.multi_label)
    report.findings += [Finding("unreadable", s.path, s.reason, 1.0) for s in dataset.skipped]
    samples = [(name, sample) for name in dataset.splits for sample in dataset.splits[name]]
    cache = open_cache(cache_dir, use_cache)
    try:
        checked = _check_files([sample.path for _, sample in samples], cache, progress)
        by_digest: dict[str, list[tuple[str, str, str | tuple[str, ...]]]] = defaultdict(list)
        for (split, sample), (digest, facts) in zip(samples, checked):
            report.findings += _file_findings(sample.path, facts)
            if digest is not None and facts.error is None:  # copies of one unreadable file are reported as such
                by_digest[digest].append((str(sample.path), split, sample.label))
        readable = [item for item, (_, facts) in zip(samples, checked) if facts.error is None]
        report.counts = {name: dict(Counter(label for split, s in readable if split == name for label in s.labels))
                         for name in dataset.splits}
        if dataset.multi_label:
            report.images = len(readable)
        settings = {"backbone": backbone, "weights": weights, "image_size": image_size, "seed": seed,
                    "label_features": LABEL_FEATURES,
                    "near_duplicate_cosine": near_duplicate_cosine, **engine_options}
        key = _conclusions_key(samples, checked, dataset.skipped, settings) if use_features and use_cache else None
        known = _read_conclusions(cache_dir, key) if key else None
        if known is not None:
            known.data = str(data)
            return known
        if use_features:
            opened = open_backbone(backbone, weights, image_size)
            extractor = Extractor(opened, cache_dir=cache_dir, **engine_options)
            feature_set = extract_features(extractor, [s.path for _, s in samples], cache, progress=progress)
    finally:
        if cache is not None:
            cache.close()
    exact = set()
    for copies in (c for c in by_digest.values() if len(c) > 1):
        first, first_split, first_label = copies[0]
        for path, split, label in copies[1:]:
            exact.add(frozenset((first, path)))
            if _label_set(label) != _label_set(first_label):
                report.findings.append(Finding("label_conflict", path, f"same bytes as {first}, labelled "
                                               f"{_label_text(first_label)} there and {_label_text(label)} here",
                                               1.0, first))
                continue
            leak = split != first_split
            report.findings.append(Finding("leak_exact" if leak else "duplicate", path, f"same bytes as {first}"
                                           + (f"; {split} vs {first_split}" if leak else ""), 1.0, first))
    totals = Counter(label for _, sample in readable for label in sample.labels)
    files = Counter(label for _, sample in samples for label in sample.labels)
    for name in dataset.classes:
        if totals[name] == 0:
            report.findings.append(Finding("no_images", name, f"none of its {files[name]} files can be read as an "
                                           "image; training needs at least one", float(files[name])))
        elif totals[name] < MIN_IMAGES_PER_CLASS:
            report.findings.append(Finding("few_images", name, f"{totals[name]} usable images; fewer than "
                                           f"{MIN_IMAGES_PER_CLASS} cannot be split and learned reliably",
                                           float(MIN_IMAGES_PER_CLASS - totals[name])))
    if totals and max(totals.values()) > 3 * max(1, min(totals.values())):
        largest, smallest = max(totals, key=totals.get), min(totals, key=totals.get)
        ratio = totals[largest] / max(1, totals[smallest])
        report.findings.append(Finding("imbalance", smallest, f"{largest} has {totals[largest]} images, {smallest} "
                                       f"{totals[smallest]} (ratio {ratio:.1f}); consider --balance sampler", ratio))

    if not use_features:
        report.findings.sort(key=lambda f: (-SEVERITY.get(f.kind, 0), f.kind, -f.score, f.path))
        return report
    report.features_computed = feature_set.computed
    kept = feature_set.kept
    paths = [str(samples[i][1].path) for i in kept]
    splits = [samples[i][0] for i in kept]
    if dataset.multi_label:
        targets = label_matrix([samples[i][1].labels for i in kept], dataset.classes)
    else:
        targets = np.array([dataset.classes.index(samples[i][1].label) for i in kept], dtype=np.int64)
    hashes = [checked[i][1].phash for i in kept]
    # Near duplicates and outliers compare the final features (the last block's part of `blocks` features), whose
    # cosines the thresholds above were measured on.
    final = feature_set.features[:, -opened.block_widths[-1]:]
    duplicates, outliers = _compare_all(paths, splits, final, hashes, exact, near_duplicate_cosine, progress)
    report.findings += duplicates + outliers
    label_features = feature_set.features if LABEL_FEATURES == "blocks" else final
    if dataset.multi_label:
        if len(targets) and (targets.min(0) < targets.max(0)).any():  # a class some images have and others lack
            report.label_issues, report.label_noise = _multilabel_issues(paths, label_features, targets,
                                                                         dataset.classes, seed)
    elif len(set(targets.tolist())) > 1:
        report.label_issues, report.label_noise = _label_issues(paths, label_features, targets, dataset.classes,
                                                                seed)
    report.findings += _label_findings(report.label_issues)
    report.findings.sort(key=lambda f: (-SEVERITY.get(f.kind, 0), f.kind, -f.score, f.path))
    if key:
        _write_conclusions(cache_dir, key, report)
    return report


# Bump when the same data would get other findings: conclusions kept under an older version are not reused.
CONCLUSIONS_VERSION = 2


def _label_set(label: str | tuple[str, ...]) -> frozenset[str]:
    return frozenset((label,) if isinstance(label, str) else label)


def _conclusions_key(samples: list, checked: list[tuple[str | None, ImageFacts]], skipped: list,
                     settings: dict) -> str:
    """What the doctor's conclusions depend on: every file's path, split, label and content (or why it cannot be
    read), and the settings. A warm `train` then reuses them without fitting a model or comparing any image."""
    import hashlib
    import json

    files = [(str(sample.path), split, sample.label, digest or facts.error)
             for (split, sample), (digest, facts) in zip(samples, checked)]
    payload = {"version": CONCLUSIONS_VERSION, "settings": settings, "files": files,
               "skipped": [(str(s.path), s.reason) for s in skipped]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _conclusions_file(cache_dir: str | Path | None, key: str) -> Path:
    from transferkit.features import cache_root

    return cache_root(cache_dir) / "doctor" / f"{key}.json"


def _read_conclusions(cache_dir: str | Path | None, key: str) -> DoctorReport | None:
    import json

    try:
        kept = json.loads(_conclusions_file(cache_dir, key).read_text(encoding="utf-8"))
        return DoctorReport(kept["data"], kept["classes"], kept["counts"], [Finding(**f) for f in kept["findings"]],
                            0, [LabelIssue(**issue) for issue in kept["label_issues"]], kept["label_noise"],
                            kept.get("multi_label", False), kept.get("images"))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none kept, or damaged: the checks run again


def _write_conclusions(cache_dir: str | Path | None, key: str, report: DoctorReport) -> None:
    import json

    from transferkit.runs import write_atomically

    path = _conclusions_file(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda temporary: temporary.write_text(json.dumps(report.to_dict()), encoding="utf-8"))
    except OSError:
        pass  # the report is complete; only the next run's shortcut is lost


TITLES = {"unreadable": "Unreadable files", "no_images": "Classes with no usable image",
          "leak_exact": "Exact duplicates across splits (leakage)",
          "leak_near": "Near duplicates across splits (leakage)", "label_error": "Likely label errors",
          "label_conflict": "The same image under two labels",
          "outlier": "Outliers: far from every other image", "few_images": "Classes with too few images",
          "imbalance": "Class imbalance", "duplicate": "Exact duplicates", "near_duplicate": "Near duplicates",
          "tiny": "Tiny images", "wrong_extension": "Wrong extensions", "animated": "Animated or multi-frame",
          "extreme_aspect": "Extreme aspect ratios"}


def _thumbnail(path: str, side: int = 96) -> str | None:
    import base64

    try:
        image = decode_image(read_item(path), DEFAULT_MAX_IMAGE_PIXELS, (2 * side, 2 * side))
    except ImageDecodeError:
        return None
    image.thumbnail((2 * side, 2 * side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html(report: DoctorReport, path: str | Path, limit: int = 50) -> Path:
    """The findings as one self-contained page, with thumbnails of the images involved: what to act on first
    (leakage, unreadable files, cleanlab's ranked label issues), then the rest."""
    from transferkit.pages import render_template
    from transferkit.runs import write_atomically

    groups = defaultdict(list)
    for finding in report.findings:
        groups[finding.kind].append(finding)
    label_issues = report.label_issues[:limit]
    shown = [f for findings in groups.values() for f in findings[:limit]]
    pictured = {f.path for f in shown} | {f.other for f in shown if f.other} | {issue.path for issue in label_issues}
    thumbnails = {p: _thumbnail(p) for p in pictured if Path(p).is_file()}
    page = render_template("doctor.html", report=report, titles=TITLES, thumbnails=thumbnails, limit=limit,
                           act_on=[(kind, groups[kind]) for kind in ACT_ON if kind in groups and kind != "label_error"],
                           others=[(kind, found) for kind, found in groups.items() if kind not in ACT_ON],
                           label_issues=label_issues,
                           likely_below=LIKELY_MULTILABEL_ERROR_SCORE if report.multi_label else
                           LIKELY_LABEL_ERROR_SCORE)
    path = Path(path)
    write_atomically(path, lambda temporary: temporary.write_text(page, encoding="utf-8"))
    return path
