"""Reading images from object storage: extraction throughput from a real S3 API on loopback against local disk, and
peak memory as the number of objects grows.

Starts moto's S3 server (tests/s3_server.py) on a free loopback port, uploads flowers100 (4,317 photos) and runs the
same feature extraction (the default backbone and engine, no feature cache) over the local folder and over
s3://bench/flowers/, in fresh processes, after one warm-up pass over each (the local files in the page cache, the
backbone's ONNX file exported). Then uploads N objects (flowers100's bytes under N keys, N = 10,000 and 100,000 by
default) and extracts them at a small input size (the backbone is not what is measured) in a fresh process each,
printing that process's peak resident memory (os.wait4) and how much of it is the feature matrix it returns (which
grows with the images by necessity: N x D float32 numbers).

    python benchmarks/remote_data.py                        # throughput, then memory at 10k and 100k
    python benchmarks/remote_data.py --sizes 2000 --quick   # a quick check

Target (issue 28): S3 >= 0.8x local throughput; memory flat from 10k to 100k images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "flowers100"


def child(source: str, image_size: int | None, limit: int | None) -> None:
    """Extract every image of `source` (no cache) and print images, seconds, images/s as JSON."""
    from transferkit.backbone import open_backbone
    from transferkit.data import list_images
    from transferkit.features import Extractor, extract_features

    paths = list_images([source])[:limit]
    extractor = Extractor(open_backbone(image_size=image_size) if image_size else open_backbone())
    started = time.perf_counter()
    result = extract_features(extractor, paths, None, progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"images": len(result.kept), "skipped": len(result.skipped), "seconds": seconds,
                      "per_second": len(result.kept) / seconds, "features_mb": result.features.nbytes / 2**20}))


def run_child(source: str, env: dict[str, str], image_size: int | None = None,
              limit: int | None = None) -> tuple[dict, float]:
    """The child's result and its peak resident memory in MB."""
    command = [sys.executable, __file__, "--child", source]
    if image_size:
        command += ["--image-size", str(image_size)]
    if limit:
        command += ["--limit", str(limit)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **env})
    _, status, usage = os.wait4(process.pid, 0)
    output, errors = process.stdout.read(), process.stderr.read()
    if status != 0:
        raise SystemExit(f"extraction of {source} failed:\n{errors}")
    return json.loads(output.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def upload(s3, files: list[Path], prefix: str, count: int) -> float:
    """`count` objects under prefix/CLASS/NAME (flowers100's bytes, cycled); the seconds it took."""
    started = time.perf_counter()
    batch: dict[str, bytes] = {}
    for i in range(count):
        path = files[i % len(files)]
        batch[f"{prefix}/{path.parent.name}/{i:07d}_{path.name}"] = path.read_bytes()
        if len(batch) == 2000 or i == count - 1:
            s3.pipe(batch)
            batch = {}
    return time.perf_counter() - started


def throughput(s3, files: list[Path], source: Path, server, env: dict[str, str], limit: int | None) -> None:
    """The same extraction from local disk and from the S3 server, in fresh processes, after a warm-up of each."""
    seconds = upload(s3, files, "bench/flowers", len(files))
    print(f"uploaded {len(files):,} objects to moto's S3 server in {seconds:.0f} s")
    local, remote = str(source), "s3://bench/flowers/"
    for source in (local, remote):  # warm-up: page cache, ONNX export
        run_child(source, env, limit=200)
    results = {}
    for name, source in (("local disk", local), ("S3 (moto, loopback)", remote)):
        server_before = cpu_seconds(server.process.pid)
        results[name], memory = run_child(source, env, limit=limit)
        r = results[name]
        print(f"{name:<22} {r['images']:,} images in {r['seconds']:.1f} s: {r['per_second']:.1f} img/s "
              f"(peak memory {memory:.0f} MB; the S3 server used "
              f"{cpu_seconds(server.process.pid) - server_before:.1f} CPU s of the same {os.cpu_count()} cores)")
    ratio = results["S3 (moto, loopback)"]["per_second"] / results["local disk"]["per_second"]
    print(f"S3 / local throughput: {ratio:.2f}x (target >= 0.8x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000], help="object counts for memory")
    parser.add_argument("--memory-image-size", type=int, default=32, help="input size for the memory runs")
    parser.add_argument("--quick", action="store_true", help="throughput on the first 1,000 images only")
    parser.add_argument("--memory-only", action="store_true", help="skip the throughput comparison")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.image_size, args.limit)
        return

    import s3fs
    from s3_server import S3Server

    files = sorted(p for p in args.source.rglob("*") if p.is_file())
    limit = 1000 if args.quick else None
    print(f"{os.cpu_count()} cores, Python {platform.python_version()}; source {args.source} ({len(files):,} files)")
    with S3Server() as server, tempfile.TemporaryDirectory(prefix="transferkit-remote-") as cache:
        env = {**server.environment(), "TRANSFERKIT_CACHE_DIR": cache}
        os.environ.update(env)
        s3 = s3fs.S3FileSystem(skip_instance_cache=True)
        s3.mkdir("bench")
        if not args.memory_only:
            throughput(s3, files, args.source, server, env, limit)
        for count in args.sizes:
            prefix = f"bench/n{count}"
            seconds = upload(s3, files, prefix, count)
            result, memory = run_child(f"s3://{prefix}/", env, image_size=args.memory_image_size)
            print(f"{count:>9,} objects (uploaded in {seconds:.0f} s): extracted {result['images']:,} at "
                  f"{args.memory_image_size} px in {result['seconds']:.0f} s ({result['per_second']:.0f} img/s), "
                  f"peak memory {memory:.0f} MB, of which the features returned {result['features_mb']:.0f} MB: "
                  f"{memory - result['features_mb']:.0f} MB besides them")


if __name__ == "__main__":
    main()
