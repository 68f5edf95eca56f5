"""`compare()`: two runs on the same images. Overall and per-class accuracy side by side, the images one run gets
right and the other wrong, and McNemar's exact test of whether the difference is more than chance.

Why McNemar and not two accuracies with error bars: both runs answer the *same* images, so their mistakes are paired.
Only the images exactly one run gets right (the discordant pairs) say anything about which run is better; if the
runs were equally accurate, each such image would be A's with probability 1/2. The exact test is the two-sided
binomial test of the count of A's on the discordant images against 1/2. It stays exact for any count, where the
chi-squared form needs 25 or more discordant images to be trusted.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit import plots
from transferkit.errors import DataError, RunError
from transferkit.evaluate import (PREDICTIONS_FILE, LabelSetPredictions, Predictions, _scored, read_predictions,
                                  split_samples)
from transferkit.multilabel import label_matrix, stored_thresholds
from transferkit.pages import render_template
from transferkit.report import RIGHT, WRONG, _Pictures, _view
from transferkit.runs import read_run_config, write_atomically
from transferkit.text import plural

log = logging.getLogger("transferkit")

ALPHA = 0.05
"""The level at which the page and the terminal call a difference more than chance."""
GRID_IMAGES = 24
"""At most this many images in each picture of disagreements (the table below it lists them all, up to
TABLE_ROWS)."""
TABLE_ROWS = 500
CHART_CLASSES = 30
"""The bar chart shows every class up to this many, else the classes whose accuracy differs most."""
PAGE, NUMBERS, ASSETS = "compare.html", "compare.json", "compare_files"
GRIDS = ("a_right_b_wrong", "b_right_a_wrong")
"""The pictures of disagreements (PNG names in ASSETS)."""
PICTURES = ("class_accuracy", *GRIDS)


@dataclass
class _Answers:
    """One run's answers on a list of images, over the classes being compared.

    As label sets (n images x k compared classes, bool), so one-label and multi-label runs are judged alike: an image
    is right when its answer equals its truth. A one-label answer outside the compared classes (a class only this run
    knows) is an empty row: wrong, as it should be, since the image's true class is a compared one."""

    paths: list[str]
    truth: np.ndarray
    predicted: np.ndarray
    said: list[str]
    """Each answer as the page writes it: "bees 0.93" (with its probability), or a label set "daisy, rose"."""
    confidence: np.ndarray
    """The probability of each one-label answer (NaN for label sets): how sure a run was of a mistake."""
    truth_names: list[str]
    """Each image's true class as written, compared or not (label sets: its compared labels)."""
    comparable: np.ndarray
    """Whether the image can be compared: a one-label image whose true class both runs know (always, label sets)."""

    @property
    def correct(self) -> np.ndarray:
        return (self.predicted == self.truth).all(1)

    def take(self, rows: np.ndarray | list[int]) -> _Answers:
        rows = np.asarray(rows, dtype=np.int64)
        return _Answers([self.paths[i] for i in rows], self.truth[rows], self.predicted[rows],
                        [self.said[i] for i in rows], self.confidence[rows], [self.truth_names[i] for i in rows],
                        self.comparable[rows])


def _answers(predictions: Predictions | LabelSetPredictions, classes: list[str], compared: list[str]) -> _Answers:
    """A run's predictions (in its own classes) as answers over the `compared` classes."""
    position = {name: i for i, name in enumerate(compared)}
    columns = [classes.index(name) for name in compared]
    n = len(predictions.paths)
    if isinstance(predictions, LabelSetPredictions):
        truth = predictions.targets[:, columns] > 0
        predicted = predictions.predicted[:, columns]
        said, truth_names = ([", ".join(name for name, given in zip(compared, row) if given) or "(no label)"
                              for row in matrix] for matrix in (predicted, truth))
        return _Answers(list(predictions.paths), truth, predicted, said, np.full(n, np.nan), truth_names,
                        np.ones(n, dtype=bool))
    truth, predicted = np.zeros((n, len(compared)), dtype=bool), np.zeros((n, len(compared)), dtype=bool)
    comparable = np.zeros(n, dtype=bool)
    for i, (target, answer) in enumerate(zip(predictions.targets, predictions.predicted)):
        if classes[target] in position:
            truth[i, position[classes[target]]] = comparable[i] = True
        if classes[answer] in position:
            predicted[i, position[classes[answer]]] = True
    said = [f"{classes[k]} {p:.2f}" for k, p in zip(predictions.predicted, predictions.confidence)]
    return _Answers(list(predictions.paths), truth, predicted, said, np.asarray(predictions.confidence, np.float64),
                    [classes[k] for k in predictions.targets], comparable)


