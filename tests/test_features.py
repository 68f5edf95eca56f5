"""The fast extractor's numerics and the feature cache: reuse, invalidation, interruption, concurrency."""

from __future__ import annotations

import json
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

from PIL import Image

from conftest import draw_sample, make_image_folder
from transferkit import onnx_engine
from transferkit import features as features_module
from transferkit.backbone import Preprocessing, open_backbone
from transferkit.errors import BackboneError
from transferkit.onnx_engine import cosine_rows
from transferkit.data import make_preparer
from transferkit.features import Extractor, FeatureCache, extract_features


@pytest.fixture(scope="module")
def backbone():
    return open_backbone()


def _paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.jpg"))


def _reference_features(backbone, paths: list[Path]) -> np.ndarray:
    """The plain path a user would write: timm's float transform, NCHW fp32 PyTorch."""
    transform = backbone.preprocessing.transform()
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        return backbone.features(images).numpy()


@pytest.mark.parametrize("size", [(96, 96), (640, 480), (333, 501), (300, 40), (17, 23)])
def test_pixels_match_timms_transform(backbone, size):
    image = draw_sample("ellipse", (200, 30, 90), np.random.default_rng(sum(size)), size=max(size)).resize(size)
    ours = backbone.pixel_model().normalize(torch.from_numpy(backbone.preprocessing.pixels(image))[None])[0]
    timms = backbone.preprocessing.transform()(image)
    level = 2 / 255  # one grey level after normalising with mean = std = 0.5
    assert ours.shape == timms.shape
    assert (ours - timms).abs().mean() < 0.25 * level
    assert (ours - timms).abs().max() <= 4 * level + 1e-6


def test_pixels_follow_timm_when_squashing():
    """The other crop mode transferkit computes itself (non-square centre crops and 'border' run timm's own
    transform, so there is nothing of ours to compare)."""
    crop_mode, input_size = "squash", (64, 64)
    preprocessing = Preprocessing(input_size, "bilinear", (0.5,) * 3, (0.5,) * 3, 0.9, crop_mode)
    assert preprocessing.crop_box(150, 110) is not None  # our resize of the cropped region, not timm's fallback
    image = draw_sample("rectangle", (30, 200, 90), np.random.default_rng(3), size=150).resize((150, 110))
    ours = torch.from_numpy(preprocessing.pixels(image)).permute(2, 0, 1).float()
    timms = preprocessing.transform(normalize=False)(image).float()
    assert ours.shape == timms.shape == (3, *input_size)
    assert (ours - timms).abs().mean() < 0.25


def test_every_engine_agrees_with_the_fp32_reference(backbone, image_folder):
    paths = _paths(image_folder)[:8]
    prepare = make_preparer(backbone.preprocessing)
    pixels = np.stack([prepare(p).pixels for p in paths])
    reference = _reference_features(backbone, paths)
    for engine, precision, floor in [("torch", "fp32", 0.999), ("onnxruntime", "auto", 0.999),
                                     ("torch", "bf16", 0.99)]:
        extractor = Extractor(backbone, "cpu", precision, engine)
        assert cosine_rows(extractor.features(pixels), reference).min() >= floor, (engine, precision)
    onnx, torch_fp32 = Extractor(backbone, engine="onnxruntime"), Extractor(backbone, precision="fp32", engine="torch")
    assert onnx.cache_key == torch_fp32.cache_key  # exact engines share cached features
    assert onnx.features(pixels[:1]).shape == (1, backbone.feature_width)  # any batch size


@pytest.mark.slow
def test_auto_engine_exports_once_and_reuses_the_export(backbone, tmp_path, monkeypatch):
    calls = []
    real_export = onnx_engine.export_pixel_model
    monkeypatch.setattr(onnx_engine, "export_pixel_model", lambda *a: calls.append(1) or real_export(*a))
    pixels = backbone.preprocessing.pixels(draw_sample("ellipse", (1, 2, 3), np.random.default_rng(0)))[None]
    first = Extractor(backbone, "cpu", cache_dir=tmp_path)
    assert (first.engine, first.precision) == ("onnxruntime", "fp32")
    features = first.features(pixels)
    np.testing.assert_allclose(Extractor(backbone, "cpu", cache_dir=tmp_path).features(pixels), features,
                               rtol=1e-5, atol=1e-6)
    assert len(calls) == 1
    assert json.loads(next(tmp_path.glob("onnx/*/export.json")).read_text())["cosine"] >= onnx_engine.MIN_EXPORT_COSINE


