"""`transferkit doctor`: problems in an image dataset, found from the files and from the backbone features.

Checks each file (unreadable, empty, wrong extension, animated, tiny, extreme aspect ratio), exact and near
duplicates (above all across splits: train/validation leakage), class balance, and likely label errors and outliers:
out-of-fold predictions of a linear head on the cached features (confident-learning style: images whose given label
gets a low probability while another class is predicted with a class's typical confidence) and images far from the
centre of their own class.
"""

from __future__ import annotations

import io
import sqlite3
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from transferkit.data import (DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, content_digest, decode_image, default_workers,
                             load_dataset, read_file, read_file_and_stat)
from transferkit.text import plural

TINY_SIDE = 32
EXTREME_ASPECT = 4.0
NEAR_DUPLICATE_COSINE = 0.97
MIN_IMAGES_PER_CLASS = 10
FOLDS = 5
# The out-of-fold regression sees features at this length. On unit vectors its L2 penalty kept it so weak (72 %
# out-of-fold accuracy on the demo's digits, where the probe gets 93 %) that most of its mistakes were flagged; at
# length 8 it gets 92 % and its mistakes stay modest in confidence (at 36, one per dimension, they are overconfident).
OOF_FEATURE_LENGTH = 8.0
# A label error is also an image whose given label the out-of-fold model all but rules out: a hesitation between two
# classes is not a mislabelling.
MAX_GIVEN_LABEL_PROBABILITY = 0.05
_FORMAT_EXTENSIONS = {"JPEG": {".jpg", ".jpeg"}, "PNG": {".png"}, "GIF": {".gif"}, "BMP": {".bmp"},
                      "WEBP": {".webp"}, "TIFF": {".tif", ".tiff"}, "MPO": {".jpg", ".jpeg"}}
SEVERITY = {"unreadable": 3, "no_images": 3, "leak_exact": 3, "leak_near": 3, "label_error": 2, "outlier": 2,
            "duplicate": 1, "near_duplicate": 1, "tiny": 1, "wrong_extension": 1, "animated": 1, "extreme_aspect": 1,
            "few_images": 2, "imbalance": 1}

PHRASES = {"unreadable": "unreadable files", "no_images": "classes with no usable image",
           "leak_exact": "exact duplicates across splits",
           "leak_near": "near duplicates across splits", "label_error": "likely label errors", "outlier": "outliers",
           "duplicate": "exact duplicates", "near_duplicate": "near duplicates", "tiny": "tiny images",
           "wrong_extension": "wrong extensions", "animated": "animated images",
           "extreme_aspect": "extreme aspect ratios", "few_images": "classes with too few images",
           "imbalance": "class imbalance"}


@dataclass
class Finding:
    kind: str
    path: str
    detail: str
    score: float = 0.0
    other: str | None = None


@dataclass
class DoctorReport:
    data: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    findings: list[Finding] = field(default_factory=list)
    features_computed: int = 0

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def totals(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.findings))

    def summary(self) -> str:
        """One paragraph of counts, worst first."""
        totals = self.totals()
        images = sum(sum(c.values()) for c in self.counts.values())
        if not totals:
            return f"doctor: {plural(images, 'image')} in {plural(len(self.classes), 'class')}, no problems found."
        parts = [f"{n} {PHRASES.get(kind, kind)}" for kind, n in
                 sorted(totals.items(), key=lambda item: (-SEVERITY.get(item[0], 0), item[0]))]
        return (f"doctor: {plural(images, 'image')} in {plural(len(self.classes), 'class')}; found "
                + ", ".join(parts) + ".")

    def to_dict(self) -> dict:
        return {"data": self.data, "classes": self.classes, "counts": self.counts, "totals": self.totals(),
                "findings": [asdict(f) for f in self.findings]}


@dataclass(frozen=True)
class ImageFacts:
    """What decoding a file's content tells the checks; cached by content digest, so unchanged files are not read."""

    format: str | None = None
    frames: int = 1
    width: int = 0
    height: int = 0
    error: str | None = None


