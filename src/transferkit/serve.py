"""`transferkit serve`: a classifier behind HTTP (FastAPI + uvicorn), with concurrent requests micro-batched.

An export folder is served by ONNX Runtime alone (no PyTorch import); a run folder loads the PyTorch classifier.
Decoding runs in a thread pool; inference runs in one worker thread that takes up to `max_batch` images from all
waiting requests at once, waiting at most `max_wait_ms` for more to arrive.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request, Query), which are
# imported inside create_app so that this module imports without fastapi installed.
import asyncio
import html
import importlib.util
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from transferkit.data import DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, Preprocessing, decode_image, default_workers
from transferkit.errors import DataError
from transferkit.novelty import rejection_threshold
from transferkit.runtime import ExportedClassifier, Outputs, is_export, label_decisions, ranked_prediction

DECODE_STATUS = {"empty": 400, "not_image": 415, "too_large": 400, "corrupt": 400, "unreadable": 400}
PAGE = Path(__file__).with_name("templates") / "serve.html"
log = logging.getLogger("transferkit")


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_bytes: int = 20_000_000
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_files: int = 64
    request_timeout_s: float = 60.0
    threads: int | None = None
    cache_dir: str | None = None  # where a run folder's backbone keeps its ONNX file [default: transferkit's]
    threshold: float | None = None  # multi-label models: decide every class at this [default: per-class thresholds]


@dataclass
class ServedModel:
    """What the server needs of a classifier: its labels, preprocessing, a pixels -> (probabilities, unknown-scores)
    function and the score above which an image is unknown (None: never). A multi-label model (one sigmoid per
    class) has per-class `thresholds`: its answer is every label at or above its class's threshold."""

    name: str
    classes: list[str]
    preprocessing: Preprocessing
    outputs: Callable[[np.ndarray], Outputs]
    info: dict
    threshold: float | None = None
    thresholds: np.ndarray | None = None

    @property
    def multi_label(self) -> bool:
        return self.thresholds is not None

    def decisions(self, override: float | None) -> np.ndarray | None:
        """The per-class thresholds a request decides labels with: `override` for every class when given, else the
        model's own; None for a single-label model."""
        return label_decisions(self.multi_label, self.thresholds, self.classes, override)


def load_model(path: str | Path, threads: int | None = None, cache_dir: str | Path | None = None) -> ServedModel:
    """An export folder (ONNX Runtime, no PyTorch) or a run folder (PyTorch)."""
    path = Path(path)
    if is_export(path):
        exported = ExportedClassifier(path, threads=threads)
        return ServedModel(path.name, exported.classes, exported.preprocessing, exported.outputs,
                           exported.describe(), rejection_threshold(exported.novelty, True, None, str(path)),
                           exported.thresholds)
    from transferkit.classifier import Classifier
    from transferkit.runs import read_metrics

    classifier = Classifier.load(path, cache_dir=cache_dir)
    metrics = read_metrics(path)

    def outputs(pixels: np.ndarray) -> Outputs:
        return classifier.outputs_from_features(classifier.extractor.features(pixels))

    info = {"labels": classifier.classes, "backbone": classifier.config["backbone"]["name"],
            "metrics": {split: values.get("accuracy") for split, values in metrics.items()}, "format": "run",
            "preprocessing": classifier.backbone.preprocessing.to_dict(),
            "calibration": classifier.config.get("calibration"),
            "unknown": classifier.novelty.describe() if classifier.novelty else None}
    thresholds = classifier.thresholds
    info.update({"multi_label": classifier.multi_label,
                 "thresholds": (dict(zip(classifier.classes, thresholds.astype(float).tolist()))
                                if thresholds is not None else None)})
    return ServedModel(path.name, classifier.classes, classifier.backbone.preprocessing, outputs, info,
                       rejection_threshold(classifier.novelty, True, None, str(path)), thresholds)


