"""Augmentation (ours; the paper states none) and the [-1, 1] scaling, on CPU workers or on the GPU.

Transforms take and return uint8 [3, H, W] tensors on any device. With decode_device="cuda" the
defaults run batched instead (data/batch_crop.py: the same crops, a few kernels per batch); a custom
transform runs image by image on the device. The scaling to [-1, 1] runs after the transfer: uint8
crosses process and PCIe boundaries at 1/4 the bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from xception_pl.data.scaled_decode import DecodeCrop

Transform = Callable[[torch.Tensor], torch.Tensor]


def train_transform(image_size: int, augmentations: list[Transform] | None = None) -> DecodeCrop:
    """Inception-style RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip, then the augmentations;
    JPEGs are decoded at the scale the crop needs (data/scaled_decode.py)."""
    return DecodeCrop(image_size, then=[v2.RandomHorizontalFlip(), *(augmentations or [])])


def eval_transform(image_size: int, eval_resize: int) -> Transform:
    """Shorter side to eval_resize, then the centre image_size square (333 -> 299 by default)."""
    return v2.Compose([v2.Resize(eval_resize, antialias=True), v2.CenterCrop(image_size)])


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 x / 127.5 - 1, the Keras Xception preprocessing; float images pass unchanged
    (a custom transform that already normalised)."""
    if images.dtype != torch.uint8:
        return images
    return images.float().div_(127.5).sub_(1.0)