def _image_facts(data: bytes, max_pixels: int) -> ImageFacts:
    if not data:
        return ImageFacts(error="empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format, frames, (width, height) = image.format, getattr(image, "n_frames", 1), image.size
    except Exception:  # noqa: BLE001 - decode_image below says precisely why
        image_format, frames, width, height = None, 1, 0, 0
    try:  # a JPEG decoded at 1/8 scale is still read to its end, so truncation shows, at a fraction of the cost
        decode_image(data, max_pixels, (2 * TINY_SIDE, 2 * TINY_SIDE))
    except ImageDecodeError as err:
        return ImageFacts(image_format, frames, width, height, str(err))
    return ImageFacts(image_format, frames, width, height)


def _file_findings(path: Path, facts: ImageFacts) -> list[Finding]:
    name = str(path)
    if facts.error is not None:
        return [Finding("unreadable", name, facts.error, 1.0)]
    found = []
    suffix, width, height = path.suffix.lower(), facts.width, facts.height
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


def _check_files(paths: list[Path], cache) -> list[tuple[str | None, ImageFacts]]:
    """(content digest, facts) per path; a file that cannot be read gets no digest. Files the cache has seen
    unchanged (same size, mtime and inode) are not read again."""
    from concurrent.futures import ThreadPoolExecutor

    known = cache.known_digests(paths) if cache is not None else {}
    stored = cache.image_facts(known.values()) if cache is not None else {}
    learnt: dict[str, dict] = {}
    seen: list[tuple[Path, tuple[int, int, int], str]] = []

    def check(i: int) -> tuple[str | None, ImageFacts]:
        if known.get(i) in stored:
            return known[i], ImageFacts(**stored[known[i]])
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
    if cache is not None and learnt:
        try:
            cache.remember(seen)
            cache.remember_image_facts(learnt)
        except (OSError, sqlite3.Error):
            pass  # the checks are done; only the next run's shortcut is lost
    return results


def _oof_probabilities(features: np.ndarray, targets: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Out-of-fold class probabilities of a multinomial logistic regression (L2, fitted with L-BFGS): each image is
    predicted by a model that never saw it. Plain torch, so a warm `train` does not pay sklearn's import."""
    import torch

    probabilities = np.zeros((len(targets), num_classes))
    per_class = np.bincount(targets, minlength=num_classes)
    folds = min(FOLDS, int(per_class[per_class > 0].min()))
    if folds < 2:
        return probabilities
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(targets), dtype=np.int64)
    for c in range(num_classes):  # stratified: each class spread evenly over the folds
        members = rng.permutation(np.flatnonzero(targets == c))
        fold_of[members] = np.arange(len(members)) % folds
    x, y = torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(targets)
    for fold in range(folds):
        train, held_out = torch.as_tensor(fold_of != fold), torch.as_tensor(fold_of == fold)
        with torch.random.fork_rng(devices=[]):  # seeded, and the caller's random state left alone
            torch.manual_seed(seed + fold)
            model = torch.nn.Linear(x.shape[1], num_classes)
        optimizer = torch.optim.LBFGS(model.parameters(), max_iter=100, line_search_fn="strong_wolfe")

        def loss():
            optimizer.zero_grad()
            value = torch.nn.functional.cross_entropy(model(x[train]), y[train]) + 1e-3 * model.weight.square().sum()
            value.backward()
            return value

        optimizer.step(loss)
        with torch.no_grad():
            probabilities[held_out.numpy()] = torch.softmax(model(x[held_out]), dim=1).numpy()
    return probabilities


def _directions(features: np.ndarray) -> np.ndarray:
    """Features less the dataset's mean, at unit length. Pooled backbone features share a large common part (on
    the demo's digits, two random images have a raw cosine of 0.83), which would make every pair look alike."""
    centred = features - features.mean(0)
    return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


def _label_findings(paths: list[str], features: np.ndarray, targets: np.ndarray, classes: list[str],
                    seed: int) -> list[Finding]:
    found = []
    probabilities = _oof_probabilities(_directions(features) * OOF_FEATURE_LENGTH, targets, len(classes), seed)
    if probabilities.any():
        given = probabilities[np.arange(len(targets)), targets]
        # Confident learning's per-class threshold: the mean probability a class gets on images labelled with it.
        thresholds = np.array([probabilities[targets == c, c].mean() if (targets == c).any() else 1.0
                               for c in range(len(classes))])
        predicted = probabilities.argmax(1)
        for i in np.flatnonzero((predicted != targets) & (given < MAX_GIVEN_LABEL_PROBABILITY) &
                                (probabilities[np.arange(len(targets)), predicted] >= thresholds[predicted])):
            found.append(Finding("label_error", paths[i], f"labelled {classes[targets[i]]} ({given[i]:.2f}), looks "
                                 f"like {classes[predicted[i]]} ({probabilities[i, predicted[i]]:.2f})",
                                 float(1 - given[i])))
    # Not centred here: with two classes centring leaves each image mostly its class's direction, and a placeholder
    # image (hymenoptera's imageNotFound.gif) would no longer stand out.
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    centres = np.stack([unit[targets == c].mean(0) if (targets == c).any() else np.zeros(unit.shape[1])
                        for c in range(len(classes))])
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    similarity = (unit * centres[targets]).sum(1)
    for c in range(len(classes)):
        members = np.flatnonzero(targets == c)
        if len(members) < 5:
            continue
        typical, spread = np.median(similarity[members]), np.median(np.abs(similarity[members] -
                                                                           np.median(similarity[members])))
        for i in members[similarity[members] < typical - 6 * max(spread, 1e-3)]:
            found.append(Finding("outlier", paths[i], f"far from the other {classes[c]} images (similarity "
                                 f"{similarity[i]:.2f}, typical {typical:.2f})", float(typical - similarity[i])))
    return found


def _near_duplicates(paths: list[str], splits: list[str], features: np.ndarray, exact: set[frozenset],
                     threshold: float) -> list[Finding]:
    unit = _directions(features)
    found = []
    for start in range(0, len(unit), 1024):
        block = unit[start:start + 1024] @ unit.T
        for row, column in zip(*np.nonzero(block >= threshold)):
            i = start + row
            if column <= i or frozenset((paths[i], paths[column])) in exact:
                continue
            leak = splits[i] != splits[column]
            found.append(Finding("leak_near" if leak else "near_duplicate", paths[i],
                                 f"looks like {paths[column]} (cosine {block[row, column]:.3f})"
                                 + (f"; {splits[i]} vs {splits[column]}" if leak else ""),
                                 float(block[row, column]), paths[column]))
    return found


def diagnose(data: str | Path, val: str | Path | None = None, test: str | Path | None = None,
             val_percent: float = 10.0, test_percent: float = 10.0, backbone: str = "efficientnet_lite0",
             weights: str | None = None, image_size: int | None = None,
             near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE, cache_dir: str | Path | None = None,
             use_cache: bool = True, use_features: bool = True, seed: int = 0, progress: bool | None = None,
             **engine_options) -> DoctorReport:
    """Every problem found in DATA, each kind ranked worst first. `use_features=False` keeps to the checks that
    need no backbone (files, exact duplicates, class counts)."""
    from transferkit.backbone import open_backbone
    from transferkit.features import Extractor, extract_features, open_cache

    dataset = load_dataset(data, val, test, val_percent, test_percent)
    report = DoctorReport(str(data), dataset.classes, {})
    report.findings += [Finding("unreadable", s.path, s.reason, 1.0) for s in dataset.skipped]
    samples = [(name, sample) for name in dataset.splits for sample in dataset.splits[name]]
    cache = open_cache(cache_dir, use_cache)
    try:
        checked = _check_files([sample.path for _, sample in samples], cache)
        by_digest: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for (split, sample), (digest, facts) in zip(samples, checked):
            report.findings += _file_findings(sample.path, facts)
            if digest is not None and facts.error is None:  # copies of one unreadable file are reported as such
                by_digest[digest].append((str(sample.path), split))
        readable = [item for item, (_, facts) in zip(samples, checked) if facts.error is None]
        report.counts = {name: dict(Counter(s.label for split, s in readable if split == name))
                         for name in dataset.splits}
        if use_features:
            extractor = Extractor(open_backbone(backbone, weights, image_size), cache_dir=cache_dir,
                                  **engine_options)
            feature_set = extract_features(extractor, [s.path for _, s in samples], cache, progress=progress)
    finally:
        if cache is not None:
            cache.close()
    exact = set()
    for copies in (c for c in by_digest.values() if len(c) > 1):
        first, first_split = copies[0]
        for path, split in copies[1:]:
            exact.add(frozenset((first, path)))
            leak = split != first_split
            report.findings.append(Finding("leak_exact" if leak else "duplicate", path, f"same bytes as {first}"
                                           + (f"; {split} vs {first_split}" if leak else ""), 1.0, first))
    totals, files = Counter(sample.label for _, sample in readable), Counter(sample.label for _, sample in samples)
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
    targets = np.array([dataset.classes.index(samples[i][1].label) for i in kept], dtype=np.int64)
    report.findings += _near_duplicates(paths, splits, feature_set.features, exact, near_duplicate_cosine)
    if len(set(targets.tolist())) > 1:
        report.findings += _label_findings(paths, feature_set.features, targets, dataset.classes, seed)
    report.findings.sort(key=lambda f: (-SEVERITY.get(f.kind, 0), f.kind, -f.score, f.path))
    return report


TITLES = {"unreadable": "Unreadable files", "no_images": "Classes with no usable image",
          "leak_exact": "Exact duplicates across splits (leakage)",
          "leak_near": "Near duplicates across splits (leakage)", "label_error": "Likely label errors",
          "outlier": "Outliers: far from their class", "few_images": "Classes with too few images",
          "imbalance": "Class imbalance", "duplicate": "Exact duplicates", "near_duplicate": "Near duplicates",
          "tiny": "Tiny images", "wrong_extension": "Wrong extensions", "animated": "Animated or multi-frame",
          "extreme_aspect": "Extreme aspect ratios"}


def _thumbnail(path: str, side: int = 96) -> str | None:
    import base64

    try:
        image = decode_image(read_file(Path(path)), DEFAULT_MAX_IMAGE_PIXELS, (2 * side, 2 * side))
    except ImageDecodeError:
        return None
    image.thumbnail((2 * side, 2 * side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html(report: DoctorReport, path: str | Path, limit: int = 50) -> Path:
    """The findings as one self-contained page, with thumbnails of the images involved."""
    from transferkit.pages import render_template
    from transferkit.runs import write_atomically

    groups = defaultdict(list)
    for finding in report.findings:
        groups[finding.kind].append(finding)
    shown = [f for findings in groups.values() for f in findings[:limit]]
    thumbnails = {p: _thumbnail(p) for p in {f.path for f in shown} | {f.other for f in shown if f.other}
                  if Path(p).is_file()}
    page = render_template("doctor.html", report=report, groups=list(groups.items()), titles=TITLES,
                           thumbnails=thumbnails, limit=limit)
    path = Path(path)
    write_atomically(path, lambda temporary: temporary.write_text(page, encoding="utf-8"))
    return path
