"""In-memory tables as data: a pandas DataFrame, or a Hugging Face `datasets.Dataset` with an Image feature.

A table is registered once per process and named `table://TOKEN`; its rows are `table://TOKEN/ROW` wherever an image
path goes. Images given as paths or URLs are read from there; images held in the table (bytes, or a `datasets` Image
feature) are read row by row when needed, so a memory-mapped `datasets` table is never copied into memory whole.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable

from transferkit.errors import DataError

PREFIX = "table://"
IMAGE_COLUMNS = ("image", "img", "path", "file", "filepath", "file_name", "filename", "url", "image_path", "bytes")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "tags", "y")
SPLIT_COLUMNS = ("split", "subset", "fold")


@dataclass
class Table:
    """A registered table: per row, where its image is (a path / URL, or None when the table holds the bytes) and its
    label(s); `read(row)` gives the bytes a row holds."""

    name: str
    images: list[str | None]
    labels: list[str | tuple[str, ...]]
    splits: list[str | None]
    read: Callable[[int], bytes]
    description: str


_tables: dict[str, Table] = {}


def is_table(data: object) -> bool:
    """A pandas DataFrame or a `datasets.Dataset` (checked by type name: neither library is imported for it)."""
    names = {f"{cls.__module__.split('.')[0]}.{cls.__name__}" for cls in type(data).__mro__}
    return bool(names & {"pandas.DataFrame", "datasets.Dataset"})


def is_row(item: object) -> bool:
    return isinstance(item, str) and item.startswith(PREFIX) and item.count("/") == 3


def _column(given: str | None, columns: list[str], candidates: tuple[str, ...], what: str) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(f"the table has no column {given!r} for the {what}; its columns are "
                            f"{', '.join(map(str, columns))}.")
        return given
    found = next((c for c in columns if str(c).lower() in candidates), None)
    if found is None:
        raise DataError(f"the table has no {what} column (looked for {', '.join(candidates[:6])}, ...; its columns are "
                        f"{', '.join(map(str, columns))}); name it with {what.split()[0]}_column=.")
    return found


def _label(value: Any, names: list[str] | None) -> str | tuple[str, ...]:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        return tuple(names[int(v)] if names else str(v) for v in value)
    if names is not None:
        return names[int(value)]
    return str(value).strip()


def register(data: Any, image_column: str | None = None, label_column: str | None = None,
             split_column: str | None = None) -> str:
    """Register a DataFrame or `datasets.Dataset` for this process; its name (`table://TOKEN`), which
    `data.load_dataset` reads like a folder. Columns are found by name unless given."""
    if type(data).__name__ == "Dataset" and hasattr(data, "features"):
        table = _from_datasets(data, image_column, label_column, split_column)
    else:
        table = _from_frame(data, image_column, label_column, split_column)
    _tables[table.name] = table
    return PREFIX + table.name


def _image_value(value: Any, row: int, column: str) -> tuple[str | None, bytes | None]:
    """A cell as (path or URL, None) or (None, bytes)."""
    if isinstance(value, dict):  # a `datasets` Image cell: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return None, bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None, bytes(value)
    if isinstance(value, str) and value.strip():
        return value.strip(), None
    raise DataError(f"row {row} of column {column!r} holds {type(value).__name__}, not an image path, URL or "
                    "encoded image bytes.")


def _from_frame(frame: Any, image_column: str | None, label_column: str | None, split_column: str | None) -> Table:
    columns = list(frame.columns)
    image = _column(image_column, columns, IMAGE_COLUMNS, "image column")
    label = _column(label_column, columns, LABEL_COLUMNS, "label column")
    split = split_column if split_column else next((c for c in columns if str(c).lower() in SPLIT_COLUMNS), None)
    if split is not None and split not in columns:
        raise DataError(f"the table has no column {split!r} for the split; its columns are "
                        f"{', '.join(map(str, columns))}.")
    cells = [_image_value(value, i, image) for i, value in enumerate(frame[image].tolist())]
    held = {i: data for i, (_, data) in enumerate(cells) if data is not None}
    return Table(uuid.uuid4().hex[:12], [path for path, _ in cells],
                 [_label(value, None) for value in frame[label].tolist()],
                 [None if value is None or value != value else str(value)  # None / NaN: no split given
                  for value in (frame[split].tolist() if split else [None] * len(frame))],
                 held.__getitem__, f"a DataFrame of {len(frame)} rows")


def _from_datasets(dataset: Any, image_column: str | None, label_column: str | None,
                   split_column: str | None) -> Table:
    import datasets

    columns = list(dataset.column_names)
    image = image_column or next((name for name, feature in dataset.features.items()
                                  if isinstance(feature, datasets.Image)), None)
    image = _column(image, columns, IMAGE_COLUMNS, "image column")
    label = _column(label_column, columns, LABEL_COLUMNS, "label column")
    feature = dataset.features[label]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else \
        getattr(getattr(feature, "feature", None), "names", None)  # Sequence(ClassLabel): several labels an image
    raw = dataset.cast_column(image, datasets.Image(decode=False)) \
        if isinstance(dataset.features[image], datasets.Image) else dataset
    cells = raw.select_columns([image])
    paths: list[str | None] = []  # None where the row holds the bytes; read a batch at a time, never all at once
    for batch in cells.iter(batch_size=1000):
        paths += [_image_value(value, len(paths) + i, image)[0] for i, value in enumerate(batch[image])]
    splits = [str(v) for v in dataset[split_column]] if split_column else [None] * len(dataset)

    def read(row: int) -> bytes:
        _, data = _image_value(cells[row][image], row, image)
        if data is None:
            raise FileNotFoundError(f"row {row} holds a path, not bytes")
        return data

    return Table(uuid.uuid4().hex[:12], paths, [_label(v, names) for v in dataset[label]], splits, read,
                 f"a datasets.Dataset of {len(dataset)} rows")


def table(name: str) -> Table:
    """The table registered as `table://NAME` in this process, or a one-line DataError."""
    found = _tables.get(name.removeprefix(PREFIX).strip("/"))
    if found is None:
        raise DataError(f"{name} was an in-memory table of another process; pass the DataFrame or Dataset itself "
                        "(in-memory data cannot be resumed or re-read from a run folder).")
    return found


def row_ref(name: str, row: int) -> str:
    return f"{PREFIX}{name}/{row}"


def read_row(ref: str) -> bytes:
    name, row = ref.removeprefix(PREFIX).split("/")
    return table(name).read(int(row))
