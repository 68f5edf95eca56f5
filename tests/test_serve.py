"""Export (ONNX, TorchScript, int8), the PyTorch-free runtime, and the HTTP server with its page."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import threading
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import transferkit
from transferkit import Classifier, DataError, ExportedClassifier
from transferkit.export import export_run

from conftest import fresh_cache, make_image_folder

REPO = Path(__file__).resolve().parents[1]


# The three shapes in nearly one colour: still told apart every time, but with margins small enough that a
# quantised model's errors show in its probabilities (a per-tensor int8 model moves them 10x more than ours).
SUBTLE = {"circles": ("ellipse", (200, 60, 60)), "squares": ("rectangle", (190, 70, 70)),
          "stripes": ("stripes", (185, 75, 75))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A probe run on the synthetic shapes, and its ONNX export."""
    root = tmp_path_factory.mktemp("serve")
    data = make_image_folder(root / "data" / "train", per_class=10, seed=1, classes=SUBTLE).parent
    make_image_folder(data / "val", per_class=4, seed=2, classes=SUBTLE)
    result = transferkit.train(data, out=root / "run", cache_dir=str(fresh_cache(root / "cache")), progress=False,
                               report=False, image_size=96, workers=2)
    return result.run_dir, export_run(result.run_dir).folder


def _images(run: Path) -> list[Path]:
    return sorted((run.parent / "data" / "val").rglob("*.jpg"))


def test_onnx_export_matches_pytorch_at_any_batch_size(trained):
    run, folder = trained
    assert {p.name for p in folder.iterdir()} == {"model.onnx", "labels.txt", "preprocessing.json", "export.json",
                                                  "novelty.npz"}
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["parity"]["images"] == len(_images(run))  # checked on the run's own images, not synthetic ones
    assert manifest["inputs"]["pixels"] == ["batch", 96, 96, 3]
    preprocessing = json.loads((folder / "preprocessing.json").read_text())
    assert preprocessing["input_size"] == [96, 96] and preprocessing["mean"] == [0.5, 0.5, 0.5]
    images = _images(run)
    exported = ExportedClassifier(folder)
    reference = Classifier.load(run, engine="torch").predict(images, top_k=3)
    for batch_size in (1, 5, 32):
        answers = exported.predict(images, top_k=3, batch_size=batch_size)
        assert [a.labels for a in answers] == [r.labels for r in reference]
        assert np.abs(np.array([a.probabilities for a in answers]) -
                      np.array([r.probabilities for r in reference])).max() <= 1e-4
    probabilities = exported.probabilities(np.zeros((3, 96, 96, 3), np.uint8))
    assert probabilities.shape == (3, 3) and np.allclose(probabilities.sum(1), 1, atol=1e-5)


def _probabilities(predictions) -> np.ndarray:
    """Each image's probabilities in label order."""
    return np.array([[dict(zip(p.labels, p.probabilities))[label] for label in sorted(p.labels)]
                     for p in predictions])


def test_torchscript_export_predicts_like_the_run(trained, tmp_path):
    run, _ = trained
    export_run(run, "torchscript", out=tmp_path / "ts")
    model = torch.jit.load(str(tmp_path / "ts" / "model.pt"))
    classifier = Classifier.load(run, engine="torch")
    images = _images(run)
    pixels = torch.from_numpy(np.stack([classifier.backbone.preprocessing.pixels(Image.open(p).convert("RGB"))
                                        for p in images]))
    with torch.inference_mode():
        scripted = model(pixels).numpy()
    reference = _probabilities(classifier.predict(images, top_k=3))
    assert np.abs(scripted - reference).max() <= 1e-4


@pytest.fixture(scope="module")
def held_out(trained) -> list[Path]:
    """60 more images of the run's classes, none of them seen in training."""
    run, _ = trained
    return sorted(make_image_folder(run.parent / "held-out", per_class=20, seed=9, classes=SUBTLE).rglob("*.jpg"))


def test_int8_export_keeps_the_accuracy(trained, held_out, tmp_path):
    run, folder = trained
    quantized = export_run(run, quantize="int8", out=tmp_path / "int8")
    q = quantized.quantization
    assert quantized.model == "model.int8.onnx" and (tmp_path / "int8" / "model.int8.onnx").is_file()
    assert q["size_ratio"] < 0.5 and q["validation_images"] == 12 and q["calibration_images"] > 0
    answers = ExportedClassifier(tmp_path / "int8").predict(_images(run), top_k=1)
    assert np.mean([a.label == Path(a.source).parent.name for a in answers]) == pytest.approx(q["accuracy_int8"])

    # on images the run never saw: int8 gives the fp32 answers, to within one image in 60, and nearly the same
    # probabilities (measured: 0.0012 apart on average; calibrated on noise 0.20, per-tensor weights 0.012, which
    # costs 9 points of accuracy on hymenoptera)
    int8 = ExportedClassifier(tmp_path / "int8").predict(held_out, top_k=3)
    fp32 = ExportedClassifier(folder).predict(held_out, top_k=3)
    truth = [p.parent.name for p in held_out]
    accuracy = {name: np.mean([a.label == t for a, t in zip(answers, truth)]) for name, answers in
                (("int8", int8), ("fp32", fp32))}
    assert accuracy["int8"] >= accuracy["fp32"] - 1 / 60, accuracy
    assert np.mean([a.label == b.label for a, b in zip(int8, fp32)]) >= 59 / 60
    assert np.abs(_probabilities(int8) - _probabilities(fp32)).mean() <= 0.004


