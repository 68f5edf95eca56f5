"""Experiment trackers: the training loop reports to one `Trackers` object (the run's parameters, each epoch's row,
the final metrics, the finished run folder) and knows none of the trackers behind it. TensorBoard, MLflow and
Weights & Biases each implement the small `Tracker` interface.

A tracker never costs the run: one that is not installed is refused in one line before any work (naming the extra
to install); one that fails later (a tracking server down mid-run) is warned about once and dropped, and the run
goes on and completes locally. Nothing is lost: everything a tracker logs comes from the run folder, and
`transferkit track RUN --to mlflow` (`track_run`) logs a finished folder afterwards.

MLflow's calls run on a thread of their own, in order, so a slow or unreachable server never holds up an epoch;
`close` waits for what is queued. W&B's client and TensorBoard's writer already hand their work to a process or
thread of their own. Measured on hymenoptera's probe (benchmarks/tracking_overhead.py): see the docs' numbers page.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

from transferkit.errors import DataError

log = logging.getLogger("transferkit")

TRACKERS = {"tensorboard": ("tensorboard", "transferkit[tensorboard]"),
            "mlflow": ("mlflow", "transferkit[mlflow]"),
            "wandb": ("wandb", "transferkit[wandb]")}
"""Each tracker's name -> (the module it needs, the extra that installs it)."""

DEFAULT_EXPERIMENT = "transferkit"
"""The MLflow experiment / W&B project of runs that name none (and set neither MLFLOW_EXPERIMENT_NAME nor
WANDB_PROJECT)."""

MLFLOW_RETRIES = "2"
MLFLOW_TIMEOUT_S = "20"
"""MLflow's client retries a failing request 7 times with exponential backoff and waits 120 s for each (its
defaults): a server that went down would hold the end of a run for minutes. Unless the environment sets
MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT, a request is tried 3 times and waited for 20 s."""

MODEL_FILES = ("config.json", "model.safetensors", "labels.txt", "novelty.npz")
"""What `Classifier.load` reads from a run folder: the files the logged MLflow model carries."""


def parse_trackers(names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Tracker names from `--track mlflow --track wandb`, `"mlflow,wandb"` or a list; unknown names and trackers
    whose package is missing are one line each."""
    if not names:
        return ()
    if isinstance(names, str):
        names = [names]
    chosen = tuple(dict.fromkeys(part.strip().lower() for name in names for part in name.split(",") if part.strip()))
    for name in chosen:
        if name not in TRACKERS:
            raise DataError(f"unknown tracker {name!r}: choose from {', '.join(TRACKERS)}.")
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise DataError(f"--track {name} needs {module}: pip install '{extra}'.")
    return chosen


def run_params(arguments: dict, config) -> dict[str, str]:
    """The run's parameters as trackers store them: the data and every training option, as text."""
    options = asdict(config) if is_dataclass(config) else dict(config)
    values = {"data": arguments.get("data"), "val": arguments.get("val"), "test": arguments.get("test"),
              "from_run": arguments.get("from_run"),
              **{k: v for k, v in options.items() if k not in ("cache_dir", "track", "experiment", "tensorboard")}}
    return {key: _text(value) for key, value in values.items() if value is not None}


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def epoch_metrics(row: dict) -> dict[str, float]:
    """The numbers of one history row (loss, accuracy, learning rate...), without the epoch itself."""
    return {key: float(value) for key, value in row.items()
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def final_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json flattened to what trackers chart: `final/val_accuracy`, `final/test_ece`,
    `final/test_unknown_accuracy_known`... (per-class numbers and matrices stay in the logged metrics.json). The
    prefix keeps them apart from the epochs' series (`val_accuracy` epoch by epoch is the model of that epoch; the
    final one is the kept, calibrated model's)."""
    flat = {}
    for split, values in metrics.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if isinstance(value, dict) and key != "per_class":
                flat.update({f"{split}_{key}_{k}": v for k, v in value.items()})
            else:
                flat[f"{split}_{key}"] = value
    return {f"final/{key}": float(value) for key, value in flat.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


class Tracker:
    """One tracker. The calls come in this order, from one thread: start, epoch..., finish, log_run, close (close
    also after a failure, with failed=True)."""

    name = ""
    background = False
    """Whether its calls should run on a thread of their own (blocking network calls)."""

    def start(self, run_name: str, params: dict[str, str], resume_id: str | None) -> str | None:
        """Open the tracker's run (or continue `resume_id`, the id an interrupted run was given); return its id."""
        raise NotImplementedError

    def epoch(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, metrics: dict[str, float]) -> None:
        """The final metrics of the run."""
        raise NotImplementedError

    def log_run(self, run_dir: Path) -> None:
        """The finished run folder: the report and the rest as artefacts, and the model where the tracker keeps
        models."""

    def close(self, failed: bool) -> None:
        raise NotImplementedError

    def where(self) -> str:
        """Where the logged run can be seen, for the log."""
        return ""


class TensorBoardTracker(Tracker):
    """Scalars per epoch, the parameters as text and the final metrics, in the run folder's tensorboard/."""

    name = "tensorboard"

    def __init__(self, folder: Path):
        self.folder = folder / "tensorboard"
        self.writer = None

    def start(self, run_name, params, resume_id):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.folder))
        self.writer.add_text("parameters", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        return None

    def epoch(self, step, metrics):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, metrics):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, 0)
        self.writer.close()  # the folder is committed (renamed) next: nothing may stay open in it

    def close(self, failed):
        if self.writer is not None:
            self.writer.close()

    def where(self):
        return f"tensorboard --logdir {self.folder}"


