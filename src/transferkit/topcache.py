"""Fine-tuning the top of the backbone on cached activations of its frozen bottom (`--cache-bottom`).

When only the top blocks learn, the frozen bottom computes the same activations for the same input in every epoch.
So, as AutoFreeze does (Liu et al. 2021), the bottom runs once per augmented view of each training image and its
output is kept (fp16, memory-mapped, in the feature cache); every epoch then trains the top blocks and the head on one
of those views (flipped at random: a flip of the activation map stands in for a flip of the image), with no decoding,
augmentation or bottom forward pass in the step. Validation is scored on cached activations of the evaluation crops.

Measured here (lite0, 2 cores, fp32, batch 32, forward + backward of what trains): at 224 px the whole network 15.5
img/s, the top 6 blocks on cached activations 114 img/s (7.4x); at 128 px 43.7 against 247 (5.6x). Caching costs one
bottom pass per view (~110 img/s with decoding and augmentation at 224 px).

Interrupted caching resumes where it stopped: each view is written a batch at a time, and the rows written so far
are recorded after each batch is on disk. A disk without room for the views that are wanted gets fewer views, or
none (a warning; training then runs on images as without the option).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferkit.augment import AugmentedImages, Unreadable, decode_size, mix_seed, train_transform
from transferkit.backbone import Backbone, PixelFeatures, block_units, unit_pool
from transferkit.data import Preprocessing, iter_prepared, make_preparer
from transferkit.errors import DataError
from transferkit.multilabel import target_of
from transferkit.progress import progress_bar

log = logging.getLogger("transferkit")

CACHE_FORMAT = 1
MAX_VIEWS = 4  # augmented views cached per image; epochs beyond them reuse them, flipped at random
MAX_CACHE_BYTES = 8 << 30  # activations one run may keep (at most this, and at most half the free disk)
DISK_SHARE = 0.5
_BATCH = 32


def first_trained_unit(model: nn.Module, trainable: set[str]) -> int:
    """The first of `block_units` with a parameter that trains: the bottom before it can be cached."""
    units = _unit_modules(model)
    for index, modules in enumerate(units):
        if any(f"{prefix}.{name}" in trainable for prefix in modules
               for name, _ in model.get_submodule(prefix).named_parameters()):
            return index
    raise DataError("--cache-bottom needs something to train: give --unfreeze top-blocks:N.")


def _unit_modules(model: nn.Module) -> list[list[str]]:
    """The module names each of `block_units` runs, in order."""
    blocks = [[f"blocks.{i}.{j}"] for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    return [["conv_stem", "bn1"], *blocks, ["conv_head", "bn2"]]


class Bottom(nn.Module):
    """uint8 NHWC pixels -> (the activation entering unit `first`, the pooled features of the units before it), for
    the backbone `features` runs."""

    def __init__(self, features: PixelFeatures, first: int):
        super().__init__()
        self.features, self.first = features, first

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features.normalize(pixels)
        pooled = []
        for unit in block_units(self.features.model)[:self.first]:
            x = unit(x)
            pooled.append(unit_pool(x))
        return x, torch.cat(pooled, dim=1)


def top_forward(model: nn.Module, first: int, activation: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """`blocks` features from the bottom's output: the units from `first` on, their pooled outputs after the
    bottom's."""
    parts, x = [pooled], activation
    for unit in block_units(model)[first:]:
        x = unit(x)
        parts.append(unit_pool(x))
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------- the cache


@dataclass
class CachedSet:
    """Activations (N, C, H, W) fp16 and the bottom's pooled features (N, D) of N images; `valid[i]` False where image
    i could not be read."""

    activations: np.ndarray
    pooled: np.ndarray
    valid: np.ndarray