class MicroBatcher:
    """Runs `model` on the images of all requests waiting together, up to `max_batch` at a time; each request gets its
    rows of what the model returns (an array, or a tuple of arrays or None)."""

    def __init__(self, model: Callable[[np.ndarray], np.ndarray | tuple], max_batch: int, max_wait_s: float):
        self.model, self.max_batch, self.max_wait_s = model, max(1, max_batch), max(0.0, max_wait_s)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transferkit-infer")
        self.task: asyncio.Task | None = None
        self.batches = self.images = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((pixels, future))
        return await future

    async def _next_batch(self) -> list:
        items = [await self.queue.get()]
        count, deadline = len(items[0][0]), time.monotonic() + self.max_wait_s
        while count < self.max_batch:
            try:
                item = self.queue.get_nowait() if self.max_wait_s == 0 else await asyncio.wait_for(
                    self.queue.get(), max(0.0, deadline - time.monotonic()))
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            items.append(item)
            count += len(item[0])
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._next_batch()
            live = [(pixels, future) for pixels, future in items if not future.cancelled()]
            if not live:
                continue
            try:
                outputs = await loop.run_in_executor(self.executor, self.model,
                                                     np.concatenate([pixels for pixels, _ in live]))
                self.batches += 1
                self.images += sum(len(pixels) for pixels, _ in live)
            except Exception as err:  # noqa: BLE001 - one failed batch answers its requests, the server goes on
                for _, future in live:
                    if not future.done():
                        future.set_exception(err)
                continue
            start = 0
            for pixels, future in live:
                if not future.done():
                    future.set_result(_rows(outputs, start, start + len(pixels)))
                start += len(pixels)


def _rows(outputs: np.ndarray | tuple, start: int, stop: int) -> np.ndarray | tuple:
    if isinstance(outputs, tuple):
        return tuple(None if part is None else part[start:stop] for part in outputs)
    return outputs[start:stop]


