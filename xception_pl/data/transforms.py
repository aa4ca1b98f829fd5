"""Augmentation (ours; the paper states none) and the [-1, 1] scaling, on CPU workers or on the GPU.

Transforms take and return uint8 [3, H, W] tensors on any device, so the same callable serves
decode_device="cpu" (in the workers) and "cuda" (after the batch reached the GPU). The scaling
to [-1, 1] runs after the transfer: uint8 crosses process and PCIe boundaries at 1/4 the bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from xception_pl.data.samples import SKIP_REASONS, Skip, pil_decode

Transform = Callable[[torch.Tensor], torch.Tensor]


def train_transform(image_size: int) -> Transform:
    """Inception-style RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip."""
    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])


def eval_transform(image_size: int, eval_resize: int) -> Transform:
    """Shorter side to eval_resize, then the centre image_size square (333 -> 299 by default)."""
    return v2.Compose([v2.Resize(eval_resize, antialias=True), v2.CenterCrop(image_size)])


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 x / 127.5 - 1, the Keras Xception preprocessing; float images pass unchanged
    (a custom transform that already normalised)."""
    if images.dtype != torch.uint8:
        return images
    return images.float().div_(127.5).sub_(1.0)


def decode_on_device(batch: dict[str, Any], transform: Transform, device: torch.device) -> dict[str, Any]:
    """Encoded batch (decode_device="cuda") -> decoded, augmented batch on `device`.

    Entries of batch["image"] are JPEG bytes (1-D uint8) or, for non-JPEG sources, images the
    worker decoded (3-D uint8). Corrupt JPEGs are dropped and counted in batch["skipped"].
    """
    encoded = batch["image"]
    try:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device) if all(
            x.ndim == 1 for x in encoded) else None
    except RuntimeError:  # one bad image fails the whole batched call; find it one by one
        images = None
    if images is None:
        images = [decode_one(x, device) for x in encoded]
    keep = [i for i, image in enumerate(images) if image is not None]
    if len(keep) < len(images):
        batch["skipped"][SKIP_REASONS.index("corrupt_image")] += len(images) - len(keep)
        batch["target"] = batch["target"][torch.tensor(keep, dtype=torch.long, device=batch["target"].device)]
        batch["key"] = [batch["key"][i] for i in keep]
    batch["image"] = torch.stack([transform(images[i]) for i in keep]) if keep else torch.empty(
        (0, 3, 0, 0), dtype=torch.uint8, device=device)
    return batch


def decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    if data.ndim == 3:
        return data.to(device)
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        return pil_decode(data.numpy().tobytes()).to(device)
    except Skip:
        return None
