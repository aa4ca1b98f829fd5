"""Images/s of the training loader from an S3-compatible store against the same shards on local disk.

    PYTHONPATH=. python benchmarks/object_store.py [--images 500] [--workers 1 2] [--batches 60] [--results]

Writes ~500 JPEGs of 500x375 px into shards of 50 (benchmarks/data_pipeline.py's images and our writer), uploads
them to a moto_server started on 127.0.0.1 (the `dev` extra), then measures, alternating the two sources twice
per worker count, the WebDatasetDataModule training loader (RandomResizedCrop(299) + flip, batch 32) reading
`<dir>` and `s3://bench/shards`: images/s and images per CPU second (the training process and its workers).
Also the store alone: MB/s of reading every shard once through xception_pl.storage.open_shard (fsspec, 8 MiB
blocks read ahead in the background) against local reads. moto is a Python server on the same cores: a lower
bound on what a real store gives, not an estimate of it.
"""

from __future__ import annotations

import argparse  # a benchmark script, not part of the CLI
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import s3fs
import torch

from benchmarks.data_pipeline import make_images, pipeline, write_results
from xception_pl import storage
from xception_pl.data import write_shards


def start_store(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return process, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}")


def read_rate(urls: list[str]) -> float:
    """MB/s of reading each shard once, through open_shard (a URL) or open (a path)."""
    start, size = time.perf_counter(), 0
    for url in urls:
        with (storage.open_shard(url) if storage.is_url(url) else open(url, "rb")) as f:
            while chunk := f.read(1 << 20):
                size += len(chunk)
    return size / 1e6 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "images", args.images)
        kb = np.mean([p.stat().st_size for p in paths]) / 1e3
        write_shards(str(tmp / "images"), str(tmp / "shards"), shard_size=50, workers=1, progress=False)
        process, endpoint = start_store(tmp / "moto.log")
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        try:
            fs = s3fs.S3FileSystem()
            fs.mkdir("bench")
            fs.put(str(tmp / "shards"), "bench/shards", recursive=True)
            sources = {"local disk": str(tmp / "shards"), "S3 (moto_server, loopback)": "s3://bench/shards"}
            tars = sorted(p.name for p in (tmp / "shards").glob("*.tar"))
            reads = {name: max(read_rate([f"{spec}/{t}" for t in tars]) for _ in range(2))
                     for name, spec in sources.items()}
            rows = {(name, w): [] for w in args.workers for name in sources}
            for _ in range(2):
                for w in args.workers:
                    for name, spec in sources.items():
                        rows[name, w].append(pipeline(spec, w, args.batches))
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
    lines = [f"{args.images} JPEGs, 500x375 px, {kb:.0f} KB mean, in shards of 50; RandomResizedCrop(299) + flip; "
             "batch 32; best of 2 alternating runs.", "",
             "| source | workers | images/s (wall) | images per CPU second | shard read alone, MB/s |",
             "|---|---:|---:|---:|---:|"]
    for (name, w), runs in rows.items():
        wall, cpu = max(runs)
        lines.append(f"| {name} | {w} | {wall:.0f} | {cpu:.0f} | {reads[name]:.0f} |")
    print("\n".join(lines))
    if args.results:
        write_results(lines[0], lines[2:], "Shards from an object store",
                      "`PYTHONPATH=. python benchmarks/object_store.py --results`")


if __name__ == "__main__":
    main()
