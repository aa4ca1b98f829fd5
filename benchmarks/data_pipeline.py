"""Images/s of the training data pipeline per worker count, against plain decode + augment loops.

    PYTHONPATH=. python benchmarks/data_pipeline.py [--images 500] [--workers 0 1 2] [--batches 40]

Makes ~500 JPEGs of 500x375 px (~60 KB, smooth colour fields plus noise), writes them to shards
with our writer, then measures, one torch thread per process:
  * "PIL + torchvision": PIL decode + v2 RandomResizedCrop(299) + flip + PILToTensor, a plain loop
    over the files;
  * "bare decode + augment": our own decode (torchvision.io, libjpeg-turbo) + our default train
    transform, a plain loop over the bytes in memory, results dropped at once;
  * "bare decode + augment + stack 32": the same, keeping 32 results and stacking them into a batch
    as any batching loader must: the cost the pipeline cannot avoid;
  * the WebDatasetDataModule training loader (tar reading, shuffle, checks, decode, augment,
    batching, worker IPC) with 0, 1, 2 workers, batch 32, after two warm-up batches.
CPU time (this process + its DataLoader workers, from /proc) is counted besides wall time: on a shared
machine the wall clock also measures the neighbours. Overhead per core = 1 - (images per CPU second)
/ (bare + stack images per CPU second).
Prints a table; --results appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse  # a benchmark script, not part of the CLI (STYLE 6 concerns the package's CLI)
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from xception_pl.data import WebDatasetDataModule, write_shards
from xception_pl.data.samples import decode
from xception_pl.data.transforms import train_transform


def make_images(root: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(low).resize((500, 375), Image.BICUBIC), float)
        pixels += rng.normal(0, 8, pixels.shape)
        path = root / f"class{i % 10}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def worker_cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def rate(step, items: list, seconds: float = 8.0) -> tuple[float, float]:
    """(items/s, items per CPU second) of `step` over `items`, cycled for `seconds` (at least one pass)."""
    step(items[0])
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        for item in items:
            step(item)
            n += 1
        if time.perf_counter() - start > seconds:
            return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def pil_baseline(paths: list[Path]) -> float:
    augment = v2.Compose([v2.RandomResizedCrop(299, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    return rate(lambda p: augment(Image.open(p).convert("RGB")), paths)


def bare_baseline(paths: list[Path]) -> float:
    augment = train_transform(299)
    return rate(lambda data: augment(decode(data, True)), [p.read_bytes() for p in paths])


def bare_batched_baseline(paths: list[Path]) -> float:
    """As bare_baseline, but keeping 32 results and stacking them, as any batching loader must."""
    augment = train_transform(299)
    data = [p.read_bytes() for p in paths]
    batches = [data[i:i + 32] for i in range(0, len(data) - 31, 32)]
    wall, cpu = rate(lambda batch: torch.stack([augment(decode(d, True)) for d in batch]), batches)
    return 32 * wall, 32 * cpu


def pipeline(shards: Path, workers: int, batches: int) -> tuple[float, float]:
    """(images/s, images per CPU second of the main process and its workers together)."""
    dm = WebDatasetDataModule(train=str(shards), train_size=10**7, batch_size=32, num_workers=workers,
                              image_size=299, shuffle_buffer=500)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(3):  # warm-up: worker start, shuffle buffer fill
        next(it)
    pids = [w.pid for w in loader.pipeline[0]._iterator._workers] if workers else []
    start, cpu = time.perf_counter(), time.process_time() + worker_cpu_seconds(pids)
    n = sum(len(next(it)["key"]) for _ in range(batches))
    return n / (time.perf_counter() - start), n / (time.process_time() + worker_cpu_seconds(pids) - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp) / "images", args.images)
        kb = np.mean([p.stat().st_size for p in paths]) / 1e3
        write_shards(str(Path(tmp) / "images"), str(Path(tmp) / "shards"), shard_size=50, workers=1, progress=False)
        rows = [("PIL + torchvision loop", "-", pil_baseline(paths)),
                ("bare decode + augment loop", "-", bare_baseline(paths)),
                ("bare decode + augment + stack 32 loop", "-", bare := bare_batched_baseline(paths))]
        rows += [("WebDatasetDataModule train loader", w, pipeline(Path(tmp) / "shards", w, args.batches))
                 for w in args.workers]
    lines = [f"{args.images} JPEGs, 500x375 px, {kb:.0f} KB mean; RandomResizedCrop(299) + flip; batch 32.", "",
             "| loop | workers | images/s (wall) | images per CPU second | overhead per core vs bare + stack |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {workers} | {wall:.0f} | {cpu:.0f} | {1 - cpu / bare[1]:+.1%} |"
              for name, workers, (wall, cpu) in rows]
    print("\n".join(lines))
    if args.results:
        cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                             text=True).stdout.strip() or platform.processor()
        load = open("/proc/loadavg").read().split()[0]
        date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
        cores = len(os.sched_getaffinity(0))
        header = ["\n## Data pipeline\n",
                  f"`PYTHONPATH=. python benchmarks/data_pipeline.py --results`, run of {date}: the training "
                  "loader of WebDatasetDataModule against plain loops (see the script's docstring). "
                  f"Device: {cpu}, {cores} cores shared with other jobs (load average {load} at the end), "
                  f"1 torch thread per process, CPU only; torch {torch.__version__}.", ""]
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