@dataclass(frozen=True)
class ClassRow:
    """One class of the comparison: its images and each run's accuracy on them.

    One label an image: the share of the class's images the run gets right (its recall). Multi-label runs: the
    share of all images whose decision on this label (given or not) is right; `support` counts the images with it."""

    name: str
    support: int
    accuracy_a: float | None
    accuracy_b: float | None

    @property
    def difference(self) -> float | None:
        """B's accuracy minus A's."""
        return None if self.accuracy_a is None or self.accuracy_b is None else self.accuracy_b - self.accuracy_a

    def to_dict(self) -> dict:
        return {"class": self.name, "support": self.support, "accuracy_a": self.accuracy_a,
                "accuracy_b": self.accuracy_b, "difference": self.difference}


@dataclass(frozen=True)
class Disagreement:
    """An image exactly one run gets right, with both runs' answers."""

    path: str
    truth: str
    answer_a: str
    answer_b: str

    def to_dict(self) -> dict:
        return {"path": self.path, "truth": self.truth, "a": self.answer_a, "b": self.answer_b}


@dataclass
class Comparison:
    """What `compare` found. `a_only`: the images A gets right and B wrong; `b_only` the reverse; each ordered by
    how sure the wrong run was of its mistake (most sure first)."""

    run_a: Path
    run_b: Path
    names: tuple[str, str]
    scored: str
    """Which images were compared, in words."""
    multi_label: bool
    n: int
    correct_a: int
    correct_b: int
    a_only: list[Disagreement]
    b_only: list[Disagreement]
    p_value: float
    per_class: list[ClassRow]
    only_a: list[str] = field(default_factory=list)
    """Classes only A knows (left out of the comparison); `only_b` likewise."""
    only_b: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What was left out and why, in sentences (the page shows them; the command warns with the first)."""
    page: Path | None = None

    @property
    def classes(self) -> list[str]:
        return [row.name for row in self.per_class]

    @property
    def accuracy_a(self) -> float:
        return self.correct_a / self.n

    @property
    def accuracy_b(self) -> float:
        return self.correct_b / self.n

    @property
    def difference(self) -> float:
        """B's accuracy minus A's, in share of the images."""
        return self.accuracy_b - self.accuracy_a

    @property
    def both_right(self) -> int:
        return self.correct_a - len(self.a_only)

    @property
    def both_wrong(self) -> int:
        return self.n - self.correct_a - len(self.b_only)

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    @property
    def verdict(self) -> str:
        """What the test says, in a sentence."""
        discordant = len(self.a_only) + len(self.b_only)
        if not discordant:
            return "The runs are right and wrong on exactly the same images: no difference to test."
        if self.significant:
            better, worse = self.names if len(self.a_only) > len(self.b_only) else self.names[::-1]
            return (f"{better} is more accurate than {worse} on these images, and the difference is more than chance "
                    f"(McNemar's exact test, p = {self.p_value:.3g} < {ALPHA}).")
        sentence = (f"The difference could be chance (McNemar's exact test, p = {self.p_value:.3g} >= {ALPHA}): "
                    "these images do not show either run to be better.")
        if 2 * 0.5 ** discordant >= ALPHA:  # even all of them on one side would not reach ALPHA
            sentence += (f" With only {plural(discordant, 'image')} on which they disagree, no outcome could be "
                         "significant: compare them on more images (--data).")
        return sentence

    def to_dict(self) -> dict:
        return {"run_a": str(self.run_a), "run_b": str(self.run_b), "names": list(self.names),
                "scored": self.scored, "multi_label": self.multi_label, "n": self.n,
                "accuracy_a": self.accuracy_a, "accuracy_b": self.accuracy_b, "difference": self.difference,
                "correct_a": self.correct_a, "correct_b": self.correct_b,
                "mcnemar": {"a_right_b_wrong": len(self.a_only), "b_right_a_wrong": len(self.b_only),
                            "both_right": self.both_right, "both_wrong": self.both_wrong, "p_value": self.p_value,
                            "alpha": ALPHA, "significant": self.significant},
                "verdict": self.verdict, "per_class": [row.to_dict() for row in self.per_class],
                "classes_only_a": self.only_a, "classes_only_b": self.only_b, "notes": self.notes,
                "a_right_b_wrong": [d.to_dict() for d in self.a_only],
                "b_right_a_wrong": [d.to_dict() for d in self.b_only],
                "page": None if self.page is None else str(self.page)}

    def table(self):
        """The per-class table for a terminal (rich), the overall row last."""
        from rich.markup import escape
        from rich.table import Table

        a, b = map(escape, self.names)
        measure = "per-label accuracy" if self.multi_label else "accuracy"
        table = Table("class", "images", f"A: {a}", f"B: {b}", "B - A", title=f"{measure} per class",
                      title_justify="left")
        for row in self.per_class:
            table.add_row(escape(row.name), str(row.support), _share(row.accuracy_a), _share(row.accuracy_b),
                          _points(row.difference))
        table.add_section()
        exact = "all (exact match)" if self.multi_label else "all"
        table.add_row(exact, str(self.n), f"{_share(self.accuracy_a)} ({self.correct_a})",
                      f"{_share(self.accuracy_b)} ({self.correct_b})", _points(self.difference), style="bold")
        return table

    def __repr__(self) -> str:
        return (f"Comparison({self.names[0]!r} {self.accuracy_a:.3f} vs {self.names[1]!r} {self.accuracy_b:.3f} on "
                f"{plural(self.n, 'image')}; {len(self.a_only)} only A right, {len(self.b_only)} only B right, "
                f"McNemar p={self.p_value:.3g})")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _points(value: float | None) -> str:
    """A difference of accuracies in percentage points."""
    return "-" if value is None else f"{100 * value:+.1f} pt"


def mcnemar_p(a_only: int, b_only: int) -> float:
    """McNemar's exact test: the two-sided binomial test of `a_only` of the `a_only + b_only` discordant images
    against 1/2; 1.0 when there are none."""
    if a_only + b_only == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


def compare(run_a: str | Path, run_b: str | Path, data: str | Path | None = None, out: str | Path | None = None,
            split: str = "auto", cache_dir: str | Path | None = None, use_cache: bool = True,
            batch_size: int | None = None, workers: int | None = None, progress: bool | None = None,
            **engine_options) -> Comparison:
    """Compare two runs on the same images and write `out`/compare.html (with its pictures in compare_files/) and
    `out`/compare.json. `out` defaults to RUN_A's folder's compare/A-vs-B.

    Without `data`: the images both runs were evaluated on at training (their predictions.csv), matched by path: the
    test split when both have one and share images (validation chose their epochs and calibration, so test is the
    fairer), else validation; `split` "val" or "test" picks one. With `data`: both runs score DATA's `split` (auto:
    the run's test, else validation split when DATA is its training data, else all of it) through the feature cache,
    and are compared on the images both scored.

    Runs with different classes are compared on the classes they share: one-label images of other classes are left
    out (a warning and the page say which). Multi-label runs are compared as they are judged elsewhere: an image is
    right when its label set (over the shared labels) is exactly right, and a class's accuracy is the share of images
    whose decision on that label is right. A multi-label and a one-label run cannot be compared.

    `engine_options` (engine, device, precision) go to the runs' classifiers when they score `data`.
    """
    run_a, run_b = Path(run_a), Path(run_b)
    config_a, config_b = read_run_config(run_a), read_run_config(run_b)
    multi_label = _kind(run_a, config_a, run_b, config_b)
    compared, only_a, only_b = _shared_classes(run_a, config_a["labels"], run_b, config_b["labels"])
    if data is None:
        (a, left_a), (b, left_b), scored = _stored_answers(run_a, config_a, run_b, config_b, compared, split)
    else:
        scoring = dict(cache_dir=cache_dir, use_cache=use_cache, batch_size=batch_size, workers=workers,
                       progress=progress, **engine_options)
        a, left_a, scored_a = _scored_answers(run_a, data, split, compared, scoring)
        b, left_b, scored_b = _scored_answers(run_b, data, split, compared, scoring)
        scored = scored_a if scored_a == scored_b else f"A: {scored_a}; B: {scored_b}"
    notes = [note for note in [_classes_note(run_a, run_b, compared, only_a, only_b, left_a | left_b, multi_label)]
             if note]
    a, b = _matched(a, b, run_a, run_b, data, notes)
    comparison = _compared(run_a, run_b, a, b, compared, multi_label, scored, only_a, only_b, notes)
    if notes:
        log.warning("%s", " ".join(notes))
    _write(Path(out) if out is not None else default_folder(run_a, run_b), comparison, config_a, config_b)
    return comparison


def default_folder(run_a: Path, run_b: Path) -> Path:
    """Where a comparison goes without `out`: compare/A-vs-B beside RUN_A (runs/compare/probe-vs-finetuned for
    runs/probe), named by the runs' folders however they were given (`.` included)."""
    names = [Path(os.path.abspath(run)).name for run in (run_a, run_b)]
    parent = run_a.parent if run_a.name not in ("", "..") else Path(os.path.abspath(run_a)).parent
    return parent / "compare" / f"{names[0]}-vs-{names[1]}"


