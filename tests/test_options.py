"""Each training option does what it says, observed in what training produces (test_cli_options.py checks that the
command line hands every option to `train`). Labels here are drawn at random, independently of the pictures, so
the head can only memorise: validation loss rises after the first epochs (early stopping has something to stop) and
the class prior is all there is to learn on an imbalanced split (balancing has something to change)."""

from __future__ import annotations

import dataclasses
import importlib
import math

import numpy as np
import pytest
import safetensors.torch
import torch

import transferkit
from conftest import CLASS_STYLES, draw_sample, make_image_folder
from transferkit.backbone import open_backbone
from transferkit.config import TrainConfig
from transferkit.features import Extractor, extract_features
from transferkit.head import FitOptions, FitResult, HeadSpec, fit_head

FINETUNE = importlib.import_module("transferkit.finetune")
QUICK = dict(image_size=64, workers=2, engine="torch", report=False, doctor=False, progress=False)


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """train: 30 'a' and 10 'b'; val: 10 of each; every picture a random shape in a random colour."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(11)
    styles = [style for style, _ in CLASS_STYLES.values()]
    for split, counts in {"train": {"a": 30, "b": 10}, "val": {"a": 10, "b": 10}}.items():
        for label, count in counts.items():
            (root / "data" / split / label).mkdir(parents=True)
            for i in range(count):
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                draw_sample(styles[i % 3], colour, rng, size=64).save(root / "data" / split / label / f"{i}.jpg")
    return root


def _train(noise, name: str, **options):
    return transferkit.train(noise / "data", out=noise / "runs" / name, overwrite=True, cache_dir=str(noise / "cache"),
                             **{**QUICK, **options})


@pytest.fixture(scope="module")
def noise_features(noise) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return _features(noise / "data")


def _val_loss(head, features) -> float:
    (vx, vy) = features["val"]
    with torch.inference_mode():
        return float(torch.nn.functional.cross_entropy(head(torch.as_tensor(vx)), torch.as_tensor(vy)))


def test_patience_stops_training_and_the_best_epoch_is_kept(noise_features):
    (x, y), (vx, vy) = noise_features["train"], noise_features["val"]
    for patience in (3, 6):
        fit = fit_head(HeadSpec("linear", x.shape[1], 2), x, y, vx, vy, FitOptions(epochs=80, lr=1e-2,
                                                                                     patience=patience))
        val_losses = [row["val_loss"] for row in fit.history]
        assert len(val_losses) == fit.best_epoch + patience < 80  # stopped `patience` epochs after the best
        assert fit.best_epoch == 1 + int(np.argmin(val_losses))
        # the head returned is the best epoch's, not the last one's
        assert _val_loss(fit.head, noise_features) == pytest.approx(val_losses[fit.best_epoch - 1], rel=1e-5)
        assert val_losses[-1] > val_losses[fit.best_epoch - 1] * 1.01


def test_the_run_keeps_the_best_epoch(noise):
    result = _train(noise, "best", epochs=80, lr=1e-2, patience=3, optimizer="adamw")
    val_losses = [row["val_loss"] for row in result.history]
    assert len(val_losses) == result.best_epoch + 3 and val_losses[-1] > val_losses[result.best_epoch - 1] * 1.01
    # the model's own probabilities: the metrics' "loss" is after calibration
    assert result.metrics["val"]["loss_uncalibrated"] == pytest.approx(val_losses[result.best_epoch - 1], rel=1e-4)


def test_image_training_stops_early_and_keeps_the_best_epoch(noise):
    result = _train(noise, "images", mode="head", epochs=12, lr=3e-2, patience=2, augment="none", batch_size=8)
    val_losses = [row["val_loss"] for row in result.history if row["stage"] == "head"]
    best = int(np.argmin(val_losses))
    assert len(val_losses) == best + 1 + 2 < 12
    assert result.metrics["val"]["loss_uncalibrated"] == pytest.approx(val_losses[best], rel=1e-3)


def test_balancing_moves_predictions_towards_the_rare_class(noise_features):
    """Half the validation images are the rare class; with random labels only the prior decides."""
    (x, y), (vx, vy) = noise_features["train"], noise_features["val"]

    def rare_share(balance: str) -> float:
        fit = fit_head(HeadSpec("linear", x.shape[1], 2), x, y, vx, vy, FitOptions(epochs=30, patience=100,
                                                                                     balance=balance))
        with torch.inference_mode():
            return float((fit.head(torch.as_tensor(vx)).argmax(1) == 1).float().mean())

    plain = rare_share("none")
    for balance in ("weights", "sampler"):
        assert rare_share(balance) >= plain + 0.15, (balance, plain)


def test_image_training_draws_balanced_batches_with_the_sampler(noise, monkeypatch):
    drawn = []
    real_iter = FINETUNE.EpochSampler.__iter__

    def recording(self):
        for position, index in real_iter(self):
            drawn.append(index)
            yield position, index

    monkeypatch.setattr(FINETUNE.EpochSampler, "__iter__", recording)
    shares = {}
    for balance in ("none", "sampler"):
        del drawn[:]
        _train(noise, f"images-{balance}", mode="head", epochs=2, balance=balance, augment="none")
        shares[balance] = np.mean(np.array(drawn) >= 30)  # training images 30.. are the rare 'b'
    assert shares["none"] == pytest.approx(0.25) and 0.35 < shares["sampler"] < 0.65, shares


def _backbone_tensors(run) -> dict[str, torch.Tensor]:
    stored = safetensors.torch.load_file(str(run / "model.safetensors"))
    return {k.removeprefix("backbone."): v for k, v in stored.items() if k.startswith("backbone.")}


def test_backbone_lr_mult_zero_leaves_the_backbone_as_pretrained(noise):
    pretrained = open_backbone(image_size=64).trainable_copy().state_dict()
    frozen = _backbone_tensors(_train(noise, "mult0", mode="finetune", epochs=1, lr=1e-2, backbone_lr_mult=0,
                                      augment="none").run_dir)
    assert all(torch.equal(frozen[k], pretrained[k]) for k in pretrained)
    moved = _backbone_tensors(_train(noise, "mult1", mode="finetune", epochs=1, lr=1e-2, backbone_lr_mult=1,
                                     augment="none").run_dir)
    assert any(not torch.equal(moved[k], pretrained[k]) for k in pretrained)


def _features(folder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pooled features and class indices of folder/train and folder/val (classes in sorted order); the final
    features (pre-logits), whose scale the epoch-by-epoch loop's default learning rate moves in a few epochs."""
    extractor = Extractor(open_backbone(image_size=64, features="pre-logits"), "cpu", "fp32", "torch")
    splits = {}
    for split in ("train", "val"):
        paths = sorted((folder / split).glob("*/*.jpg"))
        classes = sorted({p.parent.name for p in paths})
        found = extract_features(extractor, paths, None, progress=False)
        splits[split] = found.features, np.array([classes.index(p.parent.name) for p in paths])
    return splits


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features of the three synthetic shape classes: a head learns them in a few epochs."""
    root = tmp_path_factory.mktemp("shapes")
    make_image_folder(root / "train", per_class=10, seed=3, size=64)
    make_image_folder(root / "val", per_class=4, seed=4, size=64)
    return _features(root)


def _fit(shapes, **options) -> FitResult:
    (x, y), (vx, vy) = shapes["train"], shapes["val"]
    spec = HeadSpec(options.pop("head", "linear"), x.shape[1], 3, options.pop("dropout", 0.2),
                    options.pop("hidden", 512))
    return fit_head(spec, x, y, vx, vy, FitOptions(**{"epochs": 6, "patience": 100, "lr": 1e-3, **options}))


def _first_loss_drop(fit: FitResult) -> float:
    return fit.history[0]["train_loss"] - fit.history[2]["train_loss"]


def _weight_norm(fit: FitResult) -> float:
    return float(sum(m.weight.detach().norm() ** 2 for m in fit.head if hasattr(m, "weight")) ** 0.5)


def _confidence(fit: FitResult, shapes) -> float:
    with torch.inference_mode():
        return float(fit.head(torch.as_tensor(shapes["val"][0])).softmax(1).max(1).values.mean())


# option -> (value, the options it needs, what must be true of (without, with) besides different losses)
EFFECTS = {
    "lr": (1e-2, {}, lambda a, b, d: _first_loss_drop(b) > _first_loss_drop(a)),
    "batch_size": (4, {}, None),
    "weight_decay": (100.0, {}, lambda a, b, d: _weight_norm(b) < 0.9 * _weight_norm(a)),
    "dropout": (0.9, {}, lambda a, b, d: b.history[-1]["train_loss"] > a.history[-1]["train_loss"]),
    "label_smoothing": (0.5, {}, lambda a, b, d: _confidence(b, d) < _confidence(a, d) - 0.05),
    "optimizer": ("sgd", {}, None),
    "schedule": ("cosine", {}, lambda a, b, d: b.history[-1]["lr"] < 0.5 * a.history[-1]["lr"]),
    "warmup_epochs": (3.0, {}, lambda a, b, d: b.history[0]["lr"] < 0.5 * a.history[0]["lr"]),
    "seed": (5, {}, None),
    "epochs": (3, {}, lambda a, b, d: len(b.history) == 3),
    "head": ("mlp", {}, lambda a, b, d: b.head[0].out_features == 512),
    "hidden": (64, {"head": "mlp"}, lambda a, b, d: b.head[0].out_features == 64),
    "momentum": (0.5, {"optimizer": "sgd", "lr": 0.05}, None),
    "nesterov": (True, {"optimizer": "sgd", "lr": 0.05}, None),
    "grad_clip": (1e-3, {"optimizer": "sgd", "lr": 0.05},
                  lambda a, b, d: _first_loss_drop(b) < 0.5 * _first_loss_drop(a)),
    "lr_steps": ((2,), {"schedule": "step", "lr_steps": (4,)}, lambda a, b, d: b.history[2]["lr"] < a.history[2]["lr"]),
    "lr_gamma": (0.5, {"schedule": "step", "lr_steps": (2,)},
                 lambda a, b, d: b.history[-1]["lr"] == pytest.approx(0.5e-3)),
    "monitor": ("val_accuracy", {}, None),
}


@pytest.mark.parametrize("option", list(EFFECTS))
def test_each_head_option_changes_training(option, shapes):
    value, context, effect = EFFECTS[option]
    without, changed = _fit(shapes, **context), _fit(shapes, **{**context, option: value})
    if option != "monitor":  # the monitor changes which epoch is kept, not the training
        assert [r["train_loss"] for r in changed.history] != [r["train_loss"] for r in without.history]
    if effect is not None:
        assert effect(without, changed, shapes), option


def test_monitor_picks_the_best_epoch_by_its_own_measure(noise_features):
    (x, y), (vx, vy) = noise_features["train"], noise_features["val"]
    spec = HeadSpec("linear", x.shape[1], 2)
    for monitor, key, better in (("val_loss", "val_loss", min), ("val_accuracy", "val_accuracy", max)):
        fit = fit_head(spec, x, y, vx, vy, FitOptions(epochs=20, patience=100, lr=1e-2, monitor=monitor))
        values = [row[key] for row in fit.history]
        assert values[fit.best_epoch - 1] == better(values)


def test_train_hands_every_head_option_to_the_head(noise, monkeypatch):
    """`train` passes each fit option it was given to the probe's fit (the behaviour tests above then apply)."""
    train_module = importlib.import_module("transferkit.train")
    seen = []
    real_fit_head = train_module.fit_head
    monkeypatch.setattr(train_module, "fit_head", lambda spec, *a: seen.append((spec, a[4])) or real_fit_head(
        spec, *a))
    chosen = dict(epochs=3, batch_size=7, lr=0.02, weight_decay=0.003, label_smoothing=0.15, patience=4,
                  balance="sampler", seed=9, optimizer="sgd", momentum=0.8, nesterov=True, schedule="step",
                  lr_steps=(2,), lr_gamma=0.3, warmup_epochs=0.5, grad_clip=2.5, monitor="val_accuracy")
    _train(noise, "handed", head="mlp", dropout=0.35, hidden=48, **chosen)
    (spec, options), = seen
    assert (spec.kind, spec.dropout, spec.hidden) == ("mlp", 0.35, 48)
    assert {name: getattr(options, name) for name in chosen} == chosen
    assert {f.name for f in dataclasses.fields(FitOptions)} == set(chosen)  # a new fit option is added here too
    # fine-tuning's first stage (a probe) keeps the probe's own rates and schedule, and takes the options that
    # describe the data and the goal
    goal = ("batch_size", "weight_decay", "label_smoothing", "patience", "balance", "seed", "monitor")
    first_stage = train_module._probe_options(TrainConfig(mode="finetune", head_epochs=17,
                                                          **{k: chosen[k] for k in goal}))
    assert first_stage.epochs == 17 and {k: getattr(first_stage, k) for k in goal} == {k: chosen[k] for k in goal}