class _Writer:
    """One cached set: two memory-mapped files written a batch at a time, with the rows done recorded after each."""

    def __init__(self, folder: Path, name: str, count: int, activation_shape: tuple, pooled_width: int):
        self.folder, self.name, self.count = folder, name, count
        self.activation_shape, self.pooled_width = tuple(activation_shape), pooled_width
        self.state_path = folder / f"{name}.json"
        state = _read_json(self.state_path) or {"rows": 0, "invalid": []}
        self.rows, self.invalid = state["rows"], set(state["invalid"])

    @property
    def done(self) -> bool:
        return self.rows >= self.count

    def _arrays(self, mode: str) -> tuple[np.memmap, np.memmap]:
        return (np.memmap(self.folder / f"{self.name}.f16", np.float16, mode,
                          shape=(self.count, *self.activation_shape)),
                np.memmap(self.folder / f"{self.name}.pooled.f32", np.float32, mode,
                          shape=(self.count, self.pooled_width)))

    def write(self, bottom: Bottom, batches, total: int, desc: str, progress: bool | None) -> None:
        """`batches` yields (first row, pixels or None for each row) from the rows not yet done."""
        activations, pooled = self._arrays("r+" if (self.folder / f"{self.name}.f16").exists() else "w+")
        bar = progress_bar(total, desc, "img", progress)
        bar.update(self.rows)
        try:
            for start, items in batches:
                good = [i for i, pixels in enumerate(items) if pixels is not None]
                if good:
                    with torch.inference_mode():
                        act, taps = bottom(torch.from_numpy(np.stack([items[i] for i in good])))
                    rows = [start + i for i in good]
                    activations[rows] = act.numpy().astype(np.float16)
                    pooled[rows] = taps.numpy()
                self.invalid |= {start + i for i, pixels in enumerate(items) if pixels is None}
                activations.flush()
                pooled.flush()
                self.rows = start + len(items)
                _write_json(self.state_path, {"rows": self.rows, "invalid": sorted(self.invalid)})
                bar.update(len(items))
        finally:
            bar.close()
            del activations, pooled

    def read(self) -> CachedSet:
        activations, pooled = self._arrays("r")
        valid = np.ones(self.count, dtype=bool)
        valid[sorted(self.invalid)] = False
        return CachedSet(activations, pooled, valid)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value), encoding="utf-8")
    os.replace(temporary, path)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _file_identity(paths: Sequence[Path]) -> list:
    identity = []
    for path in paths:
        try:
            status = os.stat(path)
            identity.append((str(Path(path).absolute()), status.st_size, status.st_mtime_ns))
        except OSError:
            identity.append((str(path), None, None))
    return identity


@dataclass
class BottomCache:
    """Cached activations of one frozen bottom for the training views and the evaluation crops of a run's images."""

    root: Path
    bottom: Bottom
    views: list[CachedSet]
    evaluation: dict[str, CachedSet]
    bytes: int


