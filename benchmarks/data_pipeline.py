"""Images/s of the training data pipeline per worker count, against plain decode + augment loops.

    PYTHONPATH=. python benchmarks/data_pipeline.py [--images 500] [--workers 0 1 2] [--batches 40]

Makes ~500 JPEGs of 500x375 px (~60 KB, smooth colour fields plus noise), writes them to shards
with our writer, then measures, one torch thread per process:
  * "PIL + torchvision": PIL decode + v2 RandomResizedCrop(299) + flip + PILToTensor, a plain loop
    over the files;
  * "bare decode + augment": our own header check, decode and default train transform as the loader runs
    them (DecodeCrop.from_bytes: libjpeg-turbo, at the crop's scale), a plain loop over the bytes in memory,
    results dropped at once;
  * "bare decode + augment + stack 32": the same, keeping 32 results and stacking them into a batch
    as any batching loader must: the cost the pipeline cannot avoid;
  * the WebDatasetDataModule training loader (tar reading, shuffle, checks, decode, augment,
    batching, worker IPC) with 0, 1, 2 workers, batch 32, after three warm-up batches; with workers
    both as it is (batches stacked into shared-memory buffers each worker reuses, data/buffers.py) and
    as it was before (a fresh shared-memory segment per batch, torch's default_collate).
Every loop runs --runs times (default 3), interleaved; the table has the medians.
CPU time (this process + its DataLoader workers, from /proc) is counted besides wall time: on a shared
machine the wall clock also measures the neighbours. Overhead per core = 1 - (images per CPU second)
/ (bare + stack images per CPU second).
Prints a table; --results appends it to benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/data_pipeline.py --transfer [--results]

decode_device="cuda" transfer: 2 workers read the same shards and ship each batch of 32 JPEGs to
the main process, either packed in one uint8 tensor + offsets (what the data module does) or as 32
separate tensors (what it did before), alternating, twice each; images/s and the main process's CPU
seconds per 1000 images (receiving: a shared-memory segment and a socket round trip per tensor).

    PYTHONPATH=. python benchmarks/data_pipeline.py --device cuda

decode + RandomResizedCrop(299) + flip on the GPU from packed batches held in memory: the batched
crop (one roi_align per batch) against the default torchvision transform image by image.
"""

from __future__ import annotations

import argparse  # a benchmark script, not part of the CLI (STYLE 6 concerns the package's CLI)
import multiprocessing
import os
import platform
import statistics
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

import webdataset as wds

from xception_pl.data import WebDatasetDataModule, write_shards
from xception_pl.data.batch_crop import PerImage, RandomResizedCropFlip
from xception_pl.data.buffers import BatchBuffers
from xception_pl.data.device_decode import DecodeOnDevice
from xception_pl.data.samples import decode, image_dimensions, pack
from xception_pl.data.transforms import train_transform


BARE = "bare decode + augment + stack 32 loop"


def make_images(root: Path, count: int, size: tuple[int, int] = (500, 375)) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(low).resize(size, Image.BICUBIC), float)
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


def rate(step, items: list, seconds: float = 5.0) -> tuple[float, float]:
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
    return rate(lambda data: augment.from_bytes(data, *image_dimensions(data)[0], True), [p.read_bytes() for p in paths])


def bare_batched_baseline(paths: list[Path]) -> float:
    """As bare_baseline, but keeping 32 results and stacking them, as any batching loader must."""
    augment = train_transform(299)
    data = [p.read_bytes() for p in paths]
    batches = [data[i:i + 32] for i in range(0, len(data) - 31, 32)]
    wall, cpu = rate(lambda batch: torch.stack([augment.from_bytes(d, *image_dimensions(d)[0], True) for d in batch]),
                     batches)
    return 32 * wall, 32 * cpu


def bare_in_parallel(paths: list[Path], processes: int) -> tuple[float, float]:
    """bare_batched_baseline in `processes` processes at once, as many as the loader's workers: cores that run
    side by side share caches and memory bandwidth (and may be hyperthreads of one physical core), which
    costs CPU time per image whatever the loop."""
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        rates = pool.map(bare_batched_baseline, [paths] * processes)
    return sum(wall for wall, _ in rates), statistics.mean(cpu for _, cpu in rates)


