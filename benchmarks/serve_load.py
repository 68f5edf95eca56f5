"""Issue #6 numbers: a load test of `transferkit serve` on loopback, with and without micro-batching.

A probe run on ../shared hymenoptera (embedded efficientnet_lite0 at its 288 px test size) is exported to ONNX, then
served twice in a fresh process each: `--max-batch 1` (no micro-batching) and the default `--max-batch 16
--max-wait-ms 5`. Each time 32 concurrent clients send 500 requests (the 153 validation photos in turn, as raw
bytes to /v1/predict); it prints errors, throughput and p50/p99 latency, and the int8 export's accuracy and size.

Usage: python benchmarks/serve_load.py [--data ../shared/datasets/hymenoptera] [--requests 500] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import transferkit
from transferkit.export import export_run

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, *options: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "transferkit", "serve", str(model), "--port", str(port),
                                *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    sys.exit("the server did not start")


async def load(url: str, bodies: list[bytes], requests: int, clients: int) -> tuple[list[float], int, float]:
    """`clients` workers share `requests` requests; (latencies in s, errors, wall time)."""
    latencies, errors, counter = [], 0, iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            started = time.perf_counter()
            try:
                response = await session.post("/v1/predict", content=bodies[i % len(bodies)])
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += not ok

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as session:
        started = time.perf_counter()
        await asyncio.gather(*[client(session) for _ in range(clients)])
        return latencies, errors, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data pointing at the hymenoptera train/val folder.")
    print(f"{os.cpu_count()} cores; {args.requests} requests from {args.clients} concurrent clients", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = transferkit.train(args.data, out=Path(tmp) / "run", cache_dir=str(Path(tmp) / "cache"),
                                progress=False, report=False).run_dir
        exported = export_run(run)
        quantized = export_run(run, quantize="int8")
        bodies = [p.read_bytes() for p in sorted((args.data / "val").rglob("*.jpg"))]
        rows = []
        for name, options in (("no micro-batching (--max-batch 1)", ("--max-batch", "1")),
                              ("micro-batching (--max-batch 16 --max-wait-ms 5)", ())):
            process, url = start_server(exported.folder, *options)
            try:
                asyncio.run(load(url, bodies, 32, 8))  # warm-up
                latencies, errors, seconds = asyncio.run(load(url, bodies, args.requests, args.clients))
                served = httpx.get(f"{url}/v1/model").json()["served"]
            finally:
                process.terminate()
                process.wait(timeout=30)
            rows.append((name, errors, args.requests / seconds, 1000 * percentile(latencies, 50),
                         1000 * percentile(latencies, 99), served["images"] / max(served["model_calls"], 1)))
            print(f"  {name}: done", flush=True)
    print(f"\n{'server':<50}{'errors':>7}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'images/call':>13}")
    for name, errors, throughput, p50, p99, per_call in rows:
        print(f"{name:<50}{errors:>7}{throughput:>8.1f}{p50:>9.0f}{p99:>9.0f}{per_call:>13.1f}")
    q = quantized.quantization
    print(f"\nint8 export: validation accuracy {q['accuracy_fp32']:.4f} -> {q['accuracy_int8']:.4f} "
          f"({100 * q['accuracy_change']:+.2f} points, target >= -1), {q['size_int8_bytes'] / 1e6:.1f} MB = "
          f"{q['size_ratio']:.2f}x fp32; fp32 parity: top-1 {exported.parity['top1_agreement']:.3f}, max "
          f"probability difference {exported.parity['max_abs_probability_difference']:.1e} (target <= 1e-4)")


if __name__ == "__main__":
    main()
