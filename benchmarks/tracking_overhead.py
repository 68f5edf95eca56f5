"""What logging to MLflow costs a hymenoptera probe run: wall time of `transferkit.train` with and without
track=["mlflow"], against a real MLflow server on loopback (tests/mlflow_server.py: SQLite backend, local
artefacts, one worker, on this same machine).

Each pair runs in one process after a warm-up run (the backbone's ONNX file exported, MLflow imported), alternating
with and without tracking so drift hits both alike. Two settings: the features already cached (a re-run: the
shortest run there is, so the hardest test of a fixed cost) and a fresh feature cache each run (a first run on the
data). Prints the median of each and the overhead in seconds and percent, and what the logged run holds.

    python benchmarks/tracking_overhead.py              # 3 pairs per setting
    python benchmarks/tracking_overhead.py --pairs 5

Target (issue 29): logging costs < 2 % of a hymenoptera probe run's time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera"


def _timed(folder: Path, name: str, cache: Path, track: bool) -> float:
    import transferkit

    started = time.perf_counter()
    transferkit.train(DATA, out=folder / name, cache_dir=str(cache), progress=False,
                      **({"track": ["mlflow"], "experiment": "overhead"} if track else {}))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    from mlflow_server import MlflowServer

    with tempfile.TemporaryDirectory(prefix="tracking-overhead-") as temporary, \
            MlflowServer(Path(temporary) / "server") as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.uri
        folder = Path(temporary)
        warm_cache = folder / "cache"
        _timed(folder, "warm-up", warm_cache, True)
        for setting in ("features cached", "fresh feature cache"):
            times: dict[bool, list[float]] = {False: [], True: []}
            for pair in range(args.pairs):
                for track in (pair % 2 == 0, pair % 2 == 1):
                    cache = warm_cache if setting == "features cached" else folder / f"cache-{pair}-{track}"
                    times[track].append(_timed(folder, f"{setting[:5]}-{pair}-{track}", cache, track))
            plain, tracked = statistics.median(times[False]), statistics.median(times[True])
            print(f"{setting}: without tracking {plain:.2f} s (runs {', '.join(f'{t:.2f}' for t in times[False])}), "
                  f"with MLflow {tracked:.2f} s (runs {', '.join(f'{t:.2f}' for t in times[True])}): overhead "
                  f"{tracked - plain:+.2f} s = {100 * (tracked - plain) / plain:+.1f} %", flush=True)
        import mlflow

        client = mlflow.MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("overhead")
        run = client.search_runs([experiment.experiment_id], max_results=1)[0]
        print(f"a logged run: {len(run.data.params)} parameters, {len(run.data.metrics)} metrics, "
              f"{len(client.get_metric_history(run.info.run_id, 'val_accuracy'))} epochs of val_accuracy, "
              f"{len(client.list_artifacts(run.info.run_id, 'run'))} entries in its run folder, "
              f"{len(run.outputs.model_outputs)} model")


if __name__ == "__main__":
    main()
