"""Decode only what the training crop needs (ours).

The crop box is drawn from the JPEG header's size, before any pixel is decoded. A box at least twice the output
size on both sides is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (Pillow's `draft`), and the box
is then cropped from the smaller image and resized to the output: the inverse DCT, colour conversion and resize
shrink with the scale; the entropy decoding of the whole file does not, and it is most of a large JPEG's decode
(1.15-1.18x on 1600x1200 JPEGs; the shard writer's --max_side bounds very large ones once). The draws are
torchvision's RandomResizedCrop's own (its make_params on the header's size), in the same order: an image whose box is smaller
than twice the output comes out bit for bit as from a full decode; the others differ from a full decode +
antialiased resize by libjpeg's scaling filter (measured in benchmarks/RESULTS.md, "Decode what the crop needs").
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from xception_pl.data.samples import Skip, decode

REDUCTIONS = (8, 4, 2)  # the DCT scalings Pillow's draft offers


class DecodeCrop:
    """RandomResizedCrop(size) (Inception-style: area scale 0.08-1, aspect ratio 3/4-4/3), then `then` (the flip
    and the augmentations).

    As a transform, on an image already decoded (uint8 [3, H, W]); `from_bytes` decodes the encoded image
    itself, at the scale its box needs (DecodeSamples calls it)."""

    def __init__(self, size: int, then: list[v2.Transform]) -> None:
        self.size = size
        self.crop = v2.RandomResizedCrop(size, antialias=True)
        self.then = v2.Compose(then)

    @property
    def transforms(self) -> list[v2.Transform]:
        return [self.crop, *self.then.transforms]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.then(self.crop(image))

    def from_bytes(self, data: bytes, width: int, height: int, is_jpeg: bool) -> torch.Tensor:
        box = self.crop.make_params([torch.empty(3, height, width, device="meta")])  # no pixel decoded yet
        reduction = next((r for r in REDUCTIONS if min(box["height"], box["width"]) >= r * self.size), 1)
        if is_jpeg and reduction > 1:
            image = draft_decode(data, width // reduction, height // reduction)
            box = scale_box(box, width, height, image.shape[2], image.shape[1])
        else:
            image = decode(data, is_jpeg)
        return self.then(F.resized_crop(image, **box, size=[self.size, self.size], antialias=True))


def draft_decode(data: bytes, width: int, height: int) -> torch.Tensor:
    """uint8 [3, h, w]: the JPEG decoded at the largest DCT scaling that keeps it at least width x height."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (width, height))
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
    except Exception as exn:
        raise Skip("corrupt_image", repr(exn)[:200]) from exn


def scale_box(box: dict[str, int], width: int, height: int, scaled_width: int, scaled_height: int) -> dict[str, int]:
    """The crop box of a width x height image in the same image scaled to scaled_width x scaled_height."""
    x, y = scaled_width / width, scaled_height / height
    top, left = min(round(box["top"] * y), scaled_height - 1), min(round(box["left"] * x), scaled_width - 1)
    return {"top": top, "left": left, "height": min(max(1, round(box["height"] * y)), scaled_height - top),
            "width": min(max(1, round(box["width"] * x)), scaled_width - left)}