class MlflowTracker(Tracker):
    """Parameters, metrics per epoch, the final metrics, the run folder as artefacts (report included) and the
    model as an MLflow pyfunc (`transferkit.mlflow_model`), which `mlflow.pyfunc.load_model` and `mlflow models
    serve` load. The server is the client's own choice: MLFLOW_TRACKING_URI (else MLflow's local default)."""

    name = "mlflow"
    background = True

    def __init__(self, experiment: str | None):
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self.run_id: str | None = None

    def start(self, run_name, params, resume_id):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", MLFLOW_RETRIES)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", MLFLOW_TIMEOUT_S)
        # MLflow prints the run's address on standard output, which `--json` keeps for its answer; the log says it
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for copies of a few MB
        import mlflow

        _scan_installed_packages()
        self.client = mlflow.MlflowClient()
        if resume_id:
            self.run_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
            return resume_id
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(self.experiment))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                             tags={"mlflow.source.name": "transferkit"}).info.run_id
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        return self.run_id

    def epoch(self, step, metrics):
        self._metrics(metrics, step)

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, metrics):
        self._metrics(metrics, 0)

    def log_run(self, run_dir):
        import mlflow

        from transferkit.mlflow_model import log_model

        self.client.log_artifacts(self.run_id, str(run_dir), "run")
        with mlflow.start_run(run_id=self.run_id):
            with _model_folder(run_dir) as model_dir:
                log_model(model_dir)

    def close(self, failed):
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def where(self):
        import mlflow

        uri = mlflow.get_tracking_uri()
        if uri.startswith("http"):
            experiment = self.client.get_run(self.run_id).info.experiment_id
            return f"MLflow: {uri.rstrip('/')}/#/experiments/{experiment}/runs/{self.run_id}"
        return f"MLflow run {self.run_id} ({uri}, experiment {self.experiment})"


def _scan_installed_packages() -> None:
    """Logging a model checks its requirements against every installed package: a scan of all of them that MLflow
    does once a process (1.4-2.8 s here, 220 packages; the larger part of what logging cost a run's end). Done as
    the run starts, on the tracker's thread, while training works in native code. MLflow keeps the map in a private
    function: if that changes, the scan simply happens at the end again."""
    try:
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map
    except ImportError:
        return
    _init_packages_to_modules_map()