def _kind(run_a: Path, config_a: dict, run_b: Path, config_b: dict) -> bool:
    """Whether both runs are multi-label; a mix cannot be compared (one's label sets against the other's single
    answers measure different things)."""
    kinds = [bool(config["head"].get("multi_label")) for config in (config_a, config_b)]
    if kinds[0] != kinds[1]:
        multi, single = (run_a, run_b) if kinds[0] else (run_b, run_a)
        raise DataError(f"{multi} is a multi-label run and {single} gives one label an image; compare runs of the "
                        "same kind.")
    return kinds[0]


def _shared_classes(run_a: Path, classes_a: list[str], run_b: Path,
                    classes_b: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The classes both runs know (in A's order), and those only A, only B knows."""
    shared = [name for name in classes_a if name in set(classes_b)]
    if not shared:
        raise DataError(f"{run_a} and {run_b} have no class in common ({', '.join(classes_a[:5])} against "
                        f"{', '.join(classes_b[:5])}); there is nothing to compare.")
    return shared, [c for c in classes_a if c not in shared], [c for c in classes_b if c not in shared]


def _thresholds(config: dict) -> np.ndarray | None:
    return stored_thresholds(config.get("thresholds"), config["labels"]) if config["head"].get("multi_label") else None


def _stored_answers(run_a: Path, config_a: dict, run_b: Path, config_b: dict, compared: list[str],
                    split: str) -> tuple[tuple[_Answers, set], tuple[_Answers, set], str]:
    """Both runs' answers from their predictions.csv on the split chosen (see `compare`), each with the images left
    out (see `_comparable`)."""
    if split not in ("auto", "val", "test"):
        raise DataError(f"without --data the runs are compared on the images training evaluated (val or test), not "
                        f"the {split} split; pass --data DATA to score both runs on DATA's {split} split.")
    stored = []
    for run, config in ((run_a, config_a), (run_b, config_b)):
        predictions = read_predictions(run / PREDICTIONS_FILE, config["labels"], _thresholds(config))
        if not predictions:
            raise RunError(f"{run} keeps no predictions (no {PREDICTIONS_FILE}: trained before it was written, or "
                           "without validation images); pass --data DATA to score both runs on the same images.")
        stored.append(predictions)
    for name in ("test", "val") if split == "auto" else (split,):
        if name in stored[0] and name in stored[1] and set(stored[0][name].paths) & set(stored[1][name].paths):
            a, b = (_comparable(_answers(p[name], config["labels"], compared))
                    for p, config in zip(stored, (config_a, config_b)))
            return a, b, f"the {name} split both runs were evaluated on at training"
    held = [" and ".join(sorted(p)) for p in stored]
    asked = "" if split == "auto" else f" in their {split} splits"
    raise DataError(f"{run_a} (evaluated on {held[0]}) and {run_b} (on {held[1]}) share no evaluated images{asked}; "
                    "pass --data DATA to score both runs on the same labelled images.")


def _comparable(answers: _Answers) -> tuple[_Answers, set[tuple[str, str]]]:
    """The images whose true class both runs know (label sets: all), and the (path, class) of those left out."""
    left_out = {(path, name) for path, name, ok in zip(answers.paths, answers.truth_names, answers.comparable)
                if not ok}
    return answers.take(np.flatnonzero(answers.comparable)), left_out


def _scored_answers(run: Path, data: str | Path, split: str, compared: list[str],
                    scoring: dict) -> tuple[_Answers, set[tuple[str, str]], str]:
    """RUN's answers on DATA's `split` through the feature cache, the (path, class) of the images left out (one
    label an image: those of classes not compared, never scored) and which images were scored, in words.

    `evaluate()`'s steps, not `evaluate()` itself: that refuses DATA with a class the run does not know, where a
    comparison of runs with different classes leaves those images out, and it would score images no comparison
    uses. `scoring`: cache_dir, use_cache, batch_size, workers, progress and the engine options."""
    from transferkit.classifier import Classifier

    options = dict(scoring)
    extraction = {key: options.pop(key) for key in ("use_cache", "batch_size", "workers", "progress")}
    classifier = Classifier.load(run, **options)
    _, samples, chosen, own = split_samples(classifier, data, split)
    left_out = set()
    if not classifier.multi_label:
        left_out = {(str(s.path), s.label) for s in samples if s.label not in compared}
        samples = [s for s in samples if s.label in compared]
    log.info("scoring %s on %s", run, plural(len(samples), "image"))
    (raw, _), kept, _ = classifier.outputs_of_files([s.path for s in samples], cache_dir=options.get("cache_dir"),
                                                    calibrated=False, **extraction)
    probabilities = classifier.calibration.apply(raw)
    paths = [str(samples[i].path) for i in kept]
    if classifier.multi_label:
        targets = label_matrix([samples[i].labels for i in kept], classifier.classes)
        predictions = LabelSetPredictions(chosen, paths, targets, probabilities, classifier.thresholds)
    else:
        index = {name: i for i, name in enumerate(classifier.classes)}
        targets = np.array([index[samples[i].label] for i in kept], dtype=np.int64)
        predictions = Predictions.from_probabilities(chosen, paths, targets, probabilities)
    return _answers(predictions, classifier.classes, compared), left_out, _scored(data, chosen, len(samples), own)


def _classes_note(run_a: Path, run_b: Path, compared: list[str], only_a: list[str], only_b: list[str],
                  left_out: set[tuple[str, str]], multi_label: bool) -> str:
    """The sentence that says which classes the comparison leaves out and how many images that costs ("" when
    nothing is left out): classes only one run knows, and classes of the data that neither knows."""
    counts: dict[str, int] = {}
    for _, name in left_out:
        counts[name] = counts.get(name, 0) + 1
    neither = sorted(set(counts) - set(only_a) - set(only_b))
    if not (only_a or only_b or neither):
        return ""

    def named(names: list[str]) -> str:
        return ", ".join(f"{plural(counts[name], 'image')} of {name}" if name in counts else name for name in names)

    parts = [f"{named(names)} ({where})" for names, where in
             ((only_a, f"only in {run_a}"), (only_b, f"only in {run_b}"), (neither, "in neither run")) if names]
    kind = "labels" if multi_label else "classes"
    shared = ", ".join(compared[:10]) + (", ..." if len(compared) > 10 else "")
    head = (f"{run_a} and {run_b} have different {kind}: compared on the {len(compared)} they share ({shared})"
            if only_a or only_b else f"Compared on the {kind} both runs know")
    return f"{head}; left out {'; '.join(parts)}."


def _matched(answers_a: _Answers, answers_b: _Answers, run_a: Path, run_b: Path, data, notes: list[str]):
    """Both runs' answers on the images both have (in A's order), whose truths agree."""
    where = {path: i for i, path in enumerate(answers_b.paths)}
    rows_a = [i for i, path in enumerate(answers_a.paths) if path in where]
    if not rows_a:
        hint = "pass --data DATA to score both runs on the same labelled images" if data is None else \
            "the runs scored different images of DATA (split differently); pick one with --split"
        raise DataError(f"{run_a} and {run_b} share no images to compare; {hint}.")
    rows_b = [where[answers_a.paths[i]] for i in rows_a]
    unmatched = len(answers_a.paths) + len(answers_b.paths) - 2 * len(rows_a)
    if unmatched:
        notes.append(f"Compared on the {plural(len(rows_a), 'image')} both runs scored ({run_a}: "
                     f"{len(answers_a.paths)}, {run_b}: {len(answers_b.paths)}).")
    a, b = answers_a.take(rows_a), answers_b.take(rows_b)
    agree = np.array([x == y for x, y in zip(a.truth_names, b.truth_names)], dtype=bool)
    if not agree.all():
        notes.append(f"Left out {plural(int((~agree).sum()), 'image')} labelled differently in the two runs' "
                     f"predictions (e.g. {a.paths[int(np.argmin(agree))]}).")
    if not agree.any():
        raise DataError(f"{run_a} and {run_b} label every image they share differently; compare runs trained on the "
                        "same labels, or pass --data DATA.")
    return a.take(np.flatnonzero(agree)), b.take(np.flatnonzero(agree))


def _compared(run_a: Path, run_b: Path, a: _Answers, b: _Answers, compared: list[str], multi_label: bool,
              scored: str, only_a: list[str], only_b: list[str], notes: list[str]) -> Comparison:
    right_a, right_b = a.correct, b.correct
    per_class = []
    for k, name in enumerate(compared):
        if multi_label:  # every image's decision on the label
            rows = np.ones(len(a.paths), dtype=bool)
            hits_a, hits_b = a.predicted[:, k] == a.truth[:, k], b.predicted[:, k] == b.truth[:, k]
        else:
            rows = a.truth[:, k]
            hits_a, hits_b = right_a, right_b
        support = int(a.truth[:, k].sum())
        per_class.append(ClassRow(name, support, float(hits_a[rows].mean()) if rows.any() else None,
                                  float(hits_b[rows].mean()) if rows.any() else None))
    a_only = _disagreements(a, b, right_a & ~right_b, b)
    b_only = _disagreements(a, b, right_b & ~right_a, a)
    return Comparison(run_a, run_b, _names(run_a, run_b), scored, multi_label, len(a.paths), int(right_a.sum()),
                      int(right_b.sum()), a_only, b_only, mcnemar_p(len(a_only), len(b_only)), per_class, only_a,
                      only_b, notes)


def _disagreements(a: _Answers, b: _Answers, mask: np.ndarray, wrong: _Answers) -> list[Disagreement]:
    """The images in `mask`, the most confident mistakes of the `wrong` run first (label sets: in image order)."""
    rows = np.flatnonzero(mask)
    sureness = np.nan_to_num(wrong.confidence[rows], nan=0.0)
    rows = rows[np.argsort(-sureness, kind="stable")]
    return [Disagreement(a.paths[i], a.truth_names[i], a.said[i], b.said[i]) for i in rows]


def _names(run_a: Path, run_b: Path) -> tuple[str, str]:
    """How the table and page call the runs: their folder names, with as many parent folders as tell them apart."""
    parts_a, parts_b = Path(os.path.abspath(run_a)).parts, Path(os.path.abspath(run_b)).parts
    for depth in range(1, max(len(parts_a), len(parts_b)) + 1):
        name_a, name_b = "/".join(parts_a[-depth:]), "/".join(parts_b[-depth:])
        if name_a != name_b:
            return name_a, name_b
    return f"{run_a.name} (A)", f"{run_b.name} (B)"


# ------------------------------------------------------------------------------------------------------ the page


def plot_class_accuracy(rows: list[ClassRow], names: tuple[str, str], path: Path, measure: str = "accuracy") -> Path:
    """Each class's accuracy for A and B as pairs of horizontal bars; the CHART_CLASSES classes whose accuracies
    differ most when there are more."""
    shown = [row for row in rows if row.difference is not None]
    note = ""
    if len(shown) > CHART_CLASSES:
        shown = sorted(shown, key=lambda row: -abs(row.difference))[:CHART_CLASSES]
        note = f" ({CHART_CLASSES} of {len(rows)} classes: those that differ most)"
    figure = plots._figure(7.5, min(max(2.6, 0.5 * len(shown) + 1.6), 18))
    axes = figure.add_subplot()
    where = np.arange(len(shown))
    for offset, key, name, colour in ((-0.2, "accuracy_a", names[0], "C0"), (0.2, "accuracy_b", names[1], "C1")):
        values = [getattr(row, key) for row in shown]
        bars = axes.barh(where + offset, values, height=0.4, color=colour, label=f"{'AB'[offset > 0]}: {name}")
        if len(shown) <= 15:
            axes.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2, fontsize=7)
    axes.set_yticks(where, [plots._short(row.name) for row in shown], fontsize=9 if len(shown) <= 15 else 7)
    axes.invert_yaxis()
    axes.set(xlim=(0, 1.12), xlabel=measure, title=f"{measure.capitalize()} per class{note}")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14 if len(shown) > 4 else -0.3), ncol=2, fontsize=8)
    axes.grid(axis="x", alpha=0.3)
    return plots._save(figure, path)


