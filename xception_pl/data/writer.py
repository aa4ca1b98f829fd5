"""Shard writer: image folders and label files (xception_pl.data.labels) -> shuffled tar shards + manifest.json.

    python -m xception_pl shards --source DIR_OR_JSONL --output DIR [--labels CSV] [--classes FILE]

Original JPEG bytes are stored unchanged; other formats, and images larger than max_side, are
re-encoded as JPEG quality 95. Shards are written under a temporary name and renamed when complete;
the manifest is written last and atomically, so an interrupted run never leaves a manifest that
lists a partial shard.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import re
import sys
import time
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from xception_pl.checkpointing import publish, temporary_path, write_atomically
from xception_pl.data.labels import csv_items, folder_items, read_classes, sample_key
from xception_pl.data.sources import MANIFEST

Item = tuple[str, str, Any]  # (key, path, label: int or list[int])


def jsonl_items(path: Path, num_classes: int | None) -> tuple[list[Item], int]:
    """JFT style: one {"path": ..., "labels": [...]} per line, paths relative to the file's folder."""
    items, top = [], -1
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            labels = record.get("labels")
            valid = isinstance(labels, list) and all(type(i) is int and i >= 0 for i in labels)
            if "path" not in record or not valid:
                raise ValueError(f"{path}:{line_number}: expected {{\"path\": ..., \"labels\": [class ids >= 0]}}")
            top = max([top, *labels])
            items.append((sample_key(Path(record["path"])), str(path.parent / record["path"]), labels))
    if num_classes is not None and top >= num_classes:
        raise ValueError(f"{path}: label {top} >= num_classes={num_classes}; raise --num_classes or fix the labels")
    return items, num_classes if num_classes is not None else top + 1