class _model_folder:
    """A temporary folder holding the run's model files (not its report): what the logged model carries."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def __enter__(self) -> Path:
        self.temporary = tempfile.TemporaryDirectory(prefix="transferkit-model-")
        folder = Path(self.temporary.name) / "run"
        folder.mkdir()
        for name in MODEL_FILES:
            if (self.run_dir / name).is_file():
                shutil.copy2(self.run_dir / name, folder / name)
        return folder

    def __exit__(self, *exc) -> None:
        self.temporary.cleanup()


class WandbTracker(Tracker):
    """Parameters as the run's config, metrics per epoch, the final metrics as its summary, the report's pictures
    as images and the run folder as a model artefact. Without an API key (WANDB_API_KEY or `wandb login`) it runs
    in W&B's offline mode: the run is written under WANDB_DIR (default ./wandb) and `wandb sync` uploads it later;
    WANDB_MODE, when set, decides."""

    name = "wandb"

    def __init__(self, experiment: str | None):
        self.project = experiment or os.environ.get("WANDB_PROJECT") or DEFAULT_EXPERIMENT
        self.run = None

    def start(self, run_name, params, resume_id):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_key() else "offline")
        # the folder is read from WANDB_DIR on each run: W&B would keep the first run's for the whole process
        self.run = wandb.init(project=self.project, name=run_name, config=params, mode=mode, id=resume_id,
                              dir=os.environ.get("WANDB_DIR"),
                              resume="allow" if resume_id else None, reinit="create_new")
        return self.run.id

    def epoch(self, step, metrics):
        self.run.log(metrics, step=step)

    def finish(self, metrics):
        self.run.summary.update(metrics)

    def log_run(self, run_dir):
        import wandb

        pictures = sorted((run_dir / "report_files").glob("*.png"))
        if pictures:
            self.run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in pictures})
        artifact = wandb.Artifact(_artifact_name(run_dir.name), type="model")
        artifact.add_dir(str(run_dir))
        self.run.log_artifact(artifact)

    def close(self, failed):
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)

    def where(self):
        if self.run.settings.mode == "offline":
            return f"W&B offline run {self.run.dir}; upload it with: wandb sync {Path(self.run.dir).parent}"
        return f"W&B run {self.run.url}"


def _wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


def _artifact_name(name: str) -> str:
    """W&B artefact names allow letters, digits, dashes, underscores and dots."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def make_tracker(name: str, folder: Path, experiment: str | None) -> Tracker:
    if name == "tensorboard":
        return TensorBoardTracker(folder)
    if name == "mlflow":
        return MlflowTracker(experiment)
    return WandbTracker(experiment)


class _Worker:
    """One tracker's calls, in order, on a thread of its own."""

    def __init__(self, name: str):
        self.calls: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name=f"transferkit-{name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            call = self.calls.get()
            try:
                if call is None:
                    return
                call()
            finally:
                self.calls.task_done()

    def submit(self, call) -> None:
        self.calls.put(call)

    def drain(self) -> None:
        self.calls.put(None)
        self.thread.join()