def _write(folder: Path, comparison: Comparison, config_a: dict, config_b: dict) -> Path:
    """compare.json, the pictures and compare.html in `folder`, each file written whole or not at all; the page
    last, so that it never shows pictures of an earlier comparison."""
    from transferkit.backbone import Preprocessing

    assets = folder / ASSETS
    try:
        assets.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"cannot create {assets}: {err.strerror or err}; choose a writable --out.") from err
    page = folder / PAGE
    comparison.page = page
    pictures = _Pictures(assets)
    measure = "per-label accuracy" if comparison.multi_label else "accuracy"
    pictures.add("class_accuracy", f"{measure.capitalize()} per class",
                 lambda path: plot_class_accuracy(comparison.per_class, comparison.names, path, measure))
    preprocessing = Preprocessing.from_dict(config_a["preprocessing"])
    for key, title, shown, (first, second) in zip(GRIDS, ("A right, B wrong", "B right, A wrong"),
                                                  (comparison.a_only, comparison.b_only),
                                                  ((RIGHT, WRONG), (WRONG, RIGHT))):
        rows = shown[:GRID_IMAGES]
        if rows:
            pictures.add(key, title, lambda path, rows=rows, first=first, second=second: plots.plot_label_grid(
                [_view(row.path, preprocessing) for row in rows],
                [[(f"A: {row.answer_a}", first), (f"B: {row.answer_b}", second)] for row in rows], path))
    for key in PICTURES:
        if key not in pictures.figures:
            (assets / f"{key}.png").unlink(missing_ok=True)  # left from an earlier comparison in this folder
    numbers = json.dumps(comparison.to_dict(), indent=2, allow_nan=False) + "\n"
    write_atomically(folder / NUMBERS, lambda temporary: temporary.write_text(numbers, encoding="utf-8"))
    html = render_template("compare.html", c=comparison, runs=[_run_summary(config_a), _run_summary(config_b)],
                           figures=pictures.figures, grid_images=GRID_IMAGES, table_rows=TABLE_ROWS, right=RIGHT,
                           wrong=WRONG, measure=measure, alpha=ALPHA)
    write_atomically(page, lambda temporary: temporary.write_text(html, encoding="utf-8"))
    return page


def _run_summary(config: dict) -> dict:
    """What the page says of each run: how it was trained."""
    options = config.get("train", {})
    return {"mode": config.get("mode", "probe"), "backbone": config["backbone"].get("name", "?"),
            "head": config["head"].get("kind", "?"), "epochs": options.get("epochs"),
            "image_size": "×".join(map(str, config["preprocessing"].get("input_size", []))),
            "data": config["data"].get("source"), "classes": len(config["labels"])}
