"""The regularisation of fine-tuning (`recipe`): mixup mixes what it says, the weight average is what is kept,
stochastic depth touches only the trained blocks and never predictions, and the options are checked and recorded."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import safetensors.torch
import torch

import transferkit
from transferkit.backbone import open_backbone
from transferkit.config import TrainConfig
from transferkit.finetune import parameter_groups
from transferkit.recipe import Recipe, WeightAverage, mix_batch, recipe_for, set_drop_path

FAST = dict(image_size=96, workers=2, batch_size=12)


def test_mixup_blends_each_row_with_its_partner_in_one_proportion():
    pixels = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    pooled = torch.randn(6, 5, dtype=torch.float16)
    (mixed_pixels, mixed_pooled), partner, weight = mix_batch([pixels, pooled], 0.4, np.random.default_rng(3))
    assert sorted(partner.tolist()) == list(range(6)) and (partner != torch.arange(6)).any() and 0 < weight < 1
    expected = weight * pixels.float() + (1 - weight) * pixels[partner].float()
    assert mixed_pixels.dtype == torch.uint8 and (mixed_pixels.float() - expected).abs().max() <= 0.5
    torch.testing.assert_close(mixed_pooled.float(), weight * pooled.float() + (1 - weight) * pooled[partner].float(),
                               rtol=1e-2, atol=1e-2)
    again = mix_batch([pixels, pooled], 0.4, np.random.default_rng(3))
    assert again[2] == weight and torch.equal(again[1], partner)  # a function of the seed: resumed epochs replay


def test_the_weight_average_follows_the_weights_at_its_decay():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(net, decay=0.9)
    start = net[0].weight.detach().clone()
    for step in range(1, 41):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        average.update(net)
        decay = min(0.9, (1 + step) / (10 + step))
        start = decay * start + (1 - decay) * net[0].weight.detach()
    torch.testing.assert_close(average.module[0].weight, start)
    assert average.module[1].num_batches_tracked == net[1].num_batches_tracked
    assert (average.module[0].weight < net[0].weight).all()  # lags the weights that keep moving


def test_stochastic_depth_reaches_only_the_trained_blocks_and_never_predictions():
    from timm.layers import DropPath

    backbone = open_backbone(image_size=96)
    from transferkit.finetune import Network
    from transferkit.head import HeadSpec

    net = Network(backbone.trainable_copy(), backbone, HeadSpec("linear", backbone.feature_width, 3).build())
    parameter_groups(net, "finetune", "top-blocks:3", 1e-3, 0.1)
    pixels = torch.randint(0, 256, (2, 96, 96, 3), dtype=torch.uint8)
    net.eval()
    with torch.no_grad():
        before = net(pixels)
    set_drop_path(net.backbone, 0.3)
    dropped = [m.drop_path for m in net.backbone.modules() if isinstance(getattr(m, "drop_path", None), DropPath)]
    trained = [m for m in net.backbone.modules()
               if hasattr(m, "drop_path") and any(p.requires_grad for p in m.parameters())]
    assert len(dropped) == len(trained) > 0
    rates = [d.drop_prob for d in dropped]
    assert rates == sorted(rates) and rates[-1] == pytest.approx(0.3)
    with torch.no_grad():
        torch.testing.assert_close(net(pixels), before)  # eval mode: an identity
    net.backbone.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(net(pixels), before, atol=1e-4)  # training mode: branches dropped


def test_the_recipe_is_chosen_by_size_and_options_take_its_place():
    config = TrainConfig(mode="finetune", ema=0.0).resolved()
    for images in (50, 500, 5000, 50000):
        chosen = config.recipe(images)
        assert chosen.ema == 0.0 and chosen.mixup == recipe_for(images).mixup
    assert TrainConfig(mode="finetune", mixup=0.3).resolved().recipe(100).mixup == 0.3
    with pytest.raises(transferkit.DataError, match="not the probe"):
        TrainConfig(mode="probe", mixup=0.2).resolved()
    with pytest.raises(transferkit.DataError, match="ema"):
        TrainConfig(mode="finetune", ema=1.5).resolved()
    assert "mixup 0.2" in Recipe(mixup=0.2).describe()


def test_a_run_keeps_the_weight_average_and_records_its_recipe(split_folder, tmp_path, cache_dir):
    """With an EMA the kept weights are the average, not the last step's: the same training (the average draws no
    random numbers) ends with other weights, close to the plain run's."""
    options = dict(mode="finetune", unfreeze="top-blocks:2", epochs=2, lr=3e-3, mixup=0.0, drop_path=0.0,
                   cache_dir=str(cache_dir), progress=False, **FAST)
    plain = transferkit.train(split_folder, out=tmp_path / "plain", ema=0.0, **options)
    averaged = transferkit.train(split_folder, out=tmp_path / "averaged", ema=0.999, **options)
    plain_head, averaged_head = (safetensors.torch.load_file(str(run.run_dir / "model.safetensors"))["head.1.weight"]
                                 for run in (plain, averaged))
    assert not torch.allclose(plain_head, averaged_head, atol=1e-4)
    assert torch.nn.functional.cosine_similarity(plain_head.flatten(), averaged_head.flatten(), dim=0) > 0.9
    assert averaged.val_accuracy >= 0.6
    recorded = json.loads((averaged.run_dir / "config.json").read_text())["recipe"]
    assert recorded == {"mixup": 0.0, "ema": 0.999, "drop_path": 0.0}


def test_a_mixup_step_is_scored_against_both_targets(split_folder):
    """The loss of a mixed batch is the blend of the losses against each row's own target and its partner's, in the
    proportion the pixels were mixed (checked on the logits the network gives the same mixed pixels)."""
    from transferkit.finetune import Batch, ImageTraining, Network, _Stage
    from transferkit.head import HeadSpec

    backbone = open_backbone(image_size=64)
    net = Network(backbone.trainable_copy(), backbone, HeadSpec("linear", backbone.feature_width, 3).build())
    options = TrainConfig(mode="finetune", unfreeze="top-blocks:1", epochs=1, lr=1e-3, batch_size=4, workers=0,
                          image_size=64).resolved()
    training = ImageTraining(net, "finetune", options, backbone, torch.device("cpu"), "fp32",
                             recipe=Recipe(mixup=0.4))
    paths = sorted(p for p in (split_folder / "train").rglob("*") if p.is_file())[:4]
    stage = _Stage(training, paths, np.array([0, 1, 2, 0]), "constant")
    stage.set_epoch(1)
    pixels = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    targets = torch.tensor([0, 1, 2, 0])
    (mixed,), partner, weight = mix_batch([pixels], 0.4, copy.deepcopy(stage.mixing))
    net.eval()  # no dropout; the step leaves the mode as it is
    with torch.no_grad():
        logits = net(mixed)
    cross_entropy = torch.nn.functional.cross_entropy
    expected = weight * cross_entropy(logits, targets) + (1 - weight) * cross_entropy(logits, targets[partner])
    loss, _ = stage.step(Batch(pixels, targets, []))
    assert loss == pytest.approx(expected.item(), rel=1e-4)