def plan_views(wanted: int, per_view: int, root: Path) -> int:
    """How many views of `per_view` bytes fit: at most `wanted`, MAX_CACHE_BYTES and DISK_SHARE of the free disk."""
    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        free = 0
    room = min(MAX_CACHE_BYTES, int(free * DISK_SHARE))
    return max(0, min(wanted, room // max(1, per_view)))


def cache_bottom(model: nn.Module, backbone: Backbone, first: int, train_paths: Sequence[Path],
                 train_targets: np.ndarray, evaluation: dict[str, Sequence[Path]], views: int, augment: str,
                 seed: int, cache_dir: Path, max_pixels: int, workers: int,
                 progress: bool | None = None) -> BottomCache | None:
    """Activations of `model`'s frozen bottom (the units before `first`) for `views` augmented views of the training
    images (at the backbone's training size) and for the evaluation crops of each split in `evaluation` (at its
    evaluation size), cached under `cache_dir`/activations. None, with a warning, when not even one view fits."""
    train_pre = Preprocessing(**{**backbone.preprocessing.to_dict(),
                                 "input_size": (backbone.train_size, backbone.train_size)})
    bottom = Bottom(PixelFeatures(model, backbone.preprocessing), first).eval()
    with torch.inference_mode():
        act, taps = bottom(torch.zeros(1, backbone.train_size, backbone.train_size, 3, dtype=torch.uint8))
    shape, width = tuple(act.shape[1:]), taps.shape[1]
    per_view = len(train_paths) * (int(np.prod(shape)) * 2 + width * 4)
    folder = Path(cache_dir) / "activations"
    fitting = plan_views(views, per_view, folder)
    if fitting < views:
        needed = views * per_view
        if fitting == 0:
            log.warning("--cache-bottom: %d view(s) of %d images need %.1f GB and %s has room for none of them; "
                        "training on images instead", views, len(train_paths), needed / 1e9, folder)
            return None
        log.warning("--cache-bottom: room for %d of %d views (%.1f GB each) in %s; epochs reuse them", fitting, views,
                    per_view / 1e9, folder)
    model_key = {"format": CACHE_FORMAT, "architecture": backbone.architecture, "weights_id": backbone.weights_id,
                 "first": first, "features": backbone.feature_kind}
    train_key = _key(model_key, train_pre.to_dict(), augment, seed, _file_identity(train_paths))
    train_folder = folder / train_key
    train_folder.mkdir(parents=True, exist_ok=True)
    transform = train_transform(augment, backbone.train_size, backbone.preprocessing)
    dataset = AugmentedImages(train_paths, train_targets, transform, decode_size(augment, backbone.train_size),
                              max_pixels, seed)
    cached_views = []
    for view in range(fitting):
        writer = _Writer(train_folder, f"view-{view}", len(train_paths), shape, width)
        if not writer.done:
            writer.write(bottom, _augmented_batches(dataset, view, writer.rows, workers), len(train_paths),
                         f"Caching view {view + 1}/{fitting} of the bottom", progress)
        cached_views.append(writer.read())
    cached_eval = {}
    for split, paths in evaluation.items():
        if not len(paths):
            continue
        eval_folder = folder / _key(model_key, backbone.preprocessing.to_dict(), _file_identity(paths))
        eval_folder.mkdir(parents=True, exist_ok=True)
        with torch.inference_mode():
            eval_shape = tuple(bottom(torch.zeros(1, *backbone.preprocessing.input_size, 3,
                                                  dtype=torch.uint8))[0].shape[1:])
        writer = _Writer(eval_folder, "crops", len(paths), eval_shape, width)
        if not writer.done:
            writer.write(bottom, _crop_batches(paths, backbone.preprocessing, writer.rows, workers, max_pixels),
                         len(paths), f"Caching the bottom for {split}", progress)
        cached_eval[split] = writer.read()
    size = sum(f.stat().st_size for f in train_folder.iterdir() if f.suffix in (".f16", ".f32"))
    log.info("--cache-bottom: %d view(s) of %d training images, %.2f GB in %s", fitting, len(train_paths), size / 1e9,
             train_folder)
    return BottomCache(folder, bottom, cached_views, cached_eval, size)


def _augmented_batches(dataset: AugmentedImages, view: int, start: int, workers: int):
    """(first row, pixels or None) a batch at a time from row `start`: view `view` is epoch view + 1 of the
    augmentation, decoded and augmented in worker processes."""
    indices = list(range(start, len(dataset)))
    loader = DataLoader(dataset, batch_size=_BATCH, sampler=[(view + 1, i) for i in indices], num_workers=workers,
                        collate_fn=lambda items: items)
    for batch_number, items in enumerate(loader):
        yield start + batch_number * _BATCH, [None if isinstance(item, Unreadable) else item[0].numpy()
                                               for item in items]


def _crop_batches(paths: Sequence[Path], preprocessing: Preprocessing, start: int, workers: int, max_pixels: int):
    prepare = make_preparer(preprocessing, max_pixels)
    for batch in iter_prepared(list(paths)[start:], prepare, _BATCH, workers):
        yield start + batch[0][0], [prepared.pixels for _, prepared in batch]


# ---------------------------------------------------------------------------------------------- training on it


class CachedViews(Dataset):
    """(epoch, index) -> ((activation, pooled), target) from view (epoch - 1) mod views, flipped left-right at random
    (seeded by seed, epoch and image, as the image modes' augmentation is)."""

    def __init__(self, views: list[CachedSet], targets: np.ndarray, seed: int):
        self.views, self.targets, self.seed = views, np.asarray(targets), seed

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        view = self.views[(epoch - 1) % len(self.views)]
        if not view.valid[index]:
            return Unreadable(index, "could not be read when its activations were cached")
        activation = torch.from_numpy(np.asarray(view.activations[index], dtype=np.float32))
        if np.random.default_rng(mix_seed(self.seed, epoch, index, 4)).random() < 0.5:
            activation = activation.flip(-1)
        return (activation, torch.from_numpy(np.array(view.pooled[index]))), target_of(self.targets, index)


def evaluate_cached(net: nn.Module, cached: CachedSet, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities of the readable images of a cached set: (probabilities, their indices)."""
    net.eval()
    kept = np.flatnonzero(cached.valid)
    probabilities = []
    with torch.inference_mode():
        for start in range(0, len(kept), batch_size):
            rows = kept[start:start + batch_size]
            activation = torch.from_numpy(np.asarray(cached.activations[rows], dtype=np.float32))
            logits = net(activation.contiguous(memory_format=torch.channels_last),
                         torch.from_numpy(np.asarray(cached.pooled[rows])))
            probabilities.append(torch.softmax(logits.float(), dim=1).numpy())
    classes = net.head[-1].out_features
    return (np.concatenate(probabilities) if probabilities else np.empty((0, classes), np.float32)), kept
