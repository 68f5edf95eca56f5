"""The regularisation of the image-training stages (fine-tuning the top blocks or the whole network): mixup, an
exponential moving average (EMA) of the weights and stochastic depth, each a number in `Recipe`, and the rule that
picks them by the size of the training split (`recipe_for`).

Every random choice here is a function of (seed, epoch, batch), like the rest of training, so that a resumed epoch
replays exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Recipe:
    """mixup: the Beta(alpha, alpha) of mixup (Zhang et al. 2018; 0: off), mixing the inputs of each batch with a
    shuffled copy of themselves (pixels, or the cached activations of `--cache-bottom`) and the loss in the same
    proportion. ema: the decay per optimiser step of an average of the weights that is what gets evaluated, kept
    and exported (0: off). drop_path: the stochastic-depth rate of the last trained block (Huang et al. 2016; earlier
    trained blocks get proportionally less, as timm does; 0: off)."""

    mixup: float = 0.0
    ema: float = 0.0
    drop_path: float = 0.0

    def describe(self) -> str:
        parts = [f"mixup {self.mixup:g}" if self.mixup else "", f"weight EMA {self.ema:g}" if self.ema else "",
                 f"stochastic depth {self.drop_path:g}" if self.drop_path else ""]
        return ", ".join(part for part in parts if part) or "no mixup, EMA or stochastic depth"


def recipe_for(train_images: int) -> Recipe:
    """The recipe for a training split of `train_images` photos: the first of RECIPE_RULES whose size is not
    exceeded."""
    return next(recipe for up_to, recipe in RECIPE_RULES if train_images <= up_to)


# (largest training split, recipe). Measured with `python benchmarks/recipe.py` (lite0, the top 6 blocks on cached
# activations at 160 px, 8 epochs, lr 1e-3, backbone x0.3; flowers100 split 80/10/10 per class with a fixed seed,
# ~430 validation and test images, so +-2 points are noise), validation / test accuracy:
#
#   training images        3,457 (full)     689 (a fifth)
#   nothing                0.819 / 0.798    0.753 / 0.760
#   mixup 0.2              0.828 / 0.777    0.756 / 0.756
#   mixup 0.4                   -           0.730 / 0.758
#   weight EMA 0.998       0.814 / 0.793    0.760 / 0.760
#   stochastic depth 0.2   0.828 / 0.798    0.735 / 0.779
#   all three (mixup 0.2)       -           0.767 / 0.756
#
# None moved both splits the same way by more than the noise at either size (mixup cut training accuracy from 0.92
# to 0.80 and bought nothing held out in 8 epochs; it needs longer schedules than a CPU affords), so no size gets
# one by default: each stays an option (--mixup, --ema, --drop-path). Averaging a photo's and its mirror image's
# probabilities at test time moved test accuracy by -0.5 to +1.6 points (+0.7 on average over these 9 runs), for
# twice the prediction cost: not adopted either.
RECIPE_RULES: tuple[tuple[float, Recipe], ...] = ((float("inf"), Recipe()),)


# ---------------------------------------------------------------------------------------------- mixup


def mix_batch(inputs: list[torch.Tensor], alpha: float, rng: np.random.Generator
              ) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """Mixup of one batch: (mixed inputs, the permutation that gives each row its partner, the weight of the row's
    own target). uint8 pixels are mixed in float and rounded back (half a grey level at most); cached activations
    and pooled features are mixed as they are (manifold mixup at the cut, Verma et al. 2019)."""
    weight = float(rng.beta(alpha, alpha))
    partner = torch.from_numpy(rng.permutation(inputs[0].shape[0])).to(inputs[0].device)
    mixed = []
    for x in inputs:
        blend = weight * x.float() + (1 - weight) * x[partner].float()
        mixed.append(blend.round().to(torch.uint8) if x.dtype == torch.uint8 else blend.to(x.dtype))
    return mixed, partner, weight


# ---------------------------------------------------------------------------------------------- weight average


class WeightAverage:
    """An exponential moving average of a network's parameters and buffers, updated after every optimiser step
    (timm's ModelEmaV3 with warm-up: the decay at step t is min(decay, (1 + t) / (10 + t)), so early steps are not
    averaged with the untrained start)."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        self.steps = 0

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        averaged = self.module.state_dict()
        for name, value in net.state_dict().items():
            if value.dtype.is_floating_point:
                averaged[name].lerp_(value, 1 - decay)
            else:
                averaged[name].copy_(value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.steps = state["steps"]


# ---------------------------------------------------------------------------------------------- stochastic depth


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth on the residual branches of the trained blocks of `model` (those with a trainable
    parameter, input to output): rate * (i + 1) / n for the i-th of n, through the `drop_path` module timm's blocks
    carry (an identity in eval mode: exports and predictions are untouched)."""
    from timm.layers import DropPath

    blocks = [m for m in model.modules() if isinstance(getattr(m, "drop_path", None), nn.Module)
              and any(p.requires_grad for p in m.parameters())]
    for i, block in enumerate(blocks):
        block.drop_path = (DropPath(rate * (i + 1) / len(blocks)) if rate else nn.Identity()).train(block.training)
