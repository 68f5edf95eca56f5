"""What a model holds (parameters, layers, sizes), and the table of backbones a user can pick from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from transferkit.backbone import EMBEDDED_BACKBONES, _embedded_file, feature_size, open_backbone, pooled_features
from transferkit.errors import BackboneError
from transferkit.runs import staging_dir, write_atomically

# Backbones listed besides the embedded ones: small, widely used ImageNet models that suit transfer learning.
POPULAR_BACKBONES = ("mobilenetv3_large_100", "efficientnet_b0", "resnet18", "resnet50", "convnext_tiny",
                     "vit_small_patch16_224", "regnety_016")
# ImageNet-1k top-1 (%), each with where it was published. The embedded backbones: the TensorFlow EfficientNet-Lite
# checkpoints their weights were converted from (tensorflow/tpu models/official/efficientnet/lite/README.md). The
# popular ones: timm's own evaluation of the default pretrained weights (the tag in brackets) that timm 1.0 loads
# for the name, at the listed resolution (huggingface/pytorch-image-models results/results-imagenet.csv).
TPU_LITE = "tensorflow/tpu EfficientNet-Lite README (the checkpoints the embedded weights were converted from)"
TIMM_RESULTS = "timm results-imagenet.csv"
KNOWN_TOP1 = {"efficientnet_lite0": (75.1, TPU_LITE), "efficientnet_lite1": (76.7, TPU_LITE),
              "efficientnet_lite2": (77.6, TPU_LITE),
              "mobilenetv3_large_100": (75.8, f"{TIMM_RESULTS} (ra_in1k, 224 px)"),
              "efficientnet_b0": (77.7, f"{TIMM_RESULTS} (ra_in1k, 224 px)"),
              "resnet18": (73.2, f"{TIMM_RESULTS} (a1_in1k, 288 px)"),
              "resnet50": (81.2, f"{TIMM_RESULTS} (a1_in1k, 288 px)"),
              "convnext_tiny": (84.5, f"{TIMM_RESULTS} (in12k_ft_in1k, 288 px)"),
              "vit_small_patch16_224": (81.4, f"{TIMM_RESULTS} (augreg_in21k_ft_in1k, 224 px)"),
              "regnety_016": (80.7, f"{TIMM_RESULTS} (tv2_in1k, 224 px)")}
TOP1_SOURCE = f"embedded backbones: {TPU_LITE}; others: {TIMM_RESULTS} (timm's default weights)"


def has_own_weights(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def count_layers(model: nn.Module) -> int:
    """Layers with weights (convolutions, norms, linears...), the count Keras' summary calls layers."""
    return sum(1 for module in model.modules() if has_own_weights(module))


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: list[int] | None
    parameters: int
    trainable: int


@dataclass
class ModelSummary:
    """Keras-style model summary: totals, and one row per top-level block with its output shape."""

    name: str
    total_parameters: int
    trainable_parameters: int
    layers: int
    feature_size: int | None = None
    input_size: list[int] | None = None
    rows: list[LayerRow] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def non_trainable_parameters(self) -> int:
        return self.total_parameters - self.trainable_parameters

    def to_dict(self) -> dict:
        return {**asdict(self), "non_trainable_parameters": self.non_trainable_parameters}


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children, with sequences of blocks (timm's `blocks`, `stages`, `layerN`) opened one level."""
    rows = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            rows.extend((f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children())
        else:
            rows.append((name, child))
    return rows


def _output_shapes(model: nn.Module, modules: list[tuple[str, nn.Module]],
                   input_size: tuple[int, int]) -> dict[str, list[int]]:
    """Each module's output shape for one image, from a forward pass on the meta device (no compute)."""
    shapes: dict[str, list[int]] = {}

    def record(name: str):
        def hook(_module, _inputs, output) -> None:
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, list(output.shape[1:]))
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in modules]
    try:
        with torch.no_grad():
            model.to("meta")(torch.empty(1, 3, *input_size, device="meta"))
    except Exception:  # noqa: BLE001 - a model whose forward the meta device cannot run keeps its shapes blank
        shapes.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


