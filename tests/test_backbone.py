"""Embedded backbones, timm names, weights from disk, and clear errors when a backbone cannot be had."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from transferkit import predict_imagenet
from transferkit.backbone import block_widths, EMBEDDED_BACKBONES, _embedded_file, open_backbone, read_state_dict
from transferkit.errors import BackboneError


@pytest.mark.parametrize("name", list(EMBEDDED_BACKBONES))
def test_embedded_preprocessing_matches_timm_pretrained_cfg(name):
    embedded = EMBEDDED_BACKBONES[name]
    cfg = timm.get_pretrained_cfg(embedded.architecture)
    pre = embedded.preprocessing
    assert (pre.interpolation, pre.mean, pre.std, pre.crop_pct) == (cfg.interpolation, cfg.mean, cfg.std, cfg.crop_pct)
    assert pre.input_size[0] > cfg.input_size[1]  # features at the larger test resolution


@pytest.mark.parametrize("name", list(EMBEDDED_BACKBONES))
def test_embedded_weights_load_offline(name):
    backbone = open_backbone(name)
    model = backbone.model
    assert model.num_classes == 1000 and not any(p.requires_grad for p in model.parameters())
    package = read_state_dict(_embedded_file(EMBEDDED_BACKBONES[name]))
    first_conv = next(v for k, v in package.items() if v.ndim == 4)  # the stem, in the package's own key order
    assert torch.equal(model.conv_stem.weight, first_conv)
    assert backbone.features(torch.zeros(1, 3, 64, 64)).shape[1] == backbone.feature_width
    assert tuple(block_widths(model)) == EMBEDDED_BACKBONES[name].block_widths  # known without building the model
    assert open_backbone(name, features="pre-logits").features(torch.zeros(1, 3, 64, 64)).shape[1] == \
        model.num_features


def test_timm_alias_maps_to_embedded_weights():
    assert open_backbone("tf_efficientnet_lite0").weights_id == open_backbone().weights_id


@pytest.mark.slow
def test_embedded_lite0_reproduces_imagenet_predictions(hymenoptera):
    ants = sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[:10]
    bees = sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:10]
    predictions = predict_imagenet(ants + bees)
    hits = sum(310 in p.ids for p in predictions[:10]) + sum(309 in p.ids for p in predictions[10:])  # ant, bee
    assert hits >= 16, [p.labels[:3] for p in predictions]


def test_weights_file_restores_the_same_backbone(tmp_path):
    embedded = open_backbone()
    state = embedded.model.state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    image = torch.rand(2, 3, 96, 96)
    reference = embedded.features(image)
    for file in ("w.safetensors", "w.pth"):
        restored = open_backbone("tf_efficientnet_lite0", weights=tmp_path / file)
        assert restored.weights_id.startswith("sha256:")
        torch.testing.assert_close(restored.features(image), reference)
    assert set(read_state_dict(tmp_path / "w.pth")) == set(state)


def test_weights_for_another_architecture_are_refused(tmp_path):
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    backbone = open_backbone("efficientnet_lite0", weights=tmp_path / "r18.pth")
    with pytest.raises(BackboneError, match="do not fit"):
        backbone.model
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read weights file"):
        open_backbone("efficientnet_lite0", weights=tmp_path / "junk.pth").model


def test_unknown_backbone_suggests_names():
    with pytest.raises(BackboneError, match="Did you mean efficientnet_lite0"):
        open_backbone("efficientnet_lit0")


@pytest.mark.slow
def test_offline_download_fails_with_one_clear_line(tmp_path):
    """With the hub unreachable, a timm name gives a one-line error listing the embedded backbones."""
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), "red").save(image)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "transferkit", "predict", "--imagenet", "--backbone",
                             "resnet18", str(image)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "could not fetch pretrained weights for 'resnet18'" in result.stderr
    assert "efficientnet_lite0" in result.stderr and "Traceback" not in result.stderr
