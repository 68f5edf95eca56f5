"""Every block's pooled features (`blocks`), the L-BFGS probe that chooses between them and the last block's alone,
and runs written before blocks existed (pre-logits features) that must keep loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image, ImageDraw

import transferkit
from transferkit.backbone import open_backbone
from transferkit.features import Extractor, extract_features
from transferkit.head import FitOptions, HeadSpec, fit_head, fit_linear_lbfgs

QUICK = dict(image_size=96, workers=2, report=False, doctor=False, progress=False)


def fine_stripes(rng: np.random.Generator, period: int, size: int = 64) -> Image.Image:
    """Lines `period` px apart in a random colour on another, turned by a random angle: stripes 4 and 5 px apart
    differ in detail that early blocks keep and the final features blur."""
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    for x in range(int(rng.integers(period)), size, period):
        draw.line([(x, 0), (x, size)], fill=colour, width=1)
    return image.rotate(float(rng.uniform(0, 180)), resample=Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    root = tmp_path_factory.mktemp("stripes")
    for split, seed in (("train", 0), ("val", 1)):
        rng = np.random.default_rng(seed)
        for i in range(80):
            period = (4, 5)[i % 2]
            folder = root / "data" / split / f"every-{period}-px"
            folder.mkdir(parents=True, exist_ok=True)
            fine_stripes(rng, period).save(folder / f"{i:03d}.png")
    return root


def test_every_blocks_features_beat_the_last_blocks_where_the_detail_is_fine(stripes):
    result = transferkit.train(stripes / "data", out=stripes / "run", cache_dir=str(stripes / "cache"), **QUICK)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["backbone"]["features"] == "blocks" and config["probe_fit"]["features"] == "blocks"
    assert result.val_accuracy >= 0.88
    # the same probe on the last block's features alone (the classic bottleneck) falls well short
    backbone = open_backbone(image_size=96)
    splits = {}
    for split in ("train", "val"):
        paths = sorted((stripes / "data" / split).glob("*/*.png"))
        found = extract_features(Extractor(backbone, "cpu", "fp32", "torch"), paths, progress=False)
        splits[split] = found.features[:, -backbone.block_widths[-1]:], np.array(["5" in p.parent.name for p in paths])
    last = fit_linear_lbfgs(HeadSpec("linear", splits["train"][0].shape[1], 2), *splits["train"], *splits["val"],
                            FitOptions(optimizer="lbfgs"))
    assert last.history[last.best_epoch - 1]["val_accuracy"] <= result.val_accuracy - 0.08


def _probe_features(count: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Features whose first 5 columns are noise and last 3 ("the last block") carry the class, and the reverse for a
    second set: the probe must find which part to weigh."""
    rng = np.random.default_rng(seed)
    y = np.arange(count) % 2
    signal = y[:, None] * 2.0 - 1.0 + rng.normal(0, 0.3, (count, 3))
    return np.concatenate([rng.normal(0, 1, (count, 5)), signal], 1).astype(np.float32), y, 3


def test_lbfgs_picks_features_and_weight_decay_on_validation():
    x, y, last = _probe_features()
    vx, vy, _ = _probe_features(seed=1)
    fit = fit_head(HeadSpec("linear", 8, 2), x, y, vx, vy, FitOptions(optimizer="lbfgs"), last_block=last)
    assert [row["features"] for row in fit.history].count("last") == len(fit.history) // 2 > 1
    assert fit.chosen["features"] == "last" and fit.history[fit.best_epoch - 1]["features"] == "last"
    weights = fit.head[-1].weight.detach()
    assert torch.all(weights[:, :5] == 0) and torch.all(weights[:, 5:].abs() > 0)  # unused features weigh nothing
    # the kept fit is the best by validation accuracy, then loss
    best = min(fit.history, key=lambda row: (-row["val_accuracy"], row["val_loss"]))
    assert fit.history[fit.best_epoch - 1] is best
    # a given weight decay is used as it is; without validation images, every block at the default decay
    fixed = fit_head(HeadSpec("linear", 8, 2), x, y, vx, vy, FitOptions(optimizer="lbfgs", weight_decay=0.5),
                     last_block=last)
    assert {row["weight_decay"] for row in fixed.history} == {0.5}
    blind = fit_head(HeadSpec("linear", 8, 2), x, y, None, None, FitOptions(optimizer="lbfgs"), last_block=last)
    assert blind.chosen == {"features": "blocks", "weight_decay": 1e-4} and len(blind.history) == 1
    # a stronger decay gives smaller weights
    strong = fit_head(HeadSpec("linear", 8, 2), x, y, vx, vy, FitOptions(optimizer="lbfgs", weight_decay=5.0),
                      last_block=last)
    assert strong.head[-1].weight.norm() < 0.5 * fixed.head[-1].weight.norm()


def test_loop_options_on_an_lbfgs_probe_are_one_line_errors(tmp_path):
    for options, name in ((dict(lr=0.01), "lr (--lr)"), (dict(schedule="cosine"), "schedule (--schedule)")):
        with pytest.raises(transferkit.DataError, match=rf"{name.replace('(', '[(]').replace(')', '[)]')} tunes"):
            transferkit.train(tmp_path, **options)
    with pytest.raises(transferkit.DataError, match="lbfgs fits a linear probe"):
        transferkit.train(tmp_path, optimizer="lbfgs", head="mlp")
    with pytest.raises(transferkit.DataError, match="lbfgs fits a linear probe"):
        transferkit.train(tmp_path, optimizer="lbfgs", mode="finetune")


def test_a_run_written_before_blocks_features_keeps_loading(split_folder, tmp_path, cache_dir):
    """A run of the previous version: pre-logits features (no `features` in its config), a head on 1280 of them."""
    run = transferkit.train(split_folder, out=tmp_path / "run", cache_dir=str(cache_dir), **QUICK).run_dir
    config = json.loads((run / "config.json").read_text())
    del config["backbone"]["features"], config["probe_fit"]
    old = open_backbone(image_size=96, features="pre-logits")
    classes = config["labels"]
    paths = sorted((split_folder / "train").glob("*/*.jpg"))
    found = extract_features(Extractor(old, "cpu", "fp32", "torch"), paths, progress=False)
    targets = np.array([classes.index(p.parent.name) for p in paths])
    head = fit_head(HeadSpec("linear", 1280, len(classes)), found.features, targets,
                    options=FitOptions(optimizer="lbfgs")).head
    config["head"]["in_features"] = 1280
    (run / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_file({f"head.{k}": v.contiguous() for k, v in head.state_dict().items()},
                                str(run / "model.safetensors"))
    classifier = transferkit.Classifier.load(run, cache_dir=str(cache_dir))
    assert classifier.backbone.feature_kind == "pre-logits"
    val = sorted((split_folder / "val").glob("*/*.jpg"))
    predictions = classifier.predict(val)
    assert np.mean([p.label == path.parent.name for p, path in zip(predictions, val)]) >= 0.9
    # its features live in their own cache space (format 2), never read as blocks features or the reverse
    assert Extractor(old).cache_key != Extractor(open_backbone(image_size=96)).cache_key
    report = transferkit.evaluate(run, split_folder / "val", cache_dir=str(cache_dir))
    assert report.metrics["accuracy"] >= 0.9