class _Features(nn.Module):
    """The backbone as the head sees it: images -> `kind` features (backbone.FEATURE_KINDS)."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.model, images, self.kind)


def summarize_model(name: str, model: nn.Module, input_size: tuple[int, int] | None = None,
                    head: nn.Module | None = None, notes: dict[str, str] | None = None,
                    feature_kind: str = "pre-logits", features: int | None = None) -> ModelSummary:
    """Totals from the parameters' `requires_grad`; shapes need `input_size`. The model may be moved to meta.
    `feature_kind` is what the head is given; `features` its width (default: the model's pre-logits width)."""
    full = nn.ModuleDict({"backbone": model, "head": head}) if head is not None else model
    blocks = _blocks(model) + ([("head", head)] if head is not None else [])
    shapes = _output_shapes(nn.Sequential(_Features(model, feature_kind), head) if head is not None else model, blocks,
                            input_size) if input_size else {}
    rows = [LayerRow(block_name, type(module).__name__, shapes.get(block_name),
                     sum(p.numel() for p in module.parameters()),
                     sum(p.numel() for p in module.parameters() if p.requires_grad))
            for block_name, module in blocks]
    parameters = list(full.parameters())
    return ModelSummary(name, sum(p.numel() for p in parameters),
                        sum(p.numel() for p in parameters if p.requires_grad), count_layers(full),
                        features or (feature_size(model) if hasattr(model, "num_features") else None),
                        list(input_size) if input_size else None, rows, notes or {})


def summarize_backbone(name: str) -> ModelSummary:
    """The architecture behind a backbone name (built on the meta device: no weights, no download), all trainable."""
    if name.startswith("hf-hub:"):
        raise BackboneError("summary takes a timm architecture name (or a run folder), not an hf-hub id.")
    backbone = open_backbone(name, pretrained=False)
    import timm

    with torch.device("meta"):
        model = timm.create_model(backbone.architecture, pretrained=False)
    return summarize_model(backbone.name, model, (backbone.train_size, backbone.train_size),
                           notes={"architecture": backbone.architecture}, features=backbone.feature_width)


def _frozen_backbone(classifier, size: int, cache_dir: str | Path | None = None) -> ModelSummary:
    """The summary of a pretrained backbone without its classifier, all frozen. It depends only on the weights and
    size, so it is kept per machine: building the model needs timm (2.5 s to import), which a warm probe run and
    its report otherwise never load."""
    import hashlib

    from transferkit.features import cache_root

    backbone = classifier.backbone
    key = hashlib.sha256(f"{backbone.architecture}|{backbone.weights_id}|{size}".encode()).hexdigest()[:24]
    path = cache_root(cache_dir) / "summaries" / f"{key}.json"
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        return ModelSummary(**{**values, "rows": [LayerRow(**row) for row in values["rows"]]})
    except (OSError, ValueError, TypeError, KeyError):
        pass
    summary = summarize_model(backbone.name, backbone.trainable_copy().requires_grad_(False), (size, size))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda temporary: temporary.write_text(json.dumps(asdict(summary)), encoding="utf-8"))
    except OSError:
        pass  # an unwritable cache only costs the next report the same work again
    return summary


def summarize_run(run: str | Path, cache_dir: str | Path | None = None) -> ModelSummary:
    """A trained run: its backbone without the ImageNet classifier, plus its head, trainable as the run trained."""
    from transferkit.classifier import Classifier
    from transferkit.finetune import trainable_names

    classifier = Classifier.load(run, engine="torch")
    config = classifier.config
    mode = config.get("mode", "probe")
    evaluation_size = config["preprocessing"]["input_size"][0]
    # A probe trains on features of the evaluation crops; the image modes train at the backbone's training size.
    size = evaluation_size if mode == "probe" else config["backbone"].get("train_size") or evaluation_size
    notes = {"mode": mode, "backbone": config["backbone"]["name"], "weights": config["backbone"]["weights_id"],
             "head": config["head"]["kind"], "classes": str(len(classifier.classes)),
             "output": "one sigmoid per class (multi-label)" if classifier.multi_label else "softmax"}
    name = f"{config['backbone']['name']} + {config['head']['kind']} head"
    head = classifier.head.requires_grad_(True)
    if mode in ("probe", "head"):
        frozen = _frozen_backbone(classifier, size, cache_dir)
        head_parameters = sum(p.numel() for p in head.parameters())
        head_row = LayerRow("head", type(head).__name__, [len(classifier.classes)], head_parameters, head_parameters)
        return ModelSummary(name, frozen.total_parameters + head_parameters, head_parameters,
                            frozen.layers + count_layers(head), classifier.backbone.feature_width, frozen.input_size,
                            frozen.rows + [head_row], notes)
    model = classifier.backbone.model
    if mode == "finetune":
        unfrozen = set(trainable_names(model, config["train"].get("unfreeze", "all")))
        for parameter_name, parameter in model.named_parameters():
            parameter.requires_grad_(parameter_name in unfrozen)
    else:
        model.requires_grad_(True)
    return summarize_model(name, model, (size, size), head, notes, classifier.backbone.feature_kind,
                           classifier.backbone.feature_width)


