"""Plain image files to predict: a folder (searched recursively) or a glob, instead of shards.

A file that cannot be read or decoded is left out of its batch, counted in the batch's "skipped"
and named in its "failed" list (xception_pl.predictions writes it to the output), never raised.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from xception_pl.data.labels import IMAGE_SUFFIXES, images_under
from xception_pl.data.samples import SKIP_REASONS, Skip, decode, image_dimensions
from xception_pl.data.sources import MANIFEST, is_remote

GLOB_CHARS = "*?["


def image_files(spec: str) -> list[str] | None:
    """The image files `spec` names: a folder without a manifest.json, a glob, or one image; None for shards."""
    if is_remote(spec):  # a URL's "?" is not a glob
        return None
    path = Path(spec).expanduser()
    if any(c in spec for c in GLOB_CHARS):
        files = sorted(p for p in glob.glob(str(path), recursive=True)
                       if Path(p).suffix.lower() in IMAGE_SUFFIXES and Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"predict={spec!r} matches no image file ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                                    "give a folder of images, a glob of them, or a shard directory")
        return files
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return [str(path)]
    if path.is_dir() and not (path / MANIFEST).exists():
        files = [str(p) for p in images_under(path)]
        if files:
            return files
        if not any(path.glob("*.tar")):
            raise FileNotFoundError(f"predict={spec!r} holds no image files and no {MANIFEST}: give a folder of "
                                    "images, a glob of them, or a shard directory")
    return None  # shards: resolved as the other splits are


class ImageFiles(Dataset):
    """{"image": uint8 [3, S, S], "key": path}, or {"key": path, "error": why} for a file it cannot use."""

    def __init__(self, files: list[str], transform: Callable[[torch.Tensor], torch.Tensor],
                 max_image_pixels: int) -> None:
        self.files, self.transform, self.max_image_pixels = files, transform, max_image_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        try:
            data = Path(path).read_bytes()
            (width, height), is_jpeg = image_dimensions(data)
            if width * height > self.max_image_pixels:
                raise Skip("too_large", f"{width}x{height} pixels")
            return {"image": self.transform(decode(data, is_jpeg)), "key": path}
        except Skip as skip:
            return {"key": path, "error": str(skip), "reason": skip.reason}
        except OSError as error:
            return {"key": path, "error": f"read_error: {error}", "reason": "read_error"}


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A predict batch of the readable samples; the others counted per reason and listed in "failed"."""
    good = [s for s in samples if "image" in s]
    bad = [s for s in samples if "image" not in s]
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    for sample in bad:
        skipped[SKIP_REASONS.index(sample["reason"])] += 1
    images = (torch.stack([s["image"] for s in good]) if good
              else torch.zeros(0, 3, 299, 299, dtype=torch.uint8))  # none readable: an empty batch
    return {"image": images, "target": torch.full((len(good),), -1, dtype=torch.long), "skipped": skipped,
            "key": [s["key"] for s in good], "failed": [(s["key"], s["error"]) for s in bad]}


def image_loader(files: list[str], transform: Callable[[torch.Tensor], torch.Tensor], max_image_pixels: int,
                 batch_size: int, **loader_args: Any) -> DataLoader:
    """Batches in file order; under DDP Lightning gives each rank its own part of the files."""
    return DataLoader(ImageFiles(files, transform, max_image_pixels), batch_size=batch_size, shuffle=False,
                      collate_fn=collate_images, **loader_args)
