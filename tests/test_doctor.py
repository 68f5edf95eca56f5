"""`transferkit doctor` on a dataset with planted problems, and on the real hymenoptera set."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from transferkit.doctor import diagnose

from conftest import CLASS_STYLES, draw_sample, make_image_folder


@pytest.fixture
def messy(tmp_path):
    """train/ + val/ of the synthetic shapes, with one of each problem planted."""
    root = tmp_path / "messy"
    make_image_folder(root / "train", per_class=14, seed=1)
    make_image_folder(root / "val", per_class=5, seed=2)
    train = root / "train"
    (train / "circles" / "empty.jpg").write_bytes(b"")
    (train / "circles" / "notes.jpg").write_text("not a picture")
    rng = np.random.default_rng(7)
    draw_sample("ellipse", CLASS_STYLES["circles"][1], rng).save(train / "circles" / "really_png.jpg", format="PNG")
    frames = [draw_sample("ellipse", CLASS_STYLES["circles"][1], rng) for _ in range(3)]
    frames[0].save(train / "circles" / "moving.gif", save_all=True, append_images=frames[1:])
    draw_sample("rectangle", CLASS_STYLES["squares"][1], rng, size=96).resize((20, 20)).save(
        train / "squares" / "tiny.png")
    Image.fromarray(np.full((40, 400, 3), 128, np.uint8)).save(train / "squares" / "banner.png")
    shutil.copy(train / "stripes" / "stripes_1_000.jpg", root / "val" / "stripes" / "copied.jpg")  # exact leak
    with Image.open(train / "squares" / "squares_1_001.jpg") as image:  # near-duplicate leak: edited, re-encoded
        ImageEnhance.Brightness(image).enhance(1.05).save(root / "val" / "squares" / "resaved.jpg", quality=95)
    draw_sample("ellipse", CLASS_STYLES["circles"][1], rng).save(train / "stripes" / "mislabelled.jpg")
    return root


def test_doctor_finds_each_planted_problem(messy, cache_dir):
    report = diagnose(messy, cache_dir=cache_dir, progress=False)
    by_kind = {kind: [f.path.split("/messy/")[-1] for f in report.of_kind(kind)] for kind in report.totals()}
    assert set(by_kind["unreadable"]) == {"train/circles/empty.jpg", "train/circles/notes.jpg"}
    assert by_kind["wrong_extension"] == ["train/circles/really_png.jpg"]
    assert by_kind["animated"] == ["train/circles/moving.gif"]
    assert by_kind["tiny"] == ["train/squares/tiny.png"]
    assert by_kind["extreme_aspect"] == ["train/squares/banner.png"]
    assert by_kind["leak_exact"] == ["val/stripes/copied.jpg"]
    planted = frozenset((str(messy / "train" / "squares" / "squares_1_001.jpg"),
                         str(messy / "val" / "squares" / "resaved.jpg")))
    assert planted in {frozenset((f.path, f.other)) for f in report.of_kind("leak_near")}
    assert "train/stripes/mislabelled.jpg" in by_kind.get("label_error", []) + by_kind.get("outlier", [])
    ranked = [f.kind for f in report.findings]
    assert ranked.index("leak_exact") < ranked.index("tiny")  # worst kinds first
    assert report.summary().startswith("doctor: ") and "1 exact duplicates across splits" in report.summary()


def test_a_clean_set_gets_no_label_error_finding(tmp_path, cache_dir):
    """Precision, not only recall: flagging every image would find the planted ones too."""
    root = tmp_path / "clean"
    make_image_folder(root / "train", per_class=14, seed=1)
    make_image_folder(root / "val", per_class=5, seed=2)
    report = diagnose(root, cache_dir=cache_dir, progress=False)
    assert report.of_kind("label_error") == [] and report.of_kind("unreadable") == []
    assert report.of_kind("leak_exact") == []


def test_doctor_reads_only_files_that_changed_since_its_last_run(messy, tmp_path, monkeypatch):
    import transferkit.doctor

    reads = []
    real_read = transferkit.doctor.read_file_and_stat
    monkeypatch.setattr(transferkit.doctor, "read_file_and_stat", lambda path: reads.append(path) or real_read(path))
    first = diagnose(messy, cache_dir=tmp_path / "cache", use_features=False)
    files = len(reads)
    second = diagnose(messy, cache_dir=tmp_path / "cache", use_features=False)
    assert files == 3 * 14 + 3 * 5 + 9 and len(reads) == files  # nothing read again
    assert second.findings == first.findings

    banner = messy / "train" / "squares" / "banner.png"
    banner.write_bytes(banner.read_bytes()[:100])
    third = diagnose(messy, cache_dir=tmp_path / "cache", use_features=False)
    assert reads[files:] == [banner]
    assert str(banner) in [f.path for f in third.of_kind("unreadable")]


@pytest.mark.slow
def test_doctor_command_writes_json_and_html(messy, tmp_path, cache_dir):
    page = tmp_path / "doctor.html"
    done = subprocess.run([sys.executable, "-m", "transferkit", "doctor", str(messy), "--json", "--report",
                           str(page), "--cache-dir", str(cache_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["totals"]["unreadable"] == 2 and result["classes"] == ["circles", "squares", "stripes"]
    html = page.read_text()
    assert "Exact duplicates across splits (leakage)" in html and html.count("data:image/jpeg;base64,") >= 5


@pytest.mark.slow
def test_doctor_flags_the_placeholder_in_hymenoptera(hymenoptera, tmp_path, cache_dir):
    report = diagnose(hymenoptera, cache_dir=cache_dir, progress=False)
    flagged = [f.path for f in report.findings]
    assert str(hymenoptera / "train" / "ants" / "imageNotFound.gif") in flagged
    assert report.of_kind("outlier")[0].path.endswith("imageNotFound.gif")  # the most striking outlier


@pytest.mark.slow
def test_train_prints_the_doctor_summary_first(messy, tmp_path, cache_dir):
    command = [sys.executable, "-m", "transferkit", "train", str(messy), "--image-size", "96", "--no-report",
               "--cache-dir", str(cache_dir)]
    checked = subprocess.run([*command, "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    summary = next(line for line in checked.stderr.splitlines() if line.startswith("doctor: "))
    assert "2 unreadable files" in summary and "1 exact duplicates across splits" in summary
    assert checked.stderr.index("doctor: ") < checked.stderr.index("skipped")  # before training's own report
    quiet = subprocess.run([*command, "--out", str(tmp_path / "b"), "--no-doctor"], capture_output=True, text=True)
    assert quiet.returncode == 0 and "doctor: " not in quiet.stderr