def test_export_refuses_bad_options(trained, tmp_path):
    run, _ = trained
    with pytest.raises(DataError, match="needs --format onnx"):
        export_run(run, "torchscript", quantize="int8", out=tmp_path / "bad")
    done = subprocess.run([sys.executable, "-m", "transferkit", "export", str(run), "--format", "tflite"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "'tflite' is not one of 'onnx', 'torchscript'" in done.stderr


def _start_server(command: list[str]) -> tuple[subprocess.Popen, str]:
    """`transferkit serve ... --port 0`: the server takes a free port and prints its address, read here."""
    process = subprocess.Popen([*command, "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        found = re.search(r"at (http://127\.0\.0\.1:\d+) \(the page\), \1/docs \(the API\)", line)
        if found:
            return process, found.group(1)
    process.kill()
    pytest.fail(f"the server did not start: {''.join(lines)[-2000:]}")


@pytest.fixture(scope="module")
def server(trained):
    _, folder = trained
    process, url = _start_server([sys.executable, "-m", "transferkit", "serve", str(folder), "--max-bytes",
                                  "300000"])
    assert httpx.get(f"{url}/healthz").status_code == 200
    yield url
    process.terminate()
    process.wait(timeout=20)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so the exit status reports it.
    assert "Finished server process" in process.stderr.read()


def test_a_busy_port_is_one_line_and_exit_2(server, trained):
    port = server.rsplit(":", 1)[1]
    done = subprocess.run([sys.executable, "-m", "transferkit", "serve", str(trained[1]), "--port", port],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_server_endpoints_and_bad_input(server, trained):
    run, folder = trained
    images = _images(run)
    expected = ExportedClassifier(folder).predict(images[:2], top_k=2)
    files = {"file": (images[0].name, images[0].read_bytes(), "image/jpeg")}
    answer = httpx.post(f"{server}/v1/predict", params={"top_k": 2}, files=files).json()
    assert [p["label"] for p in answer["predictions"]] == expected[0].labels
    assert answer["predictions"][0]["probability"] == pytest.approx(expected[0].probability, abs=1e-5)
    assert set(answer["timing_ms"]) == {"decode", "inference", "total"}
    raw = httpx.post(f"{server}/v1/predict", content=images[1].read_bytes()).json()
    assert raw["predictions"][0]["label"] == expected[1].label and len(raw["predictions"]) == 3

    batch = httpx.post(f"{server}/v1/predict/batch", files=[
        ("files", (images[0].name, images[0].read_bytes(), "image/jpeg")),
        ("files", ("notes.txt", b"not a picture", "text/plain")),
        ("files", (images[1].name, images[1].read_bytes(), "image/jpeg"))]).json()["results"]
    assert [r.get("status") for r in batch] == [None, 415, None]
    assert batch[2]["predictions"][0]["label"] == expected[1].label

    info = httpx.get(f"{server}/v1/model").json()
    assert info["labels"] == ["circles", "squares", "stripes"] and info["backbone"] == "efficientnet_lite0"
    assert httpx.get(f"{server}/docs").status_code == 200
    assert httpx.get(f"{server}/openapi.json").json()["paths"].keys() >= {"/v1/predict", "/v1/predict/batch"}

    bomb = io.BytesIO()
    Image.new("L", (12_000, 9_000)).save(bomb, format="PNG")  # 108 MP in ~100 kB
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    cases = {
        "not an image": (b"GIF89a? no, just text", 415),
        "empty body": (b"", 400),
        "over --max-bytes": (_jpeg(noisy, 100) * 2, 413),
        "decompression bomb": (bomb.getvalue(), 400),
        "truncated JPEG": (images[0].read_bytes()[:600], 400),
    }
    for name, (body, status) in cases.items():
        response = httpx.post(f"{server}/v1/predict", content=body)
        assert response.status_code == status, (name, response.text)
        assert response.json()["detail"], name
    assert httpx.post(f"{server}/v1/predict", params={"top_k": 0}, files=files).status_code == 422
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}  # still serving after all of that
    assert httpx.post(f"{server}/v1/predict", files=files).status_code == 200


def test_concurrent_requests_are_all_answered(server, trained):
    run, _ = trained
    images = [p.read_bytes() for p in _images(run)]
    before = httpx.get(f"{server}/v1/model").json()["served"]

    # Threads, not asyncio.run: Playwright's sync API (the browser fixture) may already run an event loop here.
    with ThreadPoolExecutor(max_workers=24) as pool:
        statuses = list(pool.map(lambda i: httpx.post(f"{server}/v1/predict", content=images[i % len(images)],
                                                      timeout=60).status_code, range(24)))
    assert statuses == [200] * 24
    after = httpx.get(f"{server}/v1/model").json()["served"]
    assert after["images"] - before["images"] == 24 and after["model_calls"] - before["model_calls"] <= 24


def test_requests_waiting_together_share_one_model_call():
    """While the model is busy, the requests that arrive wait; the next model call takes them all (up to
    max_batch), whatever the timing. The model here holds its first call until every request is queued."""
    from transferkit.serve import MicroBatcher

    release, calls = threading.Event(), []

    def model(pixels: np.ndarray) -> np.ndarray:
        calls.append(len(pixels))
        release.wait(timeout=30)
        return pixels[:, :2].astype(np.float32)

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(model, max_batch=8, max_wait_s=0.0)
        batcher.start()
        requests = [asyncio.ensure_future(batcher(np.full((1, 3), 0)))]
        while not calls:  # the first request is in the model ...
            await asyncio.sleep(0.01)
        requests += [asyncio.ensure_future(batcher(np.full((1, 3), i))) for i in range(1, 11)]
        while batcher.queue.qsize() < 10:  # ... while ten more wait
            await asyncio.sleep(0.01)
        release.set()
        answers = await asyncio.gather(*requests)
        await batcher.stop()
        return answers

    with ThreadPoolExecutor(max_workers=1) as pool:  # a fresh event loop, whatever runs in this thread
        answers = pool.submit(asyncio.run, scenario()).result(timeout=60)
    assert calls == [1, 8, 2]  # max_batch caps the second call
    assert [int(a[0, 0]) for a in answers] == list(range(11))  # each request gets its own rows back


def test_page_shows_the_top_label(server, trained, browser):
    run, folder = trained
    image = _images(run)[0]
    expected = ExportedClassifier(folder).predict([image], top_k=1)[0].label
    page = browser.new_page()
    try:
        page.goto(server)
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#result .row .label", timeout=30_000)
        labels = page.locator("#result .row .label").all_text_contents()
        assert labels[0] == expected and len(labels) == 3
        assert page.locator("#preview").evaluate("img => img.naturalWidth") > 0
        page.set_input_files("#file", files=[{"name": "x.txt", "mimeType": "text/plain", "buffer": b"hello"}])
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
        assert "not an image" in page.locator("#error").text_content()
    finally:
        page.close()


def test_a_run_folder_is_served_with_pytorch(trained):
    from fastapi.testclient import TestClient

    from transferkit.serve import ServeConfig, create_app, load_model

    run, _ = trained
    image = _images(run)[0]
    expected = Classifier.load(run).predict([image], top_k=3)[0]
    with TestClient(create_app(load_model(run), ServeConfig(max_batch=1))) as client:
        answer = client.post("/v1/predict", content=image.read_bytes()).json()
        assert client.get("/v1/model").json()["format"] == "run"
    assert [p["label"] for p in answer["predictions"]] == expected.labels
    assert answer["predictions"][0]["probability"] == pytest.approx(expected.probability, abs=1e-5)


@pytest.mark.slow
def test_exported_model_runs_without_pytorch(trained, tmp_path):
    """The production install: transferkit without its dependencies, plus ONNX Runtime, Pillow, numpy, the CLI's
    typer/rich and the server's fastapi/uvicorn/python-multipart. No torch in that venv."""
    run, folder = trained
    env_dir = tmp_path / "light"
    venv.create(env_dir, with_pip=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", "-e", str(REPO)], check=True, capture_output=True)
    subprocess.run([*pip, "onnxruntime", "pillow", "numpy", "typer", "rich", "fastapi", "uvicorn", "python-multipart"],
                   check=True, capture_output=True)
    python = str(env_dir / "bin" / "python")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    images = _images(run)[:4]
    done = subprocess.run([python, "-m", "transferkit", "predict", str(folder), *map(str, images), "--format",
                           "json", "--top-k", "2"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    light = json.loads(done.stdout)
    reference = ExportedClassifier(folder).predict(images, top_k=2)
    assert [[p["label"] for p in item["predictions"]] for item in light] == [r.labels for r in reference]

    needs_torch = subprocess.run([python, "-m", "transferkit", "predict", str(run), str(images[0])],
                                 capture_output=True, text=True)
    assert needs_torch.returncode == 2 and "runtime-only install" in needs_torch.stderr

    server, url = _start_server([python, "-m", "transferkit", "serve", str(folder)])
    try:
        answer = httpx.post(f"{url}/v1/predict", content=images[0].read_bytes())
        assert answer.status_code == 200
        assert [p["label"] for p in answer.json()["predictions"]][:2] == reference[0].labels
    finally:
        server.terminate()
        server.wait(timeout=20)
