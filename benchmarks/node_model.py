"""Images per CPU core-second of the training loader, and the node they imply: how many images/s per GPU a node
with C CPU cores per GPU can feed.

    PYTHONPATH=. python benchmarks/node_model.py [--runs 3] [--images 160] [--batches 30] [--results]

Measures the WebDatasetDataModule training loader with one worker (main process + worker CPU seconds, from
/proc; after three warm-up batches), batch 32, on synthetic JPEGs of ImageNet's typical size (500x375) and large
ones (1600x1200), at crops of 299 px (the paper) and 160 px (progressive resizing's early epochs):
  * decode_device: cpu, the worker decodes (at the crop's scale), crops, flips, stacks;
  * decode_device: cuda, the worker reads, checks and packs the JPEG bytes; what the main process spends
    receiving them is counted, the GPU decode (nvjpeg) and its host-side share are not: no GPU here.
Then the model: a GPU is fed (C - 1) x rate images/s, one core per GPU kept for its training process
(Lightning's loop, the receiving end, the step's launches). Prints both tables; --results appends them to
benchmarks/RESULTS.md ("Images per core-second").
"""

from __future__ import annotations

import argparse  # a benchmark script, not part of the CLI
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from data_pipeline import make_images, worker_cpu_seconds, write_results  # noqa: E402

from xception_pl.data import WebDatasetDataModule, write_shards  # noqa: E402

CORES_PER_GPU = (4, 8, 12, 14, 16, 24, 32)
SIZES = ((500, 375), (1600, 1200))


def core_rate(shards: Path, image_size: int, decode_device: str, batches: int) -> float:
    """Images per CPU second (main process + its one worker) of the training loader."""
    import multiprocessing
    dm = WebDatasetDataModule(train=str(shards), train_size=10**7, batch_size=32, num_workers=1,
                              image_size=image_size, shuffle_buffer=200, decode_device=decode_device)
    dm.setup("fit")
    loader = dm.train_dataloader()
    if decode_device == "cuda":
        loader = loader.pipeline[0]  # the DataLoader: the workers' packed JPEG batches, before the GPU decode
    before = {p.pid for p in multiprocessing.active_children()}
    batches_of = iter(loader)
    for _ in range(3):  # warm-up: worker start, shuffle buffer fill
        next(batches_of)
    pids = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
    main, workers = time.process_time(), worker_cpu_seconds(pids)
    n = sum(len(next(batches_of)["key"]) for _ in range(batches))
    cpu = time.process_time() - main + worker_cpu_seconds(pids) - workers
    del batches_of
    return n / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--batches", type=int, default=30, help="measured batches of the CPU path (cuda path: 5x)")
    parser.add_argument("--results", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rates: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = {}
        for width, height in SIZES:
            images = Path(tmp) / f"{width}x{height}"
            make_images(images, args.images, (width, height))
            kb = np.mean([p.stat().st_size for p in images.rglob("*.jpg")]) / 1e3
            shards[width, height] = (Path(tmp) / f"shards{width}", kb)
            write_shards(str(images), str(shards[width, height][0]), shard_size=40, workers=1, progress=False)
        configs = [(size, crop, device) for size in SIZES for crop in (299, 160) for device in ("cpu", "cuda")
                   if not (device == "cuda" and crop == 160)]  # the cuda path's workers do not crop
        for _ in range(args.runs):  # interleaved
            for size, crop, device in configs:
                batches = args.batches if device == "cpu" else 5 * args.batches
                rates.setdefault((size, crop, device), []).append(core_rate(shards[size][0], crop, device, batches))
    rate = {config: statistics.median(values) for config, values in rates.items()}
    measured = ["| JPEGs | crop | decode_device | images per core-second |", "|---|---:|---|---:|"]
    for (size, crop, device), value in rate.items():
        name = f"{size[0]}x{size[1]}, {shards[size][1]:.0f} KB"
        measured.append(f"| {name} | {crop if device == 'cpu' else 'on the GPU'} | {device} | {value:.0f} |")
    model = ["| JPEGs | path | " + " | ".join(f"C = {c}" for c in CORES_PER_GPU) + " |",
             "|---|---|" + "---:|" * len(CORES_PER_GPU)]
    for (size, crop, device), value in rate.items():
        path = f"CPU decode, {crop} px" if device == "cpu" else "decode_device: cuda (host side only)"
        model.append(f"| {size[0]}x{size[1]} | {path} | " + " | ".join(f"{(c - 1) * value:,.0f}"
                                                                         for c in CORES_PER_GPU) + " |")
    print("\n".join(measured + [""] + model))
    if args.results:
        write_results(f"Training loader, one worker, batch 32, {args.images} synthetic JPEGs of each size (smooth colour "
                      f"fields + noise, quality 90); medians of {args.runs} interleaved runs. Images per CPU "
                      "second of the main process and its worker together.", measured + ["", "Images/s per GPU a "
                      "node with C cores per GPU feeds, (C - 1) x the rate:", ""] + model,
                      "Images per core-second", "`PYTHONPATH=. python benchmarks/node_model.py --results`")


if __name__ == "__main__":
    main()