def crop_rate(blobs: list[bytes], size: int, scaled: bool) -> tuple[float, float]:
    """(images/s, images per CPU second) of header + decode + RandomResizedCrop(size) + flip: decoding at the scale
    the crop needs (DecodeCrop.from_bytes) or in full, then the same crop (DecodeCrop as a transform)."""
    crop = train_transform(size)
    if scaled:
        return rate(lambda data: crop.from_bytes(data, *image_dimensions(data)[0], True), blobs)
    return rate(lambda data: crop(decode(data, image_dimensions(data)[1])), blobs)


def crop_difference(blobs: list[bytes], size: int) -> float:
    """Mean |scaled - full| over the pixels of images whose box was decoded at a reduced scale (same draws)."""
    crop, differences = train_transform(size), []
    for i, data in enumerate(blobs):
        (width, height), _ = image_dimensions(data)
        torch.manual_seed(i)
        box = crop.crop.make_params([torch.empty(3, height, width, device="meta")])
        if min(box["height"], box["width"]) < 2 * size:
            continue
        torch.manual_seed(i)
        scaled = crop.from_bytes(data, width, height, True)
        torch.manual_seed(i)
        full = crop(decode(data, True))
        differences.append((scaled.float() - full.float()).abs().mean().item())
    return statistics.mean(differences) if differences else float("nan")