def create_app(model: ServedModel, config: ServeConfig = ServeConfig()):
    """The FastAPI application: /v1/predict, /v1/predict/batch, /v1/model, /healthz, / (a page), /docs."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    decoder = ThreadPoolExecutor(max_workers=config.threads or default_workers(),
                                 thread_name_prefix="transferkit-decode")
    batcher = MicroBatcher(model.outputs, config.max_batch, config.max_wait_ms / 1000)
    draft = (2 * model.preprocessing.resize_size,) * 2

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()
        decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="transferkit classifier", version="1", lifespan=lifespan,
                  description=f"Image classifier {model.name}: {len(model.classes)} classes.")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_bytes:
            raise HTTPException(413, f"the body is {int(declared):,} bytes; the limit is {config.max_bytes:,} "
                                     f"(--max-bytes).")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_bytes:
                raise HTTPException(413, f"the body is over the {config.max_bytes:,}-byte limit (--max-bytes).")
            chunks.append(chunk)
        return b"".join(chunks)

    async def uploads(request: Request) -> list[tuple[str, bytes]]:
        """(name, bytes) of each uploaded file: multipart fields, or the raw body as one image."""
        body = await read_body(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return [("body", body)]

        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=config.max_files,
                                         max_part_size=config.max_bytes).parse()
        except MultiPartException as err:
            raise HTTPException(400, f"malformed multipart body: {err.message}") from None
        files = [(value.filename or key, await value.read()) for key, value in form.multi_items()
                 if isinstance(value, UploadFile)]
        if not files:
            raise HTTPException(400, "the multipart body has no file; send the image in a 'file' field.")
        return files

    def prepare(data: bytes) -> np.ndarray:
        return model.preprocessing.pixels(decode_image(data, config.max_pixels, draft))

    async def decode(data: bytes) -> np.ndarray:
        try:
            return await asyncio.get_running_loop().run_in_executor(decoder, prepare, data)
        except ImageDecodeError as err:
            raise HTTPException(DECODE_STATUS.get(err.kind, 400), f"cannot use this image: {err}") from None

    async def classify(pixels: np.ndarray) -> Outputs:
        try:
            return await asyncio.wait_for(batcher(pixels), config.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(503, "the model did not answer in time; retry later.") from None

    model.decisions(config.threshold)  # a --threshold that cannot apply is refused before serving

    def decisions(threshold: float | None) -> np.ndarray | None:
        """The per-class thresholds of one request (`threshold`: every class at it)."""
        if threshold is not None and not model.multi_label:
            raise HTTPException(400, "threshold decides the labels of a multi-label model; this model gives one "
                                     "class an image (drop threshold).")
        return model.decisions(threshold if threshold is not None else config.threshold)

    def answer(name: str, outputs: Outputs, row: int, top_k: int, reject: bool,
               thresholds: np.ndarray | None = None) -> dict:
        """The answer for one image: to_dict() of its Prediction, less its input and error (multi-label: with the
        `labels` that reach their thresholds, and `passed` on each of the top-k)."""
        probabilities, scores = outputs
        prediction = ranked_prediction(name, probabilities[row], model.classes, min(top_k, len(model.classes)),
                                       None if scores is None else scores[row], model.threshold if reject else None,
                                       thresholds)
        answered = prediction.to_dict()
        if thresholds is not None:
            return {"unknown": answered["unknown"], "ood_score": answered["ood_score"], "labels": answered["labels"],
                    "predictions": answered["predictions"]}
        return {"unknown": answered["unknown"], "ood_score": answered["ood_score"],
                "predictions": answered["predictions"]}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def describe() -> dict:
        return {**model.info, "name": model.name, "config": asdict(config),
                "served": {"images": batcher.images, "model_calls": batcher.batches}}

    def threshold_query():
        return Query(None, gt=0, lt=1, description="Multi-label models: decide every class at this threshold "
                                                   "instead of its own.")

    @app.post("/v1/predict")
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000), reject: bool = Query(True),
                      threshold: float | None = threshold_query()) -> dict:
        """One image, as a multipart 'file' field or as the raw body: the top-k classes, how unlike the training
        images it is (`ood_score`) and whether that makes it `unknown` (`reject=false`: never). Multi-label models:
        `labels`, every label at or above its class's threshold (`threshold`: one for every class), and `passed` on
        each of the top-k."""
        started = time.perf_counter()
        thresholds = decisions(threshold)
        name, data = (await uploads(request))[0]
        pixels = await decode(data)
        decoded = time.perf_counter()
        outputs = await classify(pixels[None])
        done = time.perf_counter()
        return {"input": name, **answer(name, outputs, 0, top_k, reject, thresholds),
                "timing_ms": {"decode": round(1000 * (decoded - started), 2),
                              "inference": round(1000 * (done - decoded), 2),
                              "total": round(1000 * (done - started), 2)}}

    @app.post("/v1/predict/batch")
    async def predict_batch(request: Request, top_k: int = Query(5, ge=1, le=1000),
                            reject: bool = Query(True), threshold: float | None = threshold_query()) -> dict:
        """Several images as multipart files: one result each, with an error (and its status) for bad ones."""
        started = time.perf_counter()
        thresholds = decisions(threshold)
        files = await uploads(request)
        results: list[dict | None] = [None] * len(files)
        good, pixels = [], []
        for position, (name, data) in enumerate(files):
            try:
                pixels.append(await decode(data))
                good.append(position)
            except HTTPException as err:
                results[position] = {"input": name, "error": err.detail, "status": err.status_code}
        if good:
            outputs = await classify(np.stack(pixels))
            for row, position in enumerate(good):
                results[position] = {"input": files[position][0],
                                     **answer(files[position][0], outputs, row, top_k, reject, thresholds)}
        return {"results": results, "timing_ms": {"total": round(1000 * (time.perf_counter() - started), 2)}}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        text = PAGE.read_text(encoding="utf-8").replace("{{ model }}", html.escape(model.name))
        return text.replace("</body>", MULTI_LABEL_PAGE + "</body>", 1) if model.multi_label else text

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error: {type(err).__name__}: {err}"}, status_code=500)

    return app


MULTI_LABEL_PAGE = """<style>
  .labels-title { font-weight: 600; margin: 0.4em 0 0.2em; }
  .none { color: #5a6475; margin: 0.4em 0; }
  .row.below { color: #8a93a3; }
  .row.below .fill { background: #c3cad5; }
  .row .mark { width: 8em; font-size: 0.8em; color: #8a93a3; }
</style>
<script>
// A multi-label model: every label that reached its class's threshold, with its probability, then the other top-k
// classes greyed and marked as below threshold. `?threshold=0.4` on the page's address decides every class at 0.4.
// (Declared after the page's own classify, this one replaces it.)
function labelRow(label, probability, passed) {
  const row = document.createElement("div"); row.className = passed ? "row passed" : "row below";
  const name = document.createElement("span"); name.className = "label"; name.textContent = label;
  const bar = document.createElement("span"); bar.className = "bar";
  const fill = document.createElement("span"); fill.className = "fill"; fill.style.display = "block";
  fill.style.width = (100 * probability).toFixed(1) + "%"; bar.appendChild(fill);
  const value = document.createElement("span"); value.className = "value";
  value.textContent = (100 * probability).toFixed(1) + "%";
  const mark = document.createElement("span"); mark.className = "mark";
  mark.textContent = passed ? "" : "below threshold";
  row.append(name, bar, value, mark);
  return row;
}
async function classify(file) {
  error.textContent = ""; result.textContent = "\u2026"; document.getElementById("timing").textContent = "";
  const preview = document.getElementById("preview");
  preview.src = URL.createObjectURL(file); preview.style.display = "block";
  const form = new FormData(); form.append("file", file);
  const query = new URLSearchParams({top_k: "5"});
  const threshold = new URLSearchParams(location.search).get("threshold");
  if (threshold) query.set("threshold", threshold);
  const response = await fetch("/v1/predict?" + query, {method: "POST", body: form});
  const body = await response.json();
  result.textContent = "";
  if (!response.ok) {
    error.textContent = typeof body.detail === "string" ? body.detail
      : JSON.stringify(body.detail || response.statusText);
    return;
  }
  if (body.unknown) {
    const verdict = document.createElement("div"); verdict.id = "unknown"; verdict.className = "unknown";
    verdict.textContent = "I don't know this: it looks unlike every photo I was trained on " +
      `(score ${body.ood_score.toFixed(3)}). The nearest classes:`;
    result.appendChild(verdict);
  }
  const title = document.createElement("div");
  title.className = body.labels.length ? "labels-title" : "none";
  title.textContent = body.labels.length ? "Labels" : "No label reached its threshold.";
  result.appendChild(title);
  for (const l of body.labels) result.appendChild(labelRow(l.label, l.probability, true));
  for (const p of body.predictions) if (!p.passed) result.appendChild(labelRow(p.label, p.probability, false));
  document.getElementById("timing").textContent = `answered in ${body.timing_ms.total} ms`;
}
</script>
"""
"""What the page adds for a multi-label model (templates/serve.html draws one class per image)."""


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) before the model loads, so a busy port is one clear line; port 0 takes any
    free port (the one given is printed)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise DataError(f"cannot listen on {host}:{port} ({err.strerror}): stop what is using it, or choose another "
                        "--port (0 takes any free one).") from None
    sock.listen(128)  # connections wait in the backlog until the server accepts them
    return sock


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig = ServeConfig(),
          log_level: str = "info") -> None:
    """Load RUN or EXPORT and serve it until interrupted (SIGINT/SIGTERM shut down gracefully)."""
    missing = [name for name in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(name) is None]
    if missing:
        raise DataError("serving needs fastapi, uvicorn and python-multipart: pip install 'transferkit[serve]' "
                        "(or pip install fastapi uvicorn python-multipart).")
    import uvicorn

    sock = _listen(host, port)
    try:
        app = create_app(load_model(path, config.threads, config.cache_dir), config)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
    log.info("serving %s at %s (the page), %s/docs (the API)", path, url, url)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=bound, log_level=log_level, timeout_keep_alive=5,
                                           timeout_graceful_shutdown=10))
    server.run(sockets=[sock])
