"""Tables as data: a pandas DataFrame of paths or bytes, and a Hugging Face `datasets.Dataset` with an Image feature and
a ClassLabel, passed straight to load_dataset and transferkit.train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import transferkit
from conftest import fresh_cache, make_image_folder
from transferkit.data import load_dataset, read_item
from transferkit.errors import DataError


@pytest.fixture
def shapes(tmp_path) -> Path:
    return make_image_folder(tmp_path / "shapes", per_class=8)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


def _as_names(dataset) -> dict[str, dict[str, str]]:
    return {split: sorted(s.label for s in samples) for split, samples in dataset.splits.items()}


def test_a_dataframe_of_paths_and_one_of_bytes_read_like_the_folder(shapes):
    files = _files(shapes)
    labels = [p.parent.name for p in files]
    of_paths = pd.DataFrame({"filepath": [str(p) for p in files], "species": labels, "split": ["train"] * len(files)})
    dataset = load_dataset(pd.DataFrame({"path": [str(p) for p in files], "label": labels}))
    folder = load_dataset(shapes)
    assert dataset.classes == folder.classes
    assert {s.path: s.label for v in dataset.splits.values() for s in v} == \
        {s.path: s.label for v in folder.splits.values() for s in v}
    of_bytes = pd.DataFrame({"image": [p.read_bytes() for p in files], "target": labels})
    held = load_dataset(of_bytes, val_percent=0, test_percent=0)
    rows = held.splits["train"]
    assert [s.label for s in rows] == labels
    assert read_item(rows[3].path) == files[3].read_bytes() and str(rows[3].path).startswith("table://")
    named = transferkit.tables.register(of_paths, image_column="filepath", label_column="species")
    assert "test" not in load_dataset(named).splits  # the split column says train: nothing is carved for testing


def test_missing_or_unknown_columns_are_one_line(shapes):
    files = _files(shapes)
    frame = pd.DataFrame({"picture": [str(p) for p in files], "kind": [p.parent.name for p in files]})
    with pytest.raises(DataError, match="no image column .*its columns are picture, kind.*image_column="):
        load_dataset(frame)
    with pytest.raises(DataError, match="no column 'species' for the label column"):
        transferkit.tables.register(frame, image_column="picture", label_column="species")
    with pytest.raises(DataError, match="row 0 of column 'picture' holds float"):
        transferkit.tables.register(pd.DataFrame({"picture": [1.5], "kind": ["a"]}), image_column="picture",
                                    label_column="kind")
    with pytest.raises(DataError, match="row 1 of the table's split column: unknown split 'tset'"):
        load_dataset(pd.DataFrame({"path": [str(p) for p in files[:2]], "label": ["a", "b"],
                                   "split": ["train", "tset"]}))
    given = load_dataset(pd.DataFrame({"path": [str(p) for p in files[:3]], "label": ["a", "b", "a"],
                                       "split": ["train", None, "validation"]}), val_percent=0)
    assert [len(given.splits[name]) for name in ("train", "val")] == [2, 1]  # no split given: train
    with pytest.raises(DataError, match="name the columns of a DataFrame"):
        transferkit.train(shapes, label_column="kind")


def test_a_datasets_table_with_an_image_feature_and_class_labels(shapes):
    datasets = pytest.importorskip("datasets")
    files = _files(shapes)
    names = sorted({p.parent.name for p in files})
    embedded = datasets.Dataset.from_dict(  # the images held in the table, as hub datasets hold them
        {"image": [{"bytes": p.read_bytes(), "path": None} for p in files],
         "label": [names.index(p.parent.name) for p in files]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}))
    dataset = load_dataset(embedded, val_percent=0, test_percent=0)
    assert dataset.classes == names
    assert [s.label for s in dataset.splits["train"]] == [p.parent.name for p in files]
    assert read_item(dataset.splits["train"][5].path) == files[5].read_bytes()


@pytest.mark.slow
def test_training_on_a_dataframe_of_bytes_gives_the_folder_model(shapes, tmp_path):
    from safetensors.numpy import load_file

    files = _files(shapes)
    frame = pd.DataFrame({"jpeg": [p.read_bytes() for p in files], "name": [p.name for p in files],
                          "cls": [p.parent.name for p in files]})
    options = dict(report=False, doctor=False, progress=False, image_size=96, val_percent=0, test_percent=0)
    table = transferkit.train(frame, image_column="jpeg", label_column="cls", out=tmp_path / "runs" / "table",
                              cache_dir=str(fresh_cache(tmp_path / "c1")), **options)
    folder = transferkit.train(shapes, out=tmp_path / "runs" / "folder", cache_dir=str(fresh_cache(tmp_path / "c2")),
                               **options)
    assert table.images == folder.images and table.metrics == folder.metrics
    a, b = load_file(str(tmp_path / "runs" / "table" / "model.safetensors")), \
        load_file(str(tmp_path / "runs" / "folder" / "model.safetensors"))
    for name in b:
        np.testing.assert_allclose(a[name], b[name], atol=1e-4)
