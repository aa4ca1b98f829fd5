"""Builders for the data tests: tiny real images, real shards from our writer, hand-made bad shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from xception_pl.data import write_shards


def jpeg(width: int = 40, height: int = 32, seed: int = 0, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def bomb_jpeg(width: int = 50_000, height: int = 50_000) -> bytes:
    """A JPEG header announcing width x height pixels, and no image data behind it."""
    sof = b"\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x03" + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8\xff\xc0" + (len(sof) + 2).to_bytes(2, "big") + sof + b"\xff\xd9"


def image_tree(root: Path, classes: int = 3, per_class: int = 4) -> dict[str, tuple[int, bytes]]:
    """ImageNet layout; returns {relative path without suffix: (label, bytes)}."""
    files = {}
    for label in range(classes):
        for i in range(per_class):
            data = jpeg(seed=label * 100 + i)
            path = root / f"c{label}" / f"img{label}_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files[f"c{label}/img{label}_{i}"] = (label, data)
    return files


def jsonl_source(root: Path, labels: list[list[int]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ids in enumerate(labels):
        (root / f"im{i}.jpg").write_bytes(jpeg(seed=i))
        lines.append(json.dumps({"path": f"im{i}.jpg", "labels": ids}))
    (root / "labels.jsonl").write_text("\n".join(lines) + "\n")
    return root / "labels.jsonl"


def shards(tmp: Path, name: str = "train", classes: int = 3, per_class: int = 4, shard_size: int = 2) -> Path:
    """Real shards from our writer: classes x per_class samples."""
    image_tree(tmp / f"{name}-src", classes, per_class)
    write_shards(str(tmp / f"{name}-src"), str(tmp / name), shard_size=shard_size, workers=1, progress=False)
    return tmp / name


def add_shard(directory: Path, name: str, samples: list[dict], position: int | None = None) -> None:
    """A hand-made tar (bad samples are what the writer refuses to make), listed in the writer's manifest."""
    with wds.TarWriter(str(directory / name), encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = {"name": name, "count": len(samples)}
    manifest["shards"].insert(len(manifest["shards"]) if position is None else position, entry)
    (directory / "manifest.json").write_text(json.dumps(manifest))