def decode_table(root: Path, count: int, runs: int) -> list[str]:
    lines = ["| JPEGs | crop | decode | images/s | images per CPU second | vs full decode | crops decoded "
             "reduced | mean abs. difference (0-255) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for width, height in ((500, 375), (1600, 1200)):
        blobs = [p.read_bytes() for p in make_images(root / f"{width}x{height}", count, (width, height))]
        kb = np.mean([len(b) for b in blobs]) / 1e3
        for size in (299, 160):
            rates = {False: [], True: []}
            for _ in range(runs):  # interleaved
                for scaled in rates:
                    rates[scaled].append(crop_rate(blobs, size, scaled))
            full = statistics.median(cpu for _, cpu in rates[False])
            reduced = reduced_share(blobs, size)
            for scaled, results in rates.items():
                wall, cpu = (statistics.median(column) for column in zip(*results))
                lines.append(f"| {width}x{height}, {kb:.0f} KB | {size} | "
                             f"{'at the crop' + chr(39) + 's scale' if scaled else 'full (before)'} | {wall:.0f} | "
                             f"{cpu:.0f} | {cpu / full:.2f}x | " + (f"{reduced:.0%} | {difference(blobs, size)} |"
                                                                   if scaled else "- | - |"))
    return lines


def difference(blobs: list[bytes], size: int) -> str:
    value = crop_difference(blobs, size)
    return "-" if value != value else f"{value:.2f}"  # NaN: no box was decoded reduced


def reduced_share(blobs: list[bytes], size: int, draws: int = 2000) -> float:
    """The share of crops whose box is at least twice the output on both sides."""
    crop, count = train_transform(size), 0
    for i in range(draws):
        (width, height), _ = image_dimensions(blobs[i % len(blobs)])
        box = crop.crop.make_params([torch.empty(3, height, width, device="meta")])
        count += min(box["height"], box["width"]) >= 2 * size
    return count / draws


def pipeline(shards: Path, workers: int, batches: int, reuse: bool = True) -> tuple[float, float, float]:
    """(images/s, images per CPU second of the main process and its workers together, the main process's share
    of that CPU). reuse=False: the workers stack each batch into a fresh shared-memory segment (BatchBuffers
    with no buffers), as before."""
    dm = WebDatasetDataModule(train=str(shards), train_size=10**7, batch_size=32, num_workers=workers,
                              image_size=299, shuffle_buffer=500)
    if not reuse:
        dm.batch_buffers = lambda workers: BatchBuffers(workers, 0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    before = {p.pid for p in multiprocessing.active_children()}
    it = iter(loader)
    for _ in range(3):  # warm-up: worker start, shuffle buffer fill
        next(it)
    pids = [p.pid for p in multiprocessing.active_children() if p.pid not in before]  # this loader's workers
    start, main, workers = time.perf_counter(), time.process_time(), worker_cpu_seconds(pids)
    n = sum(len(next(it)["key"]) for _ in range(batches))
    wall, main, workers = time.perf_counter() - start, time.process_time() - main, worker_cpu_seconds(pids) - workers
    return n / wall, n / (main + workers), main / (main + workers)


def per_image_collate(samples: list[dict]) -> dict:
    """The pre-packing worker output: one tensor per JPEG ("used": the raw samples taken, as Collate counts)."""
    return {"jpeg": [torch.frombuffer(bytearray(s["image"]), dtype=torch.uint8) for s in samples],
            "target": torch.tensor([s["target"] for s in samples]), "key": [s["key"] for s in samples],
            "used": samples[-1]["index"] + 1}


def transfer(shards: Path, packed: bool, batches: int) -> tuple[float, float]:
    """(images/s, main-process CPU seconds per 1000 images) of 2 workers shipping undecoded batches of 32."""
    dm = WebDatasetDataModule(train=str(shards), train_size=10**7, batch_size=32, num_workers=2,
                              decode_device="cuda", shuffle_buffer=500)
    dm.setup("fit")
    loader = dm.train_dataloader().pipeline[0]  # the DataLoader: worker output, before the device decode
    if not packed:  # the batching stage, the one before number_batches
        loader.dataset.pipeline[-2] = wds.batched(32, partial=False, collation_fn=per_image_collate)
    it = iter(loader)
    for _ in range(3):  # warm-up: worker start, shuffle buffer fill
        next(it)
    start, cpu = time.perf_counter(), time.process_time()
    n = sum(len(next(it)["key"]) for _ in range(batches))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    del it
    return n / wall, 1000 * cpu / n


def transfer_table(shards: Path, batches: int) -> list[str]:
    lines = ["| worker output | run | images/s (wall) | main-process CPU s per 1000 images |", "|---|---:|---:|---:|"]
    for run in (1, 2):
        for packed in (True, False):
            wall, cpu = transfer(shards, packed, batches)
            name = "packed: 1 uint8 tensor + offsets" if packed else "32 tensors, one per JPEG"
            lines.append(f"| {name} | {run} | {wall:.0f} | {cpu:.3f} |")
    return lines


def device_rate(paths: list[Path], device: torch.device, batched: bool, batches: int) -> tuple[float, float]:
    """(images/s, main-process CPU seconds per 1000 images) of decode + crop on `device`, batches of 32."""
    packed = [pack([p.read_bytes() for p in paths[i:i + 32]]) for i in range(0, len(paths) - 31, 32)]
    stage = DecodeOnDevice(RandomResizedCropFlip(299) if batched else PerImage(train_transform(299)), device)

    def stream(count: int):
        for i in range(count):
            data, offsets = packed[i % len(packed)]
            yield {"jpeg": data, "jpeg_offsets": offsets, "target": torch.zeros(32, dtype=torch.long),
                   "skipped": torch.zeros(5, dtype=torch.long), "key": [""] * 32}

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    for _ in stage(stream(3)):  # warm-up: nvjpeg and kernel initialisation
        pass
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    n = sum(len(batch["key"]) for batch in stage(stream(batches)))
    sync(device)
    return n / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / n


def device_table(paths: list[Path], device: torch.device, batches: int) -> list[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    lines = [f"| decode + crop on {name} | run | images/s | main-process CPU s per "
             "1000 images |", "|---|---:|---:|---:|"]
    for run in (1, 2):
        for batched in (True, False):
            wall, cpu = device_rate(paths, device, batched, batches)
            what = "batched crop (roi_align)" if batched else "torchvision transform per image"
            lines.append(f"| decode + {what} | {run} | {wall:.0f} | {cpu:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3, help="each loop measured this many times, interleaved")
    parser.add_argument("--transfer", action="store_true", help="only the packed vs per-image transfer")
    parser.add_argument("--device", help="only decode + crop on this device (cuda)")
    parser.add_argument("--decode", action="store_true", help="only decode + crop, at the crop's scale vs in full")
    parser.add_argument("--results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.decode:
            table = decode_table(Path(tmp), min(args.images, 200), args.runs)
            print("\n".join(table))
            if args.results:
                write_results("Synthetic JPEGs (smooth colour fields + noise, quality 90), 200 of each size; one "
                              f"process; medians of {args.runs} interleaved runs.", table, "Decode what the crop needs",
                              "`PYTHONPATH=. python benchmarks/data_pipeline.py --decode --results`")
            return
        paths = make_images(Path(tmp) / "images", args.images)
        kb = np.mean([p.stat().st_size for p in paths]) / 1e3
        write_shards(str(Path(tmp) / "images"), str(Path(tmp) / "shards"), shard_size=50, workers=1, progress=False)
        if args.transfer or args.device:
            table = (device_table(paths, torch.device(args.device), args.batches) if args.device
                     else transfer_table(Path(tmp) / "shards", args.batches))
            print("\n".join(table))
            if args.results:
                option = f"--device {args.device}" if args.device else "--transfer"
                write_results(f"{args.images} JPEGs, 500x375 px, {kb:.0f} KB mean; batches of 32.", table,
                              "Packed JPEG batches (decode_device: cuda)",
                              f"`PYTHONPATH=. python benchmarks/data_pipeline.py {option} --results`")
            return
        shards = Path(tmp) / "shards"
        loops = {("PIL + torchvision loop", 1): partial(pil_baseline, paths),
                 ("bare decode + augment loop", 1): partial(bare_baseline, paths),
                 (BARE, 1): partial(bare_batched_baseline, paths)}
        for w in args.workers:
            if w > 1:
                loops[BARE, w] = partial(bare_in_parallel, paths, w)
            for reuse in (False, True) if w else (True,):
                name = "train loader" + (", " + ("reused buffers" if reuse else "fresh segment per batch (before)")
                                         if w else "")
                loops[name, w] = partial(pipeline, shards, w, args.batches, reuse)
        runs = {key: [] for key in loops}
        for _ in range(args.runs):  # interleaved: a neighbour's burst of load hits every loop alike
            for key, measure in loops.items():
                runs[key].append(measure())
    medians = {key: [statistics.median(column) for column in zip(*results)] for key, results in runs.items()}
    lines = [f"{args.images} JPEGs, 500x375 px, {kb:.0f} KB mean; RandomResizedCrop(299) + flip; batch 32; "
             f"medians of {args.runs} interleaved runs. The loader with w workers is compared with w bare loops "
             "running side by side (w = 0 and 1: one).", "",
             "| loop | processes (loader: workers) | images/s (wall) | images per CPU second | overhead per core "
             "vs bare + stack | main process's share of the CPU |", "|---|---:|---:|---:|---:|---:|"]
    for (name, w), m in medians.items():
        bare = medians[BARE, max(1, w) if name.startswith("train loader") else w][1]
        lines.append(f"| {name} | {w} | {m[0]:.0f} | {m[1]:.0f} | {1 - m[1] / bare:+.1%} | "
                     + (f"{m[2]:.0%} |" if len(m) > 2 else "- |"))
    print("\n".join(lines))
    if args.results:
        write_results(lines[0], lines[2:], "Data pipeline",
                      "`PYTHONPATH=. python benchmarks/data_pipeline.py --results`")


def write_results(summary: str, table: list[str], title: str, command: str) -> None:
    """Append a section to benchmarks/RESULTS.md: the command, date, device, load, then the table."""
    cpu = subprocess.run(["sh", "-c", "lscpu | grep -m1 'Model name' | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip() or platform.processor()
    load = open("/proc/loadavg").read().split()[0]
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    cores = len(os.sched_getaffinity(0))
    header = [f"\n## {title}\n",
              f"{command}, run of {date} (see the script's docstring). Device: {cpu}, {cores} cores shared "
              f"with other jobs (load average {load} at the end), 1 torch thread per process; torch "
              f"{torch.__version__}.", "", summary, ""]
    with open(Path(__file__).parent / "RESULTS.md", "a") as f:
        f.write("\n".join(header + table) + "\n")


if __name__ == "__main__":
    main()
