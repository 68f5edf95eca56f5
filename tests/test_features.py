"""The fast extractor's numerics and the feature cache: reuse, invalidation, interruption, concurrency."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image_folder
from transferkit.backbone import open_backbone
from transferkit.features import Extractor, FeatureCache, extract_features, make_preparer


@pytest.fixture(scope="module")
def backbone():
    return open_backbone()


def _paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.jpg"))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_fast_path_agrees_with_fp32_reference(backbone, image_folder):
    prepare = make_preparer(backbone)
    images = torch.stack([prepare(p).tensor for p in _paths(image_folder)[:8]])
    with torch.inference_mode():
        reference = backbone.features(images).numpy()  # plain NCHW fp32
    fast = Extractor(backbone)
    assert _cosine(fast.features(images), reference).min() >= (0.995 if fast.precision == "bf16" else 0.99999)
    assert _cosine(Extractor(backbone, precision="fp32").features(images), reference).min() >= 0.99999


def test_second_extraction_reads_only_the_cache(backbone, image_folder, cache_dir):
    paths = _paths(image_folder)
    extractor = Extractor(backbone)
    first = extract_features(extractor, paths, FeatureCache(cache_dir), batch_size=8)
    assert (first.computed, first.from_cache) == (len(paths), 0)
    again = extract_features(Extractor(open_backbone()), paths, FeatureCache(cache_dir), batch_size=8)
    assert (again.computed, again.from_cache) == (0, len(paths))
    np.testing.assert_array_equal(again.features, first.features)
    assert len(list((cache_dir).glob("*/*.f32"))) == 1  # a few arrays, not one file per image


def test_changed_file_is_recomputed_and_new_preprocessing_is_a_new_space(backbone, image_folder, cache_dir):
    paths = _paths(image_folder)
    extract_features(Extractor(backbone), paths, FeatureCache(cache_dir))
    time.sleep(0.01)
    paths[0].write_bytes(paths[-1].read_bytes())
    changed = extract_features(Extractor(backbone), paths, FeatureCache(cache_dir))
    assert changed.computed == 0  # its new content is already cached under the other file's digest
    np.testing.assert_array_equal(changed.features[0], changed.features[-1])
    other_size = extract_features(Extractor(open_backbone(image_size=160)), paths[:3], FeatureCache(cache_dir))
    assert other_size.computed == 3


def test_bad_files_are_skipped_not_fatal(backbone, image_folder, cache_dir):
    paths = _paths(image_folder)[:4]
    bad = image_folder / "circles" / "broken.jpg"
    bad.write_bytes(paths[0].read_bytes()[:300])
    result = extract_features(Extractor(backbone), paths + [bad, image_folder / "gone.jpg"], FeatureCache(cache_dir))
    assert result.kept.tolist() == [0, 1, 2, 3]
    assert {Path(s.path).name: s.reason.split(":")[0] for s in result.skipped} == {
        "broken.jpg": "corrupt or truncated image", "gone.jpg": "file not found"}


def test_unusable_cache_folder_warns_and_continues(backbone, image_folder, tmp_path):
    from transferkit.features import open_cache

    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="continuing without a cache"):
        cache = open_cache(blocker / "cache", True)
    assert cache is None
    assert extract_features(Extractor(backbone), _paths(image_folder)[:2], cache).features.shape[0] == 2


_EXTRACT_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from transferkit.backbone import open_backbone
    from transferkit.features import Extractor, FeatureCache, extract_features
    paths = sorted(Path(sys.argv[1]).glob("*/*.jpg"))
    result = extract_features(Extractor(open_backbone()), paths, FeatureCache(sys.argv[2]), batch_size=4,
                              progress=False)
    print(result.computed, result.from_cache)
""")


def _indexed_rows(cache_dir: Path) -> int:
    try:
        with sqlite3.connect(cache_dir / "index.sqlite", timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_kill_9_mid_extraction_loses_at_most_a_batch(tmp_path, cache_dir):
    folder = make_image_folder(tmp_path / "many", per_class=30, seed=5)
    paths = _paths(folder)
    process = subprocess.Popen([sys.executable, "-c", _EXTRACT_SCRIPT, str(folder), str(cache_dir)])
    deadline = time.monotonic() + 240
    while _indexed_rows(cache_dir) < 8 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = _indexed_rows(cache_dir)
    assert 8 <= done < len(paths), "the kill should land mid-extraction"

    resumed = extract_features(Extractor(open_backbone()), paths, FeatureCache(cache_dir), batch_size=4)
    assert resumed.from_cache == done and resumed.computed == len(paths) - done
    reference = extract_features(Extractor(open_backbone()), paths, None, batch_size=4)
    assert _cosine(resumed.features, reference.features).min() > 0.9999
    final = extract_features(Extractor(open_backbone()), paths, FeatureCache(cache_dir))
    assert final.computed == 0


def test_two_runs_sharing_a_cache_never_corrupt_it(tmp_path, cache_dir):
    folder = make_image_folder(tmp_path / "shared", per_class=10, seed=7)
    runs = [subprocess.Popen([sys.executable, "-c", _EXTRACT_SCRIPT, str(folder), str(cache_dir)],
                             stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    paths = _paths(folder)
    final = extract_features(Extractor(open_backbone()), paths, FeatureCache(cache_dir))
    assert final.computed == 0
    reference = extract_features(Extractor(open_backbone()), paths, None)
    assert _cosine(final.features, reference.features).min() > 0.9999