def load(item: Item, max_side: int | None, max_image_pixels: int) -> tuple[Item, bytes | None, str | None]:
    """(item, JPEG bytes or None, why it was left out). Runs in the pool workers."""
    path = item[1]
    try:
        data = Path(path).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # header only
        width, height = im.size
        if width * height > max_image_pixels:
            return item, None, f"too_large ({width}x{height})"
        if im.format == "JPEG" and (max_side is None or max(width, height) <= max_side):
            im.draft(im.mode, (width // 8, height // 8))  # decode at 1/8 scale: still reads every entropy-coded byte
            im.load()
            return item, data, None
        if max_side is not None and max(width, height) > max_side:
            im.draft("RGB", (max_side, max_side))
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        im.convert("RGB").save(out, "JPEG", quality=95)
        return item, out.getvalue(), None
    except Image.DecompressionBombError as exn:
        return item, None, f"too_large ({exn})"
    except Exception as exn:  # unreadable for any reason: reported and left out, never fatal
        return item, None, f"unreadable ({type(exn).__name__}: {exn})"


def unique(items: list[Item]) -> list[Item]:
    seen: set[str] = set()
    out = []
    for key, path, label in items:
        new, n = key, 1
        while new in seen:
            new, n = f"{key}_{n}", n + 1
        seen.add(new)
        out.append((new, path, label))
    return out


class Shards:
    """Rotating tar shards, each written beside its name (checkpointing.temporary_path) and published once closed."""

    def __init__(self, output: Path, prefix: str, shard_size: int, shard_bytes: int) -> None:
        self.output, self.prefix, self.shard_size, self.shard_bytes = output, prefix, shard_size, shard_bytes
        self.done: list[dict[str, Any]] = []
        self.tar: wds.TarWriter | None = None
        self.mtime = int(time.time())

    def write(self, sample: dict[str, Any]) -> None:
        size = sum(len(v) for k, v in sample.items() if not k.startswith("_"))
        if self.tar is None or self.count >= self.shard_size or (self.count and self.bytes + size > self.shard_bytes):
            self.close()
            self.name = f"{self.prefix}-{len(self.done):06d}.tar"
            # PAX allows long keys; whole-second mtimes keep it from adding a pax header per member
            self.tar = wds.TarWriter(str(temporary_path(self.output / self.name)), encoder=False,
                                     format="PAX_FORMAT", mtime=self.mtime)
            self.count = self.bytes = 0
        self.tar.write(sample)
        self.count, self.bytes = self.count + 1, self.bytes + size

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            publish(temporary_path(self.output / self.name), self.output / self.name)  # whole and synced, or absent
            self.done.append({"name": self.name, "count": self.count})
            self.tar = None


def write_shards(
    source: str,
    output: str,
    shard_size: int = 1000,
    shard_bytes: int = 1_000_000_000,
    max_count: int | None = None,
    shuffle_seed: int = 0,
    workers: int | None = os.cpu_count(),
    max_side: int | None = None,
    max_image_pixels: int = 89_478_485,
    prefix: str | None = None,
    num_classes: int | None = None,
    labels: str | None = None,
    classes: str | None = None,
    class_names: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write shuffled WebDataset shards and their manifest.json; returns the manifest.

    Args:
        source: an image folder tree (one subfolder per class, ImageNet layout), a flat image folder
            with `labels`, or a JSON-lines file of {"path": ..., "labels": [...]} (multi-label, paths
            relative to the file's folder).
        output: directory for the shards and manifest.json.
        shard_size: at most this many samples per shard (more, smaller shards: more readers).
        shard_bytes: at most this many bytes per shard (one oversized sample still gets a shard).
        max_count: write only the first max_count samples after shuffling (None: all).
        shuffle_seed: seed of the shuffle across shards.
        workers: processes reading, validating and re-encoding images (1: in this process).
        max_side: re-encode images whose larger side exceeds this, resized to it (None: never).
        max_image_pixels: images with more pixels are left out (decompression-bomb guard).
        prefix: shard names are `<prefix>-000000.tar`...; default: the output directory's name.
        num_classes: labels given as ids: number of classes (default: largest label + 1).
        labels: a CSV label file for a flat `source` folder: `path,label` rows (label a class name or
            id, path relative to `source`), or ILSVRC2012's LOC_val_solution.csv as published.
        classes: fixes the class ids: another split's manifest.json, or a text file of class names one
            a line (default: sorted class folder or label names). Give val the train manifest.
        class_names: JSON-lines only: a text file with one class name per line, in class-id order.
        overwrite: replace the shards of an existing manifest in `output`.
        progress: show a progress bar with images/s.
    """
    src, out = Path(source).expanduser(), Path(output).expanduser()
    if labels and not src.is_dir():
        raise ValueError(f"--labels {labels} needs --source to be the folder of the images it names")
    if src.is_dir() and labels:
        items, names, num_classes = csv_items(src, labels, classes, num_classes)
        multilabel = False
    elif src.is_dir():
        items, names = folder_items(src, classes)
        multilabel, num_classes = False, len(names)
    elif src.is_file():
        names = read_classes(classes or class_names) if classes or class_names else None
        items, num_classes = jsonl_items(src, num_classes if num_classes is not None or names is None else len(names))
        multilabel = True
    else:
        raise FileNotFoundError(f"--source {source} does not exist (give an image folder tree or a .jsonl file)")
    if not items:
        raise ValueError(f"--source {source}: no images found")
    out.mkdir(parents=True, exist_ok=True)
    previous = out / MANIFEST
    if previous.exists():
        if not overwrite:
            raise FileExistsError(f"{previous} exists: pass --overwrite true to replace those shards")
        old = json.loads(previous.read_text())
        previous.unlink()  # first, so a crash below cannot leave it listing half-rewritten shards
        for shard in old["shards"]:
            (out / shard["name"]).unlink(missing_ok=True)
    items = unique(items)
    random.Random(shuffle_seed).shuffle(items)
    items = items[:max_count] if max_count is not None else items
    shards = Shards(out, prefix or out.name, shard_size, shard_bytes)
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(items), unit="img", desc=f"shards -> {out}", file=sys.stderr, disable=not progress)
    for (key, path, label), data, error in loaded(items, max_side, max_image_pixels, workers):
        bar.update()
        if data is None:
            skipped.append((path, error))
            continue
        label_field = {"json": json.dumps(label).encode()} if multilabel else {"cls": str(label).encode()}
        shards.write({"__key__": key, "jpg": data, **label_field})
    bar.close()
    shards.close()
    manifest = {
        "format": "xception_pl.shards/1",
        "shards": shards.done,
        "num_samples": sum(s["count"] for s in shards.done),
        "num_classes": num_classes,
        "class_names": names,
        "multilabel": multilabel,
        "skipped": {"count": len(skipped),
                    "reasons": {r: sum(e.startswith(r) for _, e in skipped) for r in ("unreadable", "too_large")},
                    "paths": [p for p, _ in skipped[:1000]]},
        "source": str(src.resolve()),
        "shuffle_seed": shuffle_seed,
    }
    if skipped:
        print(f"left out {len(skipped)} images:", *(f"  {p}: {e}" for p, e in skipped), sep="\n", file=sys.stderr)
    write_atomically(previous, json.dumps(manifest, indent=1))  # the shards are visible from here on
    return manifest


def loaded(items: list[Item], max_side: int | None, max_image_pixels: int,
           workers: int | None) -> Iterator[tuple[Item, bytes | None, str | None]]:
    """load() over items, in order; in a process pool when workers > 1."""
    work = partial(load, max_side=max_side, max_image_pixels=max_image_pixels)
    if not workers or workers <= 1:
        yield from map(work, items)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(work, items, chunksize=16)


def main(argv: list[str] | None = None) -> None:
    """`python -m xception_pl shards ...`: both --shard_size and --shard-size spellings work."""
    from jsonargparse import auto_cli

    argv = sys.argv[1:] if argv is None else argv
    argv = [re.sub(r"^(--[^=]*)", lambda m: m.group(1).replace("-", "_").replace("__", "--", 1), a)
            if a.startswith("--") else a for a in argv]
    manifest = auto_cli(write_shards, args=argv, as_positional=False)
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
          f"{manifest['skipped']['count']} left out", file=sys.stderr)
