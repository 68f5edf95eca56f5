"""The golden image and how its golden values were made: `python tests/golden.py` rewrites golden_features.json.

The values come from the plain path a user of timm would write, not from transferkit's fast path: timm's own float
transform (resize, centre crop, normalise) on the PIL image, the embedded EfficientNet-Lite weights in timm's model,
fp32 PyTorch. tests/test_golden.py checks that transferkit's uint8 pixels and every engine reproduce them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GOLDEN_FILE = Path(__file__).with_name("golden_features.json")


def golden_image() -> Image.Image:
    """A 320 x 240 scene drawn from fixed numbers: colours in every channel, edges, stripes, a gradient."""
    y, x = np.mgrid[0:240, 0:320]
    background = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], -1).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse([30, 40, 150, 200], fill=(230, 40, 30))
    draw.rectangle([170, 30, 290, 110], fill=(20, 60, 220))
    for left in range(170, 300, 16):
        draw.rectangle([left, 130, left + 7, 220], fill=(250, 230, 40))
    draw.polygon([(60, 230), (110, 150), (160, 230)], fill=(30, 160, 60))
    return image


def reference_values(name: str) -> dict:
    import torch

    from transferkit.backbone import open_backbone

    backbone = open_backbone(name)
    pixels = backbone.preprocessing.transform()(golden_image())[None]
    with torch.inference_mode():
        model = backbone.model.float().eval()
        features = model.forward_head(model.forward_features(pixels), pre_logits=True)[0]
        logits = model.forward_head(model.forward_features(pixels))[0]
    return {"features": [round(float(v), 5) for v in features],
            "top5": logits.topk(5).indices.tolist()}


if __name__ == "__main__":
    from transferkit.backbone import EMBEDDED_BACKBONES

    values = {name: reference_values(name) for name in EMBEDDED_BACKBONES}
    GOLDEN_FILE.write_text(json.dumps(values, separators=(",", ":")) + "\n")
    print(f"wrote {GOLDEN_FILE}")
