"""A small learnable dataset for CPU demos, made on first use and cached as real shards.

Not a dataset of the paper. Each class is a saturated colour (hue spread by the golden ratio) and a
shape (disc, square, triangle), drawn at a random position and size on a dull random background with
noise: obvious at 64 px, yet not a memorisable constant image. The multi-label variant draws 1-3
classes per image and goes through the JSON-lines source of the writer.
"""

from __future__ import annotations

import colorsys
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw

from xception_pl.data.datamodule import WebDatasetDataModule
from xception_pl.data.writer import write_shards

DEMO_ROOT = "~/.cache/xception_pl/demo"
DEMO_SHARDS = 16  # per split: enough for 2 ranks x 8 workers to each read whole shards
DEMO_VERSION = 1  # part of the cache name: bump when draw() changes


def draw(classes: list[int], num_classes: int, source_size: int, rng: np.random.Generator) -> Image.Image:
    grey = rng.integers(70, 190)
    image = Image.new("RGB", (source_size, source_size), tuple(int(grey + t) for t in rng.integers(-20, 21, 3)))
    pen = ImageDraw.Draw(image)
    scale = (0.18, 0.34) if len(classes) == 1 else (0.11, 0.2)
    for c in classes:
        r = rng.uniform(*scale) * source_size
        x, y = rng.uniform(r, source_size - r, 2)
        colour = tuple(int(255 * v) for v in colorsys.hsv_to_rgb((c * 0.618034) % 1.0, 0.9, rng.uniform(0.75, 1)))
        if c % 3 == 0:
            pen.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif c % 3 == 1:
            pen.rectangle((x - r, y - r, x + r, y + r), fill=colour)
        else:
            corners = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            pen.polygon([(x + r * math.cos(a), y + r * math.sin(a)) for a in corners], fill=colour)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (source_size, source_size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_source(folder: Path, images_per_class: int, num_classes: int, multilabel: bool, source_size: int,
                 seed: int) -> Path:
    """images_per_class x num_classes images as a folder tree (single label) or images + labels.jsonl
    (multi-label)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(images_per_class * num_classes):
        if multilabel:
            num_labels = rng.integers(1, min(3, num_classes) + 1)
            classes = sorted(rng.choice(num_classes, size=num_labels, replace=False).tolist())
            path = Path("images") / f"{i:06d}.jpg"
        else:
            classes = [i % num_classes]
            path = Path(f"class_{classes[0]:03d}") / f"{i:06d}.jpg"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        draw(classes, num_classes, source_size, rng).save(folder / path, quality=90)
        records.append({"path": path.as_posix(), "labels": classes})
    if not multilabel:
        return folder
    (folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / "labels.jsonl"


def make_demo_data(root: str = DEMO_ROOT, num_classes: int = 10, train_images_per_class: int = 100,
                   val_images_per_class: int = 20, source_size: int = 112, multilabel: bool = False,
                   seed: int = 0) -> Path:
    """Build (once) and return `root/<variant>/` holding shard directories train/ and val/.

    Safe when several processes call it at once (a file lock, and the data is built in a temporary
    directory and renamed into place, so a crash never leaves a half-built variant).
    """
    name = f"{'multilabel' if multilabel else 'single'}-c{num_classes}-n{train_images_per_class}" \
           f"-v{val_images_per_class}-s{source_size}-seed{seed}-v{DEMO_VERSION}"
    base = Path(root).expanduser()
    final = base / name
    if (final / "val" / "manifest.json").is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base / f"{name}.lock")):
        if (final / "val" / "manifest.json").is_file():  # another process built it while we waited
            return final
        with tempfile.TemporaryDirectory(dir=base, prefix=f".{name}-") as tmp:
            splits = (("train", train_images_per_class, seed), ("val", val_images_per_class, seed + 1))
            for split, count, split_seed in splits:
                source = write_source(Path(tmp) / "source" / split, count, num_classes, multilabel, source_size,
                                      split_seed)
                write_shards(str(source), str(Path(tmp) / "build" / split), workers=1, progress=False,
                             shard_size=max(1, -(-count * num_classes // DEMO_SHARDS)),
                             num_classes=num_classes if multilabel else None, shuffle_seed=split_seed)
            shutil.rmtree(final, ignore_errors=True)
            (Path(tmp) / "build").rename(final)
    return final


class DemoDataModule(WebDatasetDataModule):
    """WebDatasetDataModule on the cached demo shards (made on first use); test and predict use val.

    Args:
        root: cache directory of the demo data.
        num_classes: number of classes.
        multilabel: 1-3 classes per image with multi-hot targets (JFT-style demo).
        train_images_per_class: training images per class.
        val_images_per_class: validation images per class.
        source_size: side of the generated square images.
        num_workers: DataLoader worker processes per device.
        image_size: side of the square crops fed to the network.
        eval_resize: evaluation resizes the shorter side to this, then centre-crops image_size.
        shuffle_buffer: raw training samples each worker shuffles in memory.
        **kwargs: the other arguments of WebDatasetDataModule (batch_size; seed: of the training stream; the images
            themselves use seed 0 and 1).
    """

    def __init__(
        self,
        root: str = DEMO_ROOT,
        num_classes: int = 10,
        multilabel: bool = False,
        train_images_per_class: int = 100,
        val_images_per_class: int = 20,
        source_size: int = 112,
        num_workers: int = 2,
        image_size: int = 96,
        eval_resize: int = 107,
        shuffle_buffer: int = 1000,
        **kwargs: Any,
    ) -> None:
        data = make_demo_data(root, num_classes, train_images_per_class, val_images_per_class, source_size, multilabel)
        val = str(data / "val")
        # Sizes named (None: from the manifests) so that the command line offers none: the demo fixes them.
        super().__init__(
            train=str(data / "train"), val=val, test=val, predict=val, train_size=None, val_size=None,
            test_size=None, predict_size=None, num_workers=num_workers, image_size=image_size,
            eval_resize=eval_resize, shuffle_buffer=shuffle_buffer, **kwargs)