def summarize(target: str | Path, cache_dir: str | Path | None = None) -> ModelSummary:
    """`transferkit summary`: a run folder, or a backbone name. `cache_dir`: where a run's backbone summary is kept
    [default: transferkit's cache folder]."""
    path = Path(target)
    if path.is_dir() or staging_dir(path).is_dir():  # an interrupted run is named as such by loading it
        return summarize_run(path, cache_dir)
    if path.exists():
        raise BackboneError(f"{target} is a file; pass a run folder or a backbone name such as efficientnet_lite0.")
    try:
        return summarize_backbone(str(target))
    except BackboneError as err:
        if not str(err).startswith("unknown backbone"):
            raise
        raise BackboneError(f"{target} is neither a run folder (there is no such folder) nor a backbone name: "
                            f"{err}") from None


@dataclass
class BackboneInfo:
    """One row of `transferkit models`, computed from the model object built on the meta device."""

    name: str
    architecture: str
    embedded: bool
    parameters: int
    backbone_parameters: int
    layers: int
    feature_size: int
    input_size: int
    test_input_size: int
    weights_mb: float
    imagenet_top1: float | None
    top1_source: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def describe_backbone(name: str) -> BackboneInfo:
    import timm

    embedded = EMBEDDED_BACKBONES.get(name)
    architecture = embedded.architecture if embedded else name
    if not timm.is_model(architecture):
        raise BackboneError(f"'{name}' is not a timm architecture; `transferkit models 'PATTERN*'` lists them.")
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False)
    parameters = sum(p.numel() for p in model.parameters())
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    imagenet_head = sum(p.numel() for p in classifier.parameters()) if isinstance(classifier, nn.Module) else 0
    cfg = model.pretrained_cfg
    if embedded:
        weights_mb = _embedded_file(embedded).stat().st_size / 1e6
        train_size, test_size = embedded.train_size, embedded.preprocessing.input_size[0]
    else:
        weights_mb = parameters * 4 / 1e6
        train_size = cfg.get("input_size", (3, 224, 224))[-1]
        test_size = (cfg.get("test_input_size") or cfg.get("input_size", (3, 224, 224)))[-1]
    top1, source = KNOWN_TOP1.get(name, (None, None))
    return BackboneInfo(name, architecture, embedded is not None, parameters, parameters - imagenet_head,
                        count_layers(model), feature_size(model), train_size, test_size, round(weights_mb, 1), top1,
                        source)


def list_backbones(pattern: str | None = None, limit: int = 100) -> list[BackboneInfo]:
    """The embedded backbones first, then popular timm models; with `pattern` (e.g. 'convnext*'), timm's
    pretrained models matching it."""
    if pattern:
        import timm

        names = [n for n in EMBEDDED_BACKBONES if fnmatch(n, pattern)]
        names += sorted({n.split(".")[0] for n in timm.list_models(pattern, pretrained=True)} - set(names))
        if not names:
            raise BackboneError(f"no backbone matches {pattern!r}; try a wider pattern such as 'resnet*'.")
    else:
        names = [*EMBEDDED_BACKBONES, *POPULAR_BACKBONES]
    return [describe_backbone(name) for name in names[:limit]]

