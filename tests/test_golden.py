"""The right network sees the right pixels, for every embedded backbone: golden values made by timm's plain float
path (tests/golden.py) reproduced by transferkit's uint8 pixels on each engine, and pretrained features that tell
shapes apart where random weights cannot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from golden import GOLDEN_FILE, golden_image
from transferkit.backbone import DEFAULT_BACKBONE, EMBEDDED_BACKBONES, open_backbone
from transferkit.features import Extractor
from transferkit.onnx_engine import cosine_rows

# (engine, precision, lowest cosine with the golden features). The fp32 engines differ from timm's float path only
# by transferkit's uint8 pixels (at most a few grey levels); bf16 rounds every activation.
ENGINES = [("torch", "fp32", 0.9999), ("torch", "bf16", 0.98)]


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN_FILE.read_text())


@pytest.mark.parametrize("name", list(EMBEDDED_BACKBONES))
def test_every_engine_reproduces_the_golden_features(name, golden):
    backbone = open_backbone(name, features="pre-logits")
    expected = np.array(golden[name]["features"], dtype=np.float32)[None]
    pixels = backbone.preprocessing.pixels(golden_image())[None]
    blocks = Extractor(open_backbone(name), "cpu", "fp32", "torch").features(pixels)
    last = blocks[:, -EMBEDDED_BACKBONES[name].block_widths[-1]:]  # the blocks' last part: the same at unit length
    assert cosine_rows(last, expected)[0] >= 0.9999 and np.linalg.norm(last) == pytest.approx(1.0, abs=1e-5)
    engines = ENGINES + ([("onnxruntime", "auto", 0.9999)] if name == DEFAULT_BACKBONE else [])
    for engine, precision, floor in engines:
        features = Extractor(backbone, "cpu", precision, engine).features(pixels)
        assert cosine_rows(features, expected)[0] >= floor, (engine, precision)
        assert np.linalg.norm(features) == pytest.approx(np.linalg.norm(expected), rel=0.03), (engine, precision)
    with torch.inference_mode():
        top5 = backbone.pixel_model().logits(torch.from_numpy(pixels))[0].topk(5).indices.tolist()
    assert top5[0] == golden[name]["top5"][0] and len(set(top5) & set(golden[name]["top5"])) >= 4


def _shape_images(count: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """One colour on one grey: the classes differ only by outline (disc, square, triangle), at any place and size."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(count):
        label = i % 3
        image = Image.new("RGB", (96, 96), (120, 120, 120))
        draw = ImageDraw.Draw(image)
        size = int(rng.integers(28, 60))
        x, y = (int(v) for v in rng.integers(4, 92 - size, 2))
        box = [x, y, x + size, y + size]
        if label == 0:
            draw.ellipse(box, fill=(200, 200, 200))
        elif label == 1:
            draw.rectangle(box, fill=(200, 200, 200))
        else:
            draw.polygon([(x, y + size), (x + size // 2, y), (x + size, y + size)], fill=(200, 200, 200))
        images.append(image)
        labels.append(label)
    return images, labels


def _probe_accuracy(backbone) -> float:
    extractor = Extractor(backbone, "cpu", "fp32", "torch")
    splits = {}
    for split, (count, seed) in {"train": (60, 0), "val": (60, 1)}.items():
        images, labels = _shape_images(count, seed)
        pixels = np.stack([backbone.preprocessing.pixels(image) for image in images])
        splits[split] = extractor.features(pixels), np.array(labels)
    scaler = StandardScaler().fit(splits["train"][0])
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(splits["train"][0]), splits["train"][1])
    return probe.score(scaler.transform(splits["val"][0]), splits["val"][1])


def test_pretrained_features_know_shapes_that_random_ones_do_not():
    pretrained = _probe_accuracy(open_backbone(image_size=96))
    torch.manual_seed(0)
    random = _probe_accuracy(open_backbone(image_size=96, pretrained=False))
    assert pretrained >= 0.9 and pretrained - random >= 0.2, (pretrained, random)