def test_a_failed_export_falls_back_to_torch_and_is_remembered(backbone, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("unsupported operator\nlong trace")

    monkeypatch.setattr(onnx_engine, "export_pixel_model", broken)
    pixels = backbone.preprocessing.pixels(draw_sample("ellipse", (1, 2, 3), np.random.default_rng(0)))[None]
    extractor = Extractor(backbone, "cpu", cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="unsupported operator; using the torch engine"):
        features = extractor.features(pixels)
    assert (extractor.engine, extractor.precision) == ("torch", "fp32")  # same numerics, same cache space
    assert cosine_rows(features, Extractor(backbone, "cpu", "fp32", "torch").features(pixels)).min() > 0.99999
    assert Extractor(backbone, "cpu", cache_dir=tmp_path).engine == "torch"  # not tried again
    with pytest.raises(BackboneError, match="unsupported operator. Use --engine torch"):
        Extractor(backbone, "cpu", engine="onnxruntime", cache_dir=tmp_path).features(pixels)


def test_engine_choices_and_their_errors(backbone, monkeypatch):
    with pytest.raises(BackboneError, match="engine must be one of auto, torch, onnxruntime"):
        Extractor(backbone, engine="tensorrt")
    with pytest.raises(BackboneError, match="ONNX Runtime runs the backbone in fp32"):
        Extractor(backbone, precision="bf16", engine="onnxruntime")
    assert Extractor(backbone, "cpu", precision="bf16").engine == "torch"
    with pytest.raises(BackboneError, match="unknown device"):
        Extractor(backbone, device="tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="no CUDA GPU; use --device cpu"):
            Extractor(backbone, device="cuda")
    monkeypatch.setattr(features_module, "onnxruntime_installed", lambda: False)
    assert Extractor(backbone, "cpu").engine == "torch"
    with pytest.raises(BackboneError, match=r"pip install 'transferkit\[onnx\]'"):
        Extractor(backbone, engine="onnxruntime")


def test_second_extraction_reads_only_the_cache(backbone, image_folder, cache_dir):
    paths = _paths(image_folder)
    extractor = Extractor(backbone)
    first = extract_features(extractor, paths, FeatureCache(cache_dir), batch_size=8)
    assert (first.computed, first.from_cache) == (len(paths), 0)
    again = extract_features(Extractor(open_backbone()), paths, FeatureCache(cache_dir), batch_size=8)
    assert (again.computed, again.from_cache) == (0, len(paths))
    np.testing.assert_array_equal(again.features, first.features)
    assert len(list((cache_dir).glob("*/*.f32"))) == 1  # a few arrays, not one file per image


def test_copied_or_touched_files_need_no_backbone_work(backbone, image_folder, tmp_path, cache_dir):
    paths = _paths(image_folder)
    first = extract_features(Extractor(backbone), paths, FeatureCache(cache_dir))
    copies = []
    for path in paths:
        copies.append(tmp_path / "copies" / path.name)
        copies[-1].parent.mkdir(exist_ok=True)
        copies[-1].write_bytes(path.read_bytes())
    os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    again = extract_features(Extractor(backbone), copies + paths[:1], FeatureCache(cache_dir))
    assert (again.computed, again.from_cache) == (0, len(paths) + 1)
    np.testing.assert_array_equal(again.features[:len(paths)], first.features)


def test_changed_file_is_recomputed_and_new_preprocessing_is_a_new_space(backbone, image_folder, cache_dir):
    paths = _paths(image_folder)
    extract_features(Extractor(backbone), paths, FeatureCache(cache_dir))
    time.sleep(0.01)
    paths[0].write_bytes(paths[-1].read_bytes())
    changed = extract_features(Extractor(backbone), paths, FeatureCache(cache_dir))
    assert changed.computed == 0  # its new content is already cached under the other file's digest
    np.testing.assert_array_equal(changed.features[0], changed.features[-1])
    other_size = extract_features(Extractor(open_backbone(image_size=160), engine="torch"), paths[:3],
                                  FeatureCache(cache_dir))
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


@pytest.mark.slow
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
    assert cosine_rows(resumed.features, reference.features).min() > 0.9999
    final = extract_features(Extractor(open_backbone()), paths, FeatureCache(cache_dir))
    assert final.computed == 0


@pytest.mark.slow
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
    assert cosine_rows(final.features, reference.features).min() > 0.9999
