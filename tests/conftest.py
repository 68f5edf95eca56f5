"""Shared fixtures: synthetic image sets drawn in the test, and the real hymenoptera set from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image, ImageDraw

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CHROMIUM = Path("/usr/bin/chromium")
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"

# Property tests draw the same examples on every run, so a failure in CI reproduces anywhere; HYPOTHESIS_PROFILE=explore
# draws fresh examples (and more of them) when hunting for new failures.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# Each class is a shape in a colour on a noisy background: easy for ImageNet features, made of real pixels.
CLASS_STYLES = {"circles": ("ellipse", (220, 40, 40)), "squares": ("rectangle", (40, 60, 220)),
                "stripes": ("stripes", (40, 180, 60))}


def draw_sample(style: str, colour: tuple[int, int, int], rng: np.random.Generator, size: int = 96) -> Image.Image:
    background = rng.integers(90, 170, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    if style == "stripes":
        width = int(rng.integers(5, 10))
        for x in range(int(rng.integers(0, width)), size, 2 * width):
            draw.rectangle([x, 0, x + width - 1, size], fill=colour)
    else:
        x0, y0 = rng.integers(5, size // 3, size=2)
        extent = int(rng.integers(size // 2, size - 10))
        getattr(draw, style)([int(x0), int(y0), min(size - 1, int(x0) + extent), min(size - 1, int(y0) + extent)],
                             fill=colour)
    return image


def make_image_folder(root: Path, per_class: int = 12, seed: int = 0, classes=CLASS_STYLES, size: int = 96,
                      ext: str = ".jpg") -> Path:
    rng = np.random.default_rng(seed)
    for name, (style, colour) in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_sample(style, colour, rng, size).save(root / name / f"{name}_{seed}_{i:03d}{ext}", quality=92)
    return root


@pytest.fixture(scope="session", autouse=True)
def private_default_cache(tmp_path_factory):
    """Tests never touch ~/.cache; the ONNX export of the default backbone is made once per test session."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path_factory.mktemp("default-cache")))
        yield


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes x 12 images, flat (no split folders)."""
    return make_image_folder(tmp_path / "shapes")


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """A train/ + val/ layout of the three synthetic classes."""
    root = tmp_path / "layout"
    make_image_folder(root / "train", per_class=12, seed=1)
    make_image_folder(root / "val", per_class=5, seed=2)
    return root


def fresh_cache(folder: Path) -> Path:
    """`folder` as a cache folder with features of its own but the session's ONNX exports of the backbones: one
    export takes 10-20 s here, and every test with its own --cache-dir would otherwise make it again."""
    shared = Path(os.environ["TRANSFERKIT_CACHE_DIR"]) / "onnx"
    shared.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "onnx").exists():
        (folder / "onnx").symlink_to(shared, target_is_directory=True)
    return folder


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return fresh_cache(tmp_path / "cache")


def shared_dataset(name: str) -> Path:
    """A real photo set in ../shared. CI sets TRANSFERKIT_REQUIRE_SHARED, so there a missing folder fails the test
    instead of skipping it."""
    folder = SHARED / "datasets" / name
    if not folder.is_dir():
        if os.environ.get("TRANSFERKIT_REQUIRE_SHARED") == "1":
            pytest.fail(f"{folder} is missing: CI needs ../shared beside the repository")
        pytest.skip(f"real-data test: {folder} is absent (it ships beside the repository in CI)")
    return folder


@pytest.fixture
def hymenoptera() -> Path:
    return shared_dataset("hymenoptera")


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Playwright. CI installs Debian's chromium and sets TRANSFERKIT_REQUIRE_BROWSER,
    so there the test fails rather than skips when the browser is missing."""
    required = os.environ.get("TRANSFERKIT_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("browser test: playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        if required:
            pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
        pytest.skip(f"browser test: {CHROMIUM} is absent (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def mosaics(tmp_path_factory) -> Path:
    """labels.csv of 150 multi-label images: 2x2 mosaics of flowers100 photos, each cell a flower or plain background,
    so an image carries 1-4 of the 5 flower types (benchmarks/multilabel_mosaics.py draws them, fixed seed)."""
    import sys

    source = shared_dataset("flowers100")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from multilabel_mosaics import build_mosaics

    return build_mosaics(tmp_path_factory.mktemp("mosaics"), 150, seed=3, source=source)


@pytest.fixture(scope="session")
def mosaic_run(mosaics, tmp_path_factory) -> Path:
    """A multi-label probe run on `mosaics` (no report), trained once per test session; tests must not change it."""
    import transferkit

    out = tmp_path_factory.mktemp("mosaic-run") / "run"
    transferkit.train(mosaics, out=out, report=False, doctor=False, progress=False,
                      cache_dir=str(tmp_path_factory.mktemp("mosaic-cache")))
    return out


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port for the whole session (tests/s3_server.py)."""
    from s3_server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server's endpoint and credentials in the environment, and a fresh client for it: an s3fs file system
    for putting objects, with transferkit's own per-protocol file systems forgotten so they see this environment."""
    import s3fs

    from transferkit import storage

    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(storage, "_filesystems", {})
    monkeypatch.setattr(storage, "_objects", {})
    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, local artefacts) on a free loopback port for the session
    (tests/mlflow_server.py)."""
    pytest.importorskip("mlflow")
    from mlflow_server import MlflowServer

    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture
def mlflow_uri(mlflow_server, monkeypatch) -> str:
    """The session's MLflow server as the tracking URI of this test (and of the processes it starts)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return mlflow_server.uri
