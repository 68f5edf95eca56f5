"""Property-based tests (hypothesis) of the CSV reader and the split rule. The examples are the same on every run
(conftest.py loads a derandomised profile; HYPOTHESIS_PROFILE=explore draws fresh ones)."""

from __future__ import annotations

import csv
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from transferkit.data import hash_split, load_dataset
from transferkit.errors import DataError

# File names and labels as people write them: letters (any script), digits, spaces, commas, quotes, dashes.
_TEXT = st.text(st.characters(categories=("L", "N"), include_characters=" ,'\"-_()"), min_size=1, max_size=16)
names = _TEXT.map(str.strip).filter(lambda s: s and not s.startswith(".") and "/" not in s)
labels = _TEXT.map(str.strip).filter(bool)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.dictionaries(names, labels, min_size=2, max_size=12), header=st.booleans(),
       quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
@example(rows={"a": "'b'", "c": "d"}, header=False, quoting=csv.QUOTE_MINIMAL)  # a,'b': the label is 'b', quotes kept
@example(rows={"'t Hooft": "x", "b, c": "y"}, header=False, quoting=csv.QUOTE_MINIMAL)
def test_csv_reader_returns_exactly_the_rows_written(rows, header, quoting):
    assume(len(set(rows.values())) >= 2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with (folder / "labels.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, quoting=quoting)
            if header:
                writer.writerow(["path", "label"])
            for name, label in rows.items():
                (folder / f"{name}.jpg").write_bytes(b"")
                writer.writerow([f"{name}.jpg", label])
        dataset = load_dataset(folder / "labels.csv", val_percent=0, test_percent=0)
    read = {s.path.name[:-4]: s.label for samples in dataset.splits.values() for s in samples}
    assert read == rows
    assert sorted(dataset.classes) == sorted(set(rows.values()))


@settings(max_examples=200, deadline=None)
@given(name=names, val=st.floats(0, 49), test=st.floats(0, 49))
def test_a_file_always_lands_in_the_same_single_split(name, val, test):
    first = hash_split(f"{name}.jpg", val, test)
    assert first in ("train", "val", "test")
    assert hash_split(f"some/other/folder/{name}.jpg", val, test) == first  # the name alone decides
    assert hash_split(f"{name}.jpg_nohash_2", val, test) == hash_split(f"{name}.jpg", val, test)


@settings(max_examples=40, deadline=None)
@given(existing=st.sets(names, min_size=1, max_size=30), added=st.sets(names, max_size=30),
       val=st.floats(0, 40), test=st.floats(0, 40))
def test_adding_files_never_moves_old_ones_and_splits_are_disjoint(existing, added, val, test):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        before = _splits(folder, existing, val, test)
        after = _splits(folder, added, val, test)
    assume(before is not None and after is not None)
    assert all(after[path] == part for path, part in before.items())
    assert len(after) == 2 * len(existing | added)


def _splits(folder: Path, new_names: set[str], val: float, test: float) -> dict[str, str] | None:
    """Add `new_names` to both classes of `folder`, then every file's split as `load_dataset` carves it (None when
    no file lands in train, which load_dataset rejects)."""
    for label in ("a", "b"):
        (folder / label).mkdir(exist_ok=True)
        for name in new_names:
            (folder / label / f"{name}.jpg").write_bytes(b"")
    try:
        dataset = load_dataset(folder, val_percent=val, test_percent=test)
    except DataError:
        return None
    assignment: dict[str, str] = {}
    for part, samples in dataset.splits.items():
        for sample in samples:
            assert str(sample.path) not in assignment, "a file in two splits"
            assignment[str(sample.path)] = part
    return assignment


@settings(max_examples=10, deadline=None)
@given(val=st.floats(1, 40), test=st.floats(1, 40))
def test_split_percentages_are_respected(val, test):
    counts = Counter(hash_split(f"image_{i:05d}.jpg", val, test) for i in range(20_000))
    assert abs(100 * counts["val"] / 20_000 - val) < 1.5
    assert abs(100 * counts["test"] / 20_000 - test) < 1.5
