"""Training augmentations as named parts, run after the crop and flip (all ours; the paper states none).

A part has two forms: `__call__` on one uint8 [3, S, S] image (CPU workers, decode_device: cpu) and `batch` on a
uint8 [B, 3, S, S] batch on the device (decode_device: cuda), with the same distribution. A part without a
batched form is refused on the cuda path, by name, when the data module is built. Configured as a list:

    data:
      init_args:
        augmentations:
          - class_path: xception_pl.data.augmentations.TrivialAugmentWide
          - class_path: xception_pl.data.augmentations.RandomErasing
            init_args: {p: 0.25}

A new part is a subclass here (or in its own file) with its test: __call__, and batch where it can be batched.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.transforms import v2

from xception_pl.data.batch_crop import to_device


class Augmentation:
    """One step of the training pipeline: uint8 images in, uint8 images of the same size out."""

    def __call__(self, image: Tensor) -> Tensor:
        raise NotImplementedError

    def batch(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def batched(self) -> bool:
        return type(self).batch is not Augmentation.batch


class TrivialAugmentWide(Augmentation):
    """TrivialAugment (Müller & Hutter, ICCV 2021): one of 14 operations per image at a uniformly drawn magnitude;
    torchvision's v2.TrivialAugmentWide. Per image only (no batched form)."""

    def __init__(self, num_magnitude_bins: int = 31) -> None:
        self.transform = v2.TrivialAugmentWide(num_magnitude_bins=num_magnitude_bins)

    def __call__(self, image: Tensor) -> Tensor:
        return self.transform(image)


class RandAugment(Augmentation):
    """RandAugment (Cubuk et al., NeurIPS 2020): num_ops operations per image at `magnitude` (of
    num_magnitude_bins); torchvision's v2.RandAugment. Per image only (no batched form)."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31) -> None:
        self.transform = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins)

    def __call__(self, image: Tensor) -> Tensor:
        return self.transform(image)


class RandomErasing(Augmentation):
    """Random Erasing (Zhong et al., AAAI 2020): with probability p, one rectangle of `scale` of the image's area and
    aspect ratio in `ratio` (log-uniform) is filled with `value`; torchvision's v2.RandomErasing per image, and the
    same draw (10 tries, else nothing erased) vectorised for a batch on the device."""

    def __init__(self, p: float = 0.25, scale: tuple[float, float] = (0.02, 0.33),
                 ratio: tuple[float, float] = (0.3, 3.3), value: int = 0) -> None:
        if not 0.0 <= p <= 1.0 or not 0 <= value <= 255:
            raise ValueError(f"RandomErasing(p={p}, value={value}): p must be in [0, 1] and value in [0, 255]")
        self.p, self.scale, self.ratio, self.value = p, scale, ratio, value
        self.transform = v2.RandomErasing(p=p, scale=scale, ratio=ratio, value=value)

    def __call__(self, image: Tensor) -> Tensor:
        return self.transform(image)

    def boxes(self, count: int, height: int, width: int) -> Tensor:
        """long [count, 4] (x0, y0, x1, y1); an empty box where nothing is erased."""
        tries = 10
        area = height * width * torch.empty(count, tries).uniform_(*self.scale)
        log_ratio = torch.empty(count, tries).uniform_(*map(math.log, self.ratio))
        h, w = (area * log_ratio.exp()).sqrt().round(), (area / log_ratio.exp()).sqrt().round()
        fits = (h < height) & (w < width)
        first = fits.float().argmax(1, keepdim=True)  # the first try that fits, as torchvision's loop takes it
        h, w = h.gather(1, first), w.gather(1, first)
        y0 = ((height - h + 1) * torch.rand(count, 1)).floor()
        x0 = ((width - w + 1) * torch.rand(count, 1)).floor()
        erase = fits.any(1, keepdim=True) & (torch.rand(count, 1) < self.p)
        box = torch.cat([x0, y0, x0 + w, y0 + h], 1)
        return torch.where(erase, box, torch.zeros_like(box)).long()

    def batch(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        box = to_device(self.boxes(len(images), height, width), images.device)[:, :, None, None]
        ys = torch.arange(height, device=images.device)[:, None]
        xs = torch.arange(width, device=images.device)[None, :]
        inside = (xs >= box[:, 0]) & (xs < box[:, 2]) & (ys >= box[:, 1]) & (ys < box[:, 3])  # [B, H, W]
        return images.masked_fill(inside[:, None], self.value)


class OnDevice:
    """decode_device: cuda: the batched crop, then each part's batched form."""

    def __init__(self, crop: Callable[[list[Tensor]], Tensor], parts: list[Augmentation]) -> None:
        unbatched = [type(part).__name__ for part in parts if not part.batched]
        if unbatched:
            raise ValueError(f"data.augmentations: {', '.join(unbatched)} has no batched form for decode_device: "
                             "cuda; use decode_device: cpu, or leave it out")
        self.crop, self.parts = crop, parts

    def __call__(self, images: list[Tensor]) -> Tensor:
        batch = self.crop(images)
        for part in self.parts:
            batch = part.batch(batch)
        return batch
