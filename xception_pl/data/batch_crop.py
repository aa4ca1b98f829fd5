"""Crop, resize and flip a decoded batch in a few batched kernels (decode_device="cuda"; ours).

torchvision's per-image transforms launch ~10 small kernels per image on the GPU. Here the crop
boxes are drawn on the host, from the distributions of transforms.train_transform and
eval_transform, and one `torchvision.ops.roi_align` per size group turns every box into an
image_size crop; one indexed op flips. roi_align (aligned=True) samples like bilinear resizing
(align_corners=False) and, when shrinking, averages ceil(box / image_size)^2 samples per output
pixel: close to torchvision's antialiased resize, not equal to it.

Nothing here waits for the GPU: the boxes, flips and sizes go to the device from pinned memory
(`to_device`), so the host keeps queueing the training step while the side stream crops.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align

from xception_pl.data.transforms import Transform

CANVAS_SLACK = 2.0  # a size group's padded canvas holds at most this many times its images' pixels


class RandomResizedCropFlip:
    """RandomResizedCrop(image_size) + horizontal flip, as transforms.train_transform, for a batch.

    Boxes follow torchvision's RandomResizedCrop.get_params (area scale and log-uniform aspect
    ratio, 10 tries per image, then the central crop), drawn for the whole batch at once from
    torch's global RNG (as torchvision draws them)."""

    def __init__(self, image_size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.image_size, self.scale, self.ratio = image_size, scale, ratio

    def boxes(self, sizes: torch.Tensor) -> torch.Tensor:
        """sizes: long [B, 2] (height, width) -> float [B, 4] (x0, y0, x1, y1) in pixels."""
        height, width = sizes[:, :1].double(), sizes[:, 1:].double()
        tries = 10
        area = height * width * torch.empty(len(sizes), tries, dtype=torch.double).uniform_(*self.scale)
        log_ratio = torch.empty(len(sizes), tries, dtype=torch.double).uniform_(*map(math.log, self.ratio))
        w, h = (area * log_ratio.exp()).sqrt().round(), (area / log_ratio.exp()).sqrt().round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.double().argmax(1, keepdim=True)  # the first try that fits, as the loop takes it
        w, h = w.gather(1, first), h.gather(1, first)
        x0 = ((width - w + 1) * torch.rand(len(sizes), 1, dtype=torch.double)).floor()  # randint(0, W - w + 1)
        y0 = ((height - h + 1) * torch.rand(len(sizes), 1, dtype=torch.double)).floor()
        # no try fits: the central crop with the aspect ratio clamped into `ratio`
        cw = torch.minimum(width, (height * self.ratio[1]).round())
        ch = torch.minimum(height, (width / self.ratio[0]).round())
        cx, cy = ((width - cw) / 2).floor(), ((height - ch) / 2).floor()
        ok = fits.any(1, keepdim=True)
        x0, y0, w, h = x0.where(ok, cx), y0.where(ok, cy), w.where(ok, cw), h.where(ok, ch)
        return torch.cat([x0, y0, x0 + w, y0 + h], 1)

    def flips(self, batch: int) -> torch.Tensor:
        return torch.rand(batch) < 0.5

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        sizes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.long).reshape(-1, 2)
        return crop_batch(images, self.boxes(sizes), self.flips(len(images)), self.image_size)


class ResizeCenterCrop(RandomResizedCropFlip):
    """Shorter side to eval_resize, then the centre image_size square, as transforms.eval_transform
    (torchvision's Resize and CenterCrop rounding), expressed as one box in the original image."""

    def __init__(self, image_size: int, eval_resize: int) -> None:
        super().__init__(image_size)
        self.eval_resize = eval_resize

    def boxes(self, sizes: torch.Tensor) -> torch.Tensor:
        height, width = sizes[:, 0].double(), sizes[:, 1].double()
        short, long = torch.minimum(height, width), torch.maximum(height, width)
        resized_long = (self.eval_resize * long / short).floor()  # torchvision: int(size * long / short)
        resized_h = torch.where(height <= width, self.eval_resize, resized_long)
        resized_w = torch.where(height <= width, resized_long, self.eval_resize)
        top, left = ((resized_h - self.image_size) / 2).round(), ((resized_w - self.image_size) / 2).round()
        sy, sx = height / resized_h, width / resized_w
        return torch.stack([left * sx, top * sy, (left + self.image_size) * sx, (top + self.image_size) * sy], 1)

    def flips(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, dtype=torch.bool)


class PerImage:
    """A user's own transform, image by image (no batched equivalent is known for it)."""

    def __init__(self, transform: Transform) -> None:
        self.transform = transform

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])


def size_groups(sizes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices grouped so that each group's padded canvas (its largest height x largest width, per image)
    stays within CANVAS_SLACK x its pixels: one huge image must not make the whole batch huge."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i][0] * sizes[i][1], reverse=True)
    groups: list[list[int]] = []
    for i in order:
        h, w = sizes[i]
        if groups:
            top, left, pixels = max(height, h), max(width, w), pixels + h * w
            if (len(groups[-1]) + 1) * top * left <= CANVAS_SLACK * pixels:
                groups[-1].append(i)
                height, width = top, left
                continue
        groups.append([i])
        height, width, pixels = h, w, h * w
    return groups


def crop_batch(images: list[torch.Tensor], boxes: torch.Tensor, flip: torch.Tensor,
               image_size: int) -> torch.Tensor:
    """uint8 images [3, H_i, W_i] -> uint8 [B, 3, image_size, image_size]: box i of image i, resized, mirrored
    where flip."""
    device = images[0].device
    out = torch.empty(len(images), 3, image_size, image_size, device=device)
    for group in size_groups([tuple(image.shape[-2:]) for image in images]):
        canvas = pad_to_canvas([images[i] for i in group])
        rois = torch.cat([torch.arange(len(group), dtype=boxes.dtype)[:, None], boxes[group]], 1)
        index = to_device(torch.tensor(group), device)
        rois = to_device(rois.to(canvas.dtype), device)
        out.index_copy_(0, index, roi_align(canvas, rois, image_size, aligned=True))
    out = torch.where(to_device(flip, device)[:, None, None, None], out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def pad_to_canvas(images: list[torch.Tensor]) -> torch.Tensor:
    """float [n, 3, maxH + 1, maxW + 1], image i at the top left of slot i, its last row and column
    repeated once below and right of it: roi_align's bilinear samples within half a pixel of the
    bottom or right edge then read what the image's own border clamping would give."""
    heights = torch.tensor([image.shape[-2] for image in images])
    widths = torch.tensor([image.shape[-1] for image in images])
    canvas = torch.zeros(len(images), 3, int(heights.max()) + 1, int(widths.max()) + 1, device=images[0].device)
    for slot, image in zip(canvas, images):
        slot[:, :image.shape[-2], :image.shape[-1]].copy_(image)  # uint8 -> float on the way
    n = torch.arange(len(images), device=canvas.device)
    heights, widths = to_device(heights, canvas.device), to_device(widths, canvas.device)
    canvas[n, :, heights, :] = canvas[n, :, heights - 1, :]
    canvas[n, :, :, widths] = canvas[n, :, :, widths - 1]
    return canvas


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`. To CUDA from pageable memory, a copy waits until the stream has
    drained (a host sync, 5 per batch before this); from pinned memory it is queued like a kernel, and the
    pinned block is not reused before the copy has run (torch's caching host allocator)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