def _stage(noise, **options):
    """An image-training stage (loader, loss, optimiser, schedule) built from a TrainConfig, as `train` builds it."""
    train_module = importlib.import_module("transferkit.train")
    paths = sorted((noise / "data" / "train").glob("*/*.jpg"))
    targets = np.array([p.parent.name == "b" for p in paths], dtype=np.int64)
    config = TrainConfig(**{"mode": "finetune", "image_size": 64, "train_size": 64, "workers": 0, **options}).resolved()
    backbone = open_backbone(image_size=64)
    backbone.train_size = config.train_size  # as train does with --train-size
    net, _ = train_module._network(backbone, config, 2)
    training = FINETUNE.ImageTraining(net, config.mode, config, backbone, torch.device("cpu"), "fp32")
    return FINETUNE._Stage(training, paths, targets, config.schedule)


def test_image_training_takes_every_option(noise):
    """Fine-tuning builds its loss, optimiser, schedule and loader from the options the user gave (the same
    functions the probe uses, whose effects the tests above observe)."""
    chosen = dict(lr=0.02, epochs=5, batch_size=7, weight_decay=0.003, label_smoothing=0.15, balance="weights",
                  optimizer="sgd", momentum=0.8, nesterov=True, schedule="step", lr_steps=(2,), lr_gamma=0.3,
                  backbone_lr_mult=0.5, unfreeze="top-blocks:2", augment="vgg")
    stage = _stage(noise, **chosen)
    assert stage.criterion.label_smoothing == 0.15
    assert stage.criterion.weight.tolist() == pytest.approx([40 / 60, 40 / 20])  # 30 'a', 10 'b'
    optimizer = stage.optimizer
    assert isinstance(optimizer, torch.optim.SGD)
    head, backbone = optimizer.param_groups
    assert [head["lr"], backbone["lr"]] == pytest.approx([0.02, 0.01])
    assert all((g["weight_decay"], g["momentum"], g["nesterov"]) == (0.003, 0.8, True) for g in (head, backbone))
    backbone_model = stage.training.net.backbone
    trainable = {name for name, p in backbone_model.named_parameters() if p.requires_grad}
    assert trainable == set(FINETUNE.trainable_names(backbone_model, "top-blocks:2"))
    assert 0 < len(trainable) < len(list(backbone_model.parameters()))  # the top blocks only
    assert stage.loader.batch_size == 7 and stage.steps_per_epoch == math.ceil(40 / 7)
    lrs = []
    for _ in range(4 * stage.steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        stage.scheduler.step()
    per_epoch = lrs[::stage.steps_per_epoch]
    assert per_epoch == pytest.approx([0.02, 0.02, 0.006, 0.006])  # x0.3 from epoch 3 (after --lr-steps 2)
    assert "RandomShortestSize" in repr(stage.loader.dataset.transform)  # the vgg preset


def test_image_training_clips_gradients(noise):
    """One plain SGD step (no momentum, no weight decay) moves the weights by lr x the clipped gradient norm."""

    def moved(**options) -> float:
        stage = _stage(noise, optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.1, schedule="constant",
                       augment="none", batch_size=8, **options)
        net = stage.training.net
        before = [p.detach().clone() for p in net.parameters()]
        stage.sampler.set_epoch(1)
        stage.step(next(iter(stage.loader)))
        return float(sum((p.detach() - b).norm() ** 2 for p, b in zip(net.parameters(), before)) ** 0.5)

    free, clipped = moved(), moved(grad_clip=1e-4)
    assert clipped <= 0.1 * 1e-4 * 1.01 < free / 100, (free, clipped)