class Trackers:
    """The trackers of one run, as the training loop sees them: `epoch(row)` after each epoch, `finish(metrics)`
    once the metrics are known, `log_run(run_dir)` once the folder is complete, `close()` at the end. A tracker
    whose call fails is warned about once and dropped; the others and the run go on."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = list(trackers or [])
        self.workers = {t.name: _Worker(t.name) for t in self.trackers if t.background}
        self.failed: set[str] = set()
        self.ids: dict[str, str] = {}
        self.step = 0
        self.run_dir: Path | None = None

    @classmethod
    def open(cls, names: tuple[str, ...], folder: Path, run_dir: Path, params: dict[str, str],
             experiment: str | None = None, ids: dict | None = None) -> Trackers:
        """Start each named tracker's run, named after `run_dir` (continuing the runs in `ids` when a run is
        resumed); `folder` is where the run's files are being written (TensorBoard's go there)."""
        trackers = cls([make_tracker(name, folder, experiment) for name in names])
        trackers.run_dir, run_name = run_dir, run_dir.name
        for tracker in trackers.trackers:
            trackers._call(tracker, lambda t=tracker: trackers._started(t, t.start(run_name, params,
                                                                                    (ids or {}).get(t.name))))
        return trackers

    def _started(self, tracker: Tracker, run_id: str | None) -> None:
        if run_id:
            self.ids[tracker.name] = run_id

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A run that fails ends its trackers' runs as failed; a finished one calls `close` itself once its folder
        is logged."""
        if exc_type is not None:
            self.close(failed=True)

    def _call(self, tracker: Tracker, call) -> None:
        def guarded() -> None:
            if tracker.name in self.failed:
                return
            try:
                call()
            except Exception as err:  # noqa: BLE001 - a tracker's failure must never cost the run
                self.failed.add(tracker.name)
                log.warning("%s logging failed (%s: %s); the run goes on and is complete in its folder: log it "
                            "later with: transferkit track %s --to %s", tracker.name, type(err).__name__,
                            _one_line(err), self.run_dir, tracker.name)

        if tracker.name in self.workers:
            self.workers[tracker.name].submit(guarded)
        else:
            guarded()

    def epoch(self, row: dict) -> None:
        metrics = epoch_metrics(row)
        self.step += 1
        for tracker in self.trackers:
            self._call(tracker, lambda t=tracker, s=self.step: t.epoch(s, metrics))

    def finish(self, metrics: dict) -> None:
        flat = final_metrics(metrics)
        for tracker in self.trackers:
            self._call(tracker, lambda t=tracker: t.finish(flat))

    def log_run(self, run_dir: Path) -> None:
        for tracker in self.trackers:
            self._call(tracker, lambda t=tracker: t.log_run(run_dir))

    def close(self, failed: bool = False) -> None:
        """End every tracker's run and wait for what is queued."""
        for tracker in self.trackers:
            self._call(tracker, lambda t=tracker: t.close(failed))
        for worker in self.workers.values():
            worker.drain()
        for tracker in self.trackers:
            if tracker.name not in self.failed and not failed:
                log.info("logged to %s", tracker.where())
        self.trackers, self.workers = [], {}


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def track_run(run: str | Path, to: str | list[str] = "mlflow", experiment: str | None = None) -> dict[str, str]:
    """Log a finished run folder to trackers afterwards (a server that was down, or a run trained without
    --track): its parameters, each epoch of history.csv, metrics.json, the folder and the model. Returns each
    tracker's run id."""
    from transferkit.runs import read_metrics, read_run_config

    run = Path(run)
    config = read_run_config(run)
    names = parse_trackers(to)
    if not names:
        raise DataError("name a tracker to log to: --to mlflow, wandb or tensorboard.")
    data = config.get("data", {})
    params = run_params({"data": data.get("source"), "val": data.get("val"), "test": data.get("test"),
                         "from_run": config.get("from_run")}, config.get("train", {}))
    trackers = Trackers.open(names, run, run, params, experiment)
    failed = True
    try:
        for row in _history_rows(run / "history.csv"):
            trackers.epoch(row)
        trackers.finish(read_metrics(run))
        trackers.log_run(run)
        failed = False
    finally:
        trackers.close(failed)
    if trackers.failed:
        raise DataError(f"could not log {run} to {', '.join(sorted(trackers.failed))} (see the warning above).")
    return trackers.ids


def _history_rows(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def _number(text: str):
    try:
        return json.loads(text) if text not in ("", None) else None
    except ValueError:
        return text
