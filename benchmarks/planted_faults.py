"""Does the fast test suite catch the product going wrong? Plant one fault at a time in src/, run
`pytest -m "not slow" -x`, print which test failed first (or that none did), restore the file.

    python benchmarks/planted_faults.py                  # every fault
    python benchmarks/planted_faults.py "BGR pixels"     # one
    python benchmarks/planted_faults.py --time-suites    # also: wall time of the fast suite and of the whole suite

Each fault's hint names the test files run first, so the usual catcher answers in under a minute; a fault nothing
catches costs a whole fast-suite run and is printed as NOT CAUGHT. The files are restored even when interrupted.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Fault:
    name: str
    file: str
    correct: str
    planted: str
    look_first: tuple[str, ...]


FAULTS = [
    Fault("embedded weights not loaded", "src/transferkit/backbone.py",
          "missing, unexpected = model.load_state_dict(state, strict=False)", "missing, unexpected = [], []",
          ("test_golden.py", "test_backbone.py")),
    Fault("pixels in BGR order", "src/transferkit/data.py",
          "return np.array(image.resize((width, height), _PIL_RESAMPLING[self.interpolation], box=box))",
          "return np.array(image.resize((width, height), _PIL_RESAMPLING[self.interpolation], box=box))[..., ::-1]"
          ".copy()", ("test_golden.py", "test_features.py")),
    Fault("normalisation with the wrong sign", "src/transferkit/backbone.py",
          'self.register_buffer("shift", -mean / std, persistent=False)',
          'self.register_buffer("shift", mean / std, persistent=False)', ("test_golden.py", "test_features.py")),
    Fault("normalisation with ImageNet's mean/std", "src/transferkit/backbone.py",
          "mean = torch.tensor(preprocessing.mean).view(1, -1, 1, 1)\n        std = torch.tensor(preprocessing.std)",
          "mean = torch.tensor((0.485, 0.456, 0.406)).view(1, -1, 1, 1)\n        std = torch.tensor((0.229, 0.224, "
          "0.225))", ("test_golden.py", "test_features.py")),
    Fault("best epoch not restored (probe)", "src/transferkit/head.py", "head.load_state_dict(best[2])", "pass",
          ("test_options.py",)),
    Fault("best epoch not restored (image training)", "src/transferkit/finetune.py",
          'net.load_state_dict(best["model"])', "pass", ("test_options.py",)),
    Fault("early-stopping patience ignored (probe)", "src/transferkit/head.py",
          "epoch - best[1] >= options.patience", "epoch - best[1] >= 10", ("test_options.py",)),
    Fault("early-stopping patience ignored (image training)", "src/transferkit/finetune.py",
          'epoch - 1 - best["epoch"] >= options.patience', 'epoch - 1 - best["epoch"] >= 10', ("test_options.py",)),
    Fault("--backbone-lr-mult ignored", "src/transferkit/finetune.py",
          '{"params": params, "lr": lr * backbone_lr_mult}', '{"params": params, "lr": lr * 0.1}',
          ("test_options.py",)),
    Fault("balancing sampler ignored (probe)", "src/transferkit/head.py",
          "sample_weights = sampling_weights(train_y, weight, options.balance)", "sample_weights = None",
          ("test_options.py",)),
    Fault("balancing sampler ignored (image training)", "src/transferkit/finetune.py",
          "sample_weights = sampling_weights(targets, weights, options.balance)", "sample_weights = None",
          ("test_options.py",)),
    Fault("int8 with per-tensor weights (costs 9 points on hymenoptera)", "src/transferkit/export.py",
          "per_channel=True,", "per_channel=False,", ("test_serve.py",)),
    Fault("int8 calibrated on noise", "src/transferkit/export.py", "_quantize_int8(fp32, int8, calibration, progress)",
          "_quantize_int8(fp32, int8, np.random.default_rng(0).integers(0, 256, calibration.shape, dtype=np.uint8), "
          "progress)",
          ("test_serve.py",)),
    Fault("the CLI drops --patience", "src/transferkit/cli.py", "label_smoothing=label_smoothing, patience=patience,",
          "label_smoothing=label_smoothing,", ("test_cli_options.py",)),
    Fault("fine-tuning's first stage drops the weight decay", "src/transferkit/train.py",
          "batch_size=config.batch_size, weight_decay=config.weight_decay,", "batch_size=config.batch_size,",
          ("test_options.py",)),
    Fault("the doctor calls every image cleanlab suspects a likely label error", "src/transferkit/doctor.py",
          "score < LIKELY_LABEL_ERROR_SCORE))", "score < 2))", ("test_doctor.py", "test_newcomer_misc.py")),
    Fault("the CSV reader takes a,'b' as label b", "src/transferkit/data.py",
          "return single if image_paths(single) > image_paths(standard) else standard",
          "return single if image_paths(single) >= image_paths(standard) else standard", ("test_properties.py",)),
    # faults beyond the list, planted afterwards to see whether the suite catches what nobody wrote down
    Fault("--train-bn ignored", "src/transferkit/finetune.py", "if not (train_bn and trainable):", "if True:",
          ("test_finetune.py",)),
    Fault("--unfreeze ignored", "src/transferkit/finetune.py", "if name in selected]", "]", ("test_finetune.py",)),
    Fault("centre crop taken from the corner", "src/transferkit/data.py",
          "left, top = int(round((new_w - out_w) / 2.0)), int(round((new_h - out_h) / 2.0))", "left, top = 0, 0",
          ("test_features.py",)),
    Fault("nearest-neighbour resize", "src/transferkit/data.py", "_PIL_RESAMPLING[self.interpolation], box=box))",
          "0, box=box))", ("test_features.py",)),
    Fault("softmax over the batch", "src/transferkit/head.py", "torch.softmax(logits / temperature, dim=1)",
          "torch.softmax(logits / temperature, dim=0)", ("test_cli.py",)),
    Fault("image training drops the label smoothing", "src/transferkit/finetune.py",
          'else None,\n' + " " * 40 + "options.label_smoothing)", 'else None,\n' + " " * 40 + "0.0)",
          ("test_options.py",)),
    Fault("image training drops the weight decay", "src/transferkit/finetune.py",
          "make_optimizer(groups, options.optimizer, options.lr, options.decay,",
          "make_optimizer(groups, options.optimizer, options.lr, 0.0,", ("test_options.py",)),
    Fault("image training drops --grad-clip", "src/transferkit/finetune.py",
          "nn.utils.clip_grad_norm_(net.parameters(), options.grad_clip)", "pass", ("test_options.py",)),
    Fault("light augmentation without the flip", "src/transferkit/augment.py", "return v2.Compose([crop, flip])",
          "return v2.Compose([crop])", ("test_finetune.py",)),
    Fault("vgg augmentation's scale range halved", "src/transferkit/augment.py", "round(512 * size / 224) + 1",
          "round(300 * size / 224) + 1", ("test_finetune.py",)),
    Fault("strong augmentation without its colour changes", "src/transferkit/augment.py",
          "v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),\n"
          "        v2.RandAugment(num_ops=2, magnitude=9, interpolation=v2.InterpolationMode.BILINEAR),", "",
          ("test_finetune.py",)),
    Fault("top-5 accuracy from the 5 least likely classes", "src/transferkit/evaluate.py",
          "top5 = np.argsort(-probabilities", "top5 = np.argsort(probabilities", ("test_train.py",)),
    Fault("precision and recall swapped", "src/transferkit/evaluate.py",
          "support, predicted = confusion.sum(1), confusion.sum(0)",
          "support, predicted = confusion.sum(0), confusion.sum(1)", ("test_train.py",)),
    # issue 25: blocks features and the L-BFGS probe
    Fault("blocks features carry the final block's alone", "src/transferkit/backbone.py",
          "return torch.cat(pooled, dim=1)",
          "return torch.cat([torch.zeros_like(p) for p in pooled[:-1]] + pooled[-1:], dim=1)",
          ("test_probe_features.py",)),
    Fault("blocks not at unit length", "src/transferkit/backbone.py",
          "return nn.functional.normalize(x.float().mean((2, 3)), dim=1)", "return x.float().mean((2, 3))",
          ("test_golden.py",)),
    Fault("the probe never tries the last block alone", "src/transferkit/head.py",
          'parts["last"] = slice(x.shape[1] - last_block, x.shape[1])', "pass", ("test_probe_features.py",)),
    Fault("the L-BFGS probe ignores its weight decay", "src/transferkit/head.py",
          "loss = fit + 0.5 * weight_decay * weight.pow(2).sum()", "loss = fit + 0.0 * weight.pow(2).sum()",
          ("test_probe_features.py",)),
    Fault("the L-BFGS probe keeps its last fit, not the best", "src/transferkit/head.py",
          "            if score < best[0]:\n                best = (score, row[\"epoch\"], (columns,",
          "            if True:\n                best = (score, row[\"epoch\"], (columns,",
          ("test_probe_features.py",)),
    Fault("the L-BFGS probe fits outside the rows' span", "src/transferkit/head.py",
          "return x64.T @ vectors[:, keep] / values[keep].sqrt()", "return x64.T @ vectors[:, keep]",
          ("test_probe_features.py",)),
    Fault("--cache-bottom trains on the same view every epoch", "src/transferkit/topcache.py",
          "view = self.views[(epoch - 1) % len(self.views)]", "view = self.views[0]", ("test_topcache.py",)),
    Fault("--cache-bottom's top skips the bottom's pooled features", "src/transferkit/topcache.py",
          "parts, x = [pooled], activation", "parts, x = [torch.zeros_like(pooled)], activation",
          ("test_topcache.py",)),
    Fault("small images probed at the backbone's test resolution", "src/transferkit/auto.py",
          "if not native or native >= backbone_train_size:", "if True:", ("test_auto.py",)),
    Fault("runs written before blocks features read with blocks", "src/transferkit/classifier.py",
          'features=spec.get("features", "pre-logits"))', 'features=spec.get("features", "blocks"))',
          ("test_probe_features.py",)),
    Fault("the feature cache ignores what features it holds", "src/transferkit/features.py",
          'key.update(format=BLOCKS_CACHE_FORMAT, features="blocks")', "pass", ("test_probe_features.py",)),
    # issue 25, part 3: the fine-tuning recipe
    Fault("mixup mixes the inputs, not the loss", "src/transferkit/finetune.py",
          "loss = weight * loss + (1 - weight) * self.criterion(logits.float(), targets[partner])", "pass",
          ("test_recipe.py",)),
    Fault("mixup pairs every row with itself", "src/transferkit/recipe.py",
          "partner = torch.from_numpy(rng.permutation(inputs[0].shape[0]))",
          "partner = torch.arange(inputs[0].shape[0])", ("test_recipe.py",)),
    Fault("the weight average is kept but never updated", "src/transferkit/recipe.py",
          "averaged[name].lerp_(value, 1 - decay)", "pass", ("test_recipe.py",)),
    Fault("the weight average is updated but not kept", "src/transferkit/finetune.py",
          "return self.training.net if self.average is None else self.average.module", "return self.training.net",
          ("test_recipe.py",)),
    Fault("stochastic depth on the frozen blocks too", "src/transferkit/recipe.py",
          "and any(p.requires_grad for p in m.parameters())]", "]", ("test_recipe.py",)),
    # issue 26: calibrated confidence and unknown images
    Fault("the unknown threshold ignored", "src/transferkit/runtime.py",
          "unknown = None if score is None or threshold is None else bool(score > threshold)",
          "unknown = None if score is None or threshold is None else False", ("test_unknown.py",)),
    Fault("the threshold taken from the wrong end", "src/transferkit/novelty.py",
          "float(np.quantile(self.reference_scores, accept))", "float(np.quantile(self.reference_scores, 1 - accept))",
          ("test_unknown.py",)),
    Fault("a training image is its own nearest neighbour", "src/transferkit/novelty.py",
          "cosine[rows, first_self + start + rows] = -np.inf", "pass", ("test_unknown.py", "test_doctor.py")),
    Fault("calibration not applied in Classifier.predict", "src/transferkit/classifier.py",
          "temperature = self.calibration.temperature if calibrated else 1.0", "temperature = 1.0",
          ("test_unknown.py",)),
    Fault("calibration not applied in the export", "src/transferkit/export.py",
          "class_probabilities(logits, self.multi_label, self.temperature)",
          "class_probabilities(logits, self.multi_label, 1.0)", ("test_unknown.py",)),
    Fault("the unknown score ignores the head", "src/transferkit/novelty.py",
          '"energy": energy(logits)}', '"energy": np.zeros(len(logits))}', ("test_unknown.py",)),
    Fault("the run's stored probabilities left uncalibrated", "src/transferkit/train.py",
          "{name: calibration.apply(p) for name, p in raw.items()}", "dict(raw)", ("test_unknown.py",)),
    Fault("the server never says unknown", "src/transferkit/serve.py",
          "model.threshold if reject else None", "None", ("test_unknown.py",)),
    Fault("multi-label thresholds ignored (0.5 for every class)", "src/transferkit/runtime.py",
          "return stored_thresholds(None, classes, override) if override is not None else thresholds",
          "return np.full(len(classes), 0.5, dtype=np.float32)", ("test_multilabel.py",)),
    Fault("softmax instead of sigmoid for every multi-label head", "src/transferkit/head.py",
          "torch.sigmoid(logits) if multi_label else", "torch.softmax(logits, dim=1) if multi_label else",
          ("test_multilabel.py",)),
    Fault("softmax instead of sigmoid in Classifier", "src/transferkit/classifier.py",
          "class_probabilities(logits, self.multi_label, temperature)",
          "class_probabilities(logits, False, temperature)", ("test_multilabel.py",)),
    Fault("softmax instead of sigmoid in the run's metrics", "src/transferkit/train.py",
          "class_probabilities(torch.from_numpy(values), spec.multi_label)",
          "class_probabilities(torch.from_numpy(values), False)", ("test_multilabel.py",)),
    Fault("the probe trains a softmax on label sets", "src/transferkit/head.py",
          "fit = (bce_loss(logits, y, class_weight) if multi else",
          "fit = (nn.functional.cross_entropy(logits, y / y.sum(1, keepdim=True).clamp(min=1)) if multi else",
          ("test_multilabel.py",)),
    Fault("a multi-label export gives a softmax", "src/transferkit/export.py",
          "class_probabilities(logits, self.multi_label, self.temperature)",
          "class_probabilities(logits, False, self.temperature)", ("test_multilabel_export.py",)),
    Fault("the label separator ignored", "src/transferkit/data.py",
          "label = split_labels(row[1], separator)", "label = split_labels(row[1], None)", ("test_multilabel.py",)),
    Fault("multi-label thresholds chosen without the floor", "src/transferkit/multilabel.py",
          "THRESHOLD_FLOOR = 0.1\n", "THRESHOLD_FLOOR = 0.0\n", ("test_multilabel.py",)),
    # data from anywhere (issue 28)
    Fault("store reads never retried", "src/transferkit/storage.py", "for attempt in range(RETRIES):",
          "for attempt in range(1):", ("test_remote_data.py",)),
    Fault("a changed store object served from the cache", "src/transferkit/features.py",
          "versions.get(url) is not None and versions[url] == remembered[url][0]", "True",
          ("test_remote_data.py",)),
    Fault("a store listing answered from fsspec's stale listing cache", "src/transferkit/storage.py",
          "    fs.invalidate_cache(path)  # a listing", "    # a listing", ("test_shards.py", "test_remote_data.py")),
    Fault("shard members read from their tar header", "src/transferkit/shards.py",
          "images[key] = (info.name, info.offset_data,", "images[key] = (info.name, info.offset,",
          ("test_shards.py",)),
    Fault("shard names' splits ignored", "src/transferkit/data.py",
          "fixed = any(split is not None for split in named.values())", "fixed = False", ("test_shards.py",)),
    Fault("shard members split by their shard's name", "src/transferkit/data.py",
          "    path = str(path).rsplit(shards.MEMBER_MARK, 1)[-1] if shards.is_member(str(path)) else path\n", "",
          ("test_shards.py",)),
    Fault("shard samples left in the shards' order", "src/transferkit/data.py",
          "        samples.sort(key=lambda s: str(s.path).rsplit(shards.MEMBER_MARK, 1)[1])", "        pass",
          ("test_shards.py",)),
    Fault("a truncated shard accepted", "src/transferkit/shards.py",
          "if _size(shard) < tar.offset + 2 * tarfile.BLOCKSIZE:", "if False:", ("test_shards.py",)),
    Fault("shard keys keep dots (WebDataset splits the sample at the first '.')", "src/transferkit/make_shards.py",
          'return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"', 'return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "_"',
          ("test_make_shards.py",)),
    Fault("shard size limit ignores the tar end blocks and record padding", "src/transferkit/make_shards.py",
          "_padded(self._offset + size + END_OF_ARCHIVE, RECORD) > self.limit:", "self._offset + size > self.limit:",
          ("test_make_shards.py",)),
    Fault("gathered feature rows left in rank order", "src/transferkit/distributed.py",
          'order = np.argsort(all_indices, kind="stable")', "order = np.arange(len(all_indices))",
          ("test_distributed.py",)),
    Fault("a rank's share rows taken as rows of the whole list", "src/transferkit/train.py",
          "distributed.gather_rows(positions[feature_set.kept]", "distributed.gather_rows(feature_set.kept",
          ("test_distributed.py",)),
    Fault("the doctor's index cuts near-duplicate candidates at the threshold plus the margin",
          "src/transferkit/neighbours.py", "near = (similar >= threshold - SIMILARITY_MARGIN) & (ids >= 0)",
          "near = (similar >= threshold + SIMILARITY_MARGIN) & (ids >= 0)", ("test_neighbours.py",)),
    Fault("the index's outlier score counts an image as its own neighbour", "src/transferkit/neighbours.py",
          "cosine[(candidates == query[:, None]) | (candidates < 0)] = -np.inf", "cosine[candidates < 0] = -np.inf",
          ("test_neighbours.py",)),
    Fault("perceptual-hash pairs searched with too few parts", "src/transferkit/neighbours.py",
          "parts = max_distance + 1", "parts = max_distance // 2 + 1", ("test_neighbours.py",)),
    Fault("the doctor's index path ignores --near-duplicate-cosine", "src/transferkit/doctor.py",
          "similar, _ = similar_pairs(library, directions, threshold, progress)",
          "similar, _ = similar_pairs(library, directions, NEAR_DUPLICATE_COSINE, progress)", ("test_neighbours.py",)),
    Fault("images the graph cannot reach are not searched exactly", "src/transferkit/neighbours.py",
          "lost.append(_lost(rows, ids))", "lost.append(rows[:0])", ("test_neighbours.py",)),
    Fault("the index's outliers are not measured exactly", "src/transferkit/doctor.py",
          "distance[suspects] = exact_distances(unit, suspects, NEIGHBOURS)", "pass", ("test_neighbours.py",)),
    # experiment trackers
    Fault("the fine-tuning loop's epochs never reach the trackers", "src/transferkit/finetune.py",
          "                tracker.epoch(row)", "                pass", ("test_tracking.py",)),
    Fault("the probe's epochs never reach the trackers", "src/transferkit/train.py",
          '        row["stage"] = "probe"\n        tracker.epoch(row)', '        row["stage"] = "probe"',
          ("test_tracking.py",)),
    Fault("every epoch logged at the same step", "src/transferkit/tracking.py", "self.step += 1", "self.step = 1",
          ("test_tracking.py",)),
    Fault("the final metrics never reach the trackers", "src/transferkit/tracking.py",
          "self._call(tracker, lambda t=tracker: t.finish(flat))", "pass", ("test_tracking.py",)),
    Fault("a failing tracker stops the run", "src/transferkit/tracking.py",
          "                self.failed.add(tracker.name)\n", "                raise\n", ("test_tracking.py",)),
    Fault("the logged MLflow model lacks the run's weights", "src/transferkit/tracking.py",
          'MODEL_FILES = ("config.json", "model.safetensors", "labels.txt", "novelty.npz")',
          'MODEL_FILES = ("config.json", "labels.txt", "novelty.npz")', ("test_tracking.py",)),
    Fault("W&B goes online without a key", "src/transferkit/tracking.py",
          '("online" if _wandb_key() else "offline")', '"online"', ("test_tracking.py",)),
    # comparing runs
    Fault("compare: McNemar's test one-sided", "src/transferkit/compare.py",
          "binomtest(a_only, a_only + b_only, 0.5).pvalue",
          'binomtest(a_only, a_only + b_only, 0.5, alternative="greater").pvalue', ("test_compare.py",)),
    Fault("compare: per-class precision instead of recall", "src/transferkit/compare.py",
          "            rows = a.truth[:, k]\n", "            rows = a.predicted[:, k]\n", ("test_compare.py",)),
    Fault("compare: images matched by position, not path", "src/transferkit/compare.py",
          "    rows_b = [where[answers_a.paths[i]] for i in rows_a]", "    rows_b = rows_a", ("test_compare.py",)),
    Fault("compare: pictures of the wrong images", "src/transferkit/compare.py",
          "[_view(row.path, preprocessing) for row in rows]",
          "[_view(row.path, preprocessing) for row in rows[::-1]]", ("test_compare.py",)),
]


def _pytest(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *arguments], cwd=ROOT,
                          capture_output=True, text=True)


def check(fault: Fault) -> tuple[str | None, float]:
    """The first fast test that fails with `fault` planted (None: none did), and the seconds it took."""
    path = ROOT / fault.file
    original = path.read_text()
    if original.count(fault.correct) != 1:
        raise SystemExit(f"{fault.name}: the code to plant into has changed ({fault.file}); update this script")
    others = sorted(p.name for p in (ROOT / "tests").glob("test_*.py") if p.name not in fault.look_first)
    started = time.perf_counter()
    try:
        path.write_text(original.replace(fault.correct, fault.planted))
        done = _pytest("-m", "not slow", "-x", *[f"tests/{name}" for name in (*fault.look_first, *others)])
    finally:
        path.write_text(original)
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", done.stdout, re.M)
    return (failed[0] if failed else None), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="faults to plant (default: all)")
    parser.add_argument("--time-suites", action="store_true", help="also time the fast and the whole suite")
    args = parser.parse_args()
    chosen = [f for f in FAULTS if not args.names or f.name in args.names]
    missed = 0
    for fault in chosen:
        caught_by, seconds = check(fault)
        missed += caught_by is None
        print(f"{fault.name:<62} {'NOT CAUGHT' if caught_by is None else caught_by}  ({seconds:.0f} s)", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} planted faults caught by the fast suite")
    if args.time_suites:
        for label, selection in (("fast suite (-m 'not slow')", ["-m", "not slow"]), ("whole suite", [])):
            started = time.perf_counter()
            done = _pytest(*selection)
            print(f"{label}: {time.perf_counter() - started:.0f} s; {done.stdout.strip().splitlines()[-1]}",
                  flush=True)


if __name__ == "__main__":
    main()
