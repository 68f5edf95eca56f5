"""Dataset discovery, stable splits and safe decoding of messy image files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.data import ImageDecodeError, decode_image, hash_split, load_dataset
from transferkit.errors import DataError


def _bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- splits


def test_hash_split_is_stable_when_files_are_added():
    names = [f"img_{i}.jpg" for i in range(2000)]
    before = {n: hash_split(n, 10, 10) for n in names}
    more = names + [f"new_{i}.jpg" for i in range(500)]
    after = {n: hash_split(n, 10, 10) for n in more}
    assert all(after[n] == before[n] for n in names)
    shares = {s: sum(v == s for v in before.values()) / len(names) for s in ("train", "val", "test")}
    assert abs(shares["val"] - 0.10) < 0.03 and abs(shares["test"] - 0.10) < 0.03


def test_hash_split_ignores_nohash_suffix():
    assert len({hash_split(f"dog_nohash_{i}.jpg", 30, 30) for i in range(50)}) == 1


def test_flat_folder_is_split_by_hash(image_folder):
    dataset = load_dataset(image_folder, val_percent=30, test_percent=30)
    assert dataset.classes == ["circles", "squares", "stripes"]
    paths = [s.path for split in dataset.splits.values() for s in split]
    assert len(paths) == len(set(paths)) == 36
    # retrain.py's rule (SHA-1 of the name), fixed across versions: a file never changes split when transferkit does
    split_of = {s.path.name: name for name, samples in dataset.splits.items() for s in samples}
    assert [split_of[n] for n in ("circles_0_000.jpg", "circles_0_001.jpg", "squares_0_005.jpg",
                                  "stripes_0_011.jpg")] == ["train", "val", "test", "val"]
    assert [hash_split(n, 30, 30) for n in ("IMG_1234.JPG", "dog_nohash_3.jpg", "猫.png", "a b.jpg")] == [
        "test", "train", "val", "train"]


def test_train_val_layout_and_explicit_val(split_folder, tmp_path):
    dataset = load_dataset(split_folder)
    assert set(dataset.splits) == {"train", "val"}
    assert len(dataset.splits["train"]) == 36 and len(dataset.splits["val"]) == 15
    explicit = load_dataset(split_folder / "train", val=split_folder / "val", test_percent=0)
    assert [s.path for s in explicit.splits["val"]] == [s.path for s in dataset.splits["val"]]
    assert len(explicit.splits["train"]) == 36


def test_csv_with_quotes_header_and_integer_labels(image_folder, tmp_path):
    files = sorted(image_folder.glob("*/*.jpg"))
    rows = [f"'{p.relative_to(image_folder)}','{['circles', 'squares', 'stripes'].index(p.parent.name) * 5}'"
            for p in files]
    csv_path = image_folder / "labels.csv"
    csv_path.write_text("'path','label'\n" + "\n".join(rows) + "\n")
    dataset = load_dataset(csv_path, val_percent=0, test_percent=0)
    assert dataset.classes == ["0", "5", "10"]  # numeric ids sort numerically
    assert len(dataset.splits["train"]) == 36
    no_header = tmp_path / "plain.csv"
    no_header.write_text("\n".join(f'"{p}",{p.parent.name}' for p in files))
    assert load_dataset(no_header, val_percent=0, test_percent=0).classes == ["circles", "squares", "stripes"]


def test_missing_and_malformed_csv_rows_are_reported(image_folder):
    csv_path = image_folder / "labels.csv"
    good = sorted(image_folder.glob("*/*.jpg"))
    csv_path.write_text("\n".join([f"{p},{p.parent.name}" for p in good] + ["only_a_path.jpg", "notes.txt,circles"]))
    dataset = load_dataset(csv_path, val_percent=0, test_percent=0)
    reasons = " ".join(s.reason for s in dataset.skipped)
    assert "expected path,label" in reasons and "not an image file type" in reasons


@pytest.mark.parametrize("problem, message", [
    ("empty_class", "no images"), ("one_class", "at least 2"), ("missing", "does not exist"),
    ("val_unknown_class", "no training images"),
])
def test_bad_datasets_fail_before_any_work(tmp_path, image_folder, problem, message):
    data = image_folder
    val = None
    if problem == "empty_class":
        (image_folder / "empty").mkdir()
    elif problem == "one_class":
        data = tmp_path / "single"
        (data / "only").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(data / "only" / "a.png")
    elif problem == "missing":
        data = tmp_path / "nowhere"
    else:
        val = tmp_path / "val"
        (val / "unicorns").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(val / "unicorns" / "u.png")
    with pytest.raises(DataError, match=message):
        load_dataset(data, val=val)


def test_non_image_files_are_listed_as_skipped(image_folder):
    (image_folder / "circles" / "notes.txt").write_text("hello")
    (image_folder / "circles" / ".DS_Store").write_bytes(b"\0")
    dataset = load_dataset(image_folder)
    assert [Path(s.path).name for s in dataset.skipped] == ["notes.txt"]


# ---------------------------------------------------------------------------------------------- decoding


def test_corrupt_inputs_raise_a_reason():
    jpeg = _bytes(Image.new("RGB", (64, 64), "red"), "JPEG")
    cases = {"empty file": b"", "not an image": b"this is text, not a JPEG\n" * 10,
             "corrupt or truncated": jpeg[: len(jpeg) // 2], "not an image|corrupt": jpeg[:20] + b"\0" * 400}
    for expected, data in cases.items():
        with pytest.raises(ImageDecodeError, match=expected):
            decode_image(data)


def test_decompression_bomb_is_rejected():
    big = _bytes(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(big, max_pixels=1_000_000)


def test_modes_become_correct_rgb():
    cmyk = decode_image(_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    r, g, b = cmyk.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 100%, 100%, 0) is red

    sixteen = Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16))
    gray = decode_image(_bytes(sixteen, "PNG")).getpixel((0, 0))
    assert gray[0] == gray[1] == gray[2] and 120 <= gray[0] <= 135  # scaled, not clipped to 255

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert decode_image(_bytes(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert decode_image(_bytes(palette, "GIF")).getpixel((0, 0)) == (10, 200, 30)

    assert decode_image(_bytes(Image.new("L", (8, 8), 77), "BMP")).mode == "RGB"
    for fmt in ("WEBP", "TIFF"):
        assert decode_image(_bytes(Image.new("RGB", (8, 8), "blue"), fmt)).size == (8, 8)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    upright = decode_image(_bytes(image, "JPEG", exif=exif, quality=95))
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 3))[0] > 200 and upright.getpixel((10, 3))[1] < 80  # left band is now on top


def test_jpeg_draft_keeps_at_least_the_requested_size():
    big = _bytes(Image.new("RGB", (4000, 3000), "green"), "JPEG")
    small = decode_image(big, draft_size=(320, 320))
    assert 320 <= min(small.size) < 1500
