"""decode_device="cuda": workers ship a batch's JPEG bytes packed in one tensor; the main process decodes
(nvjpeg) and crops them on the device, one batch ahead, on a side CUDA stream (ours).

Why packed: every tensor a worker sends costs a shared-memory segment and a socket round trip in the
main process; 32 JPEGs as one tensor plus offsets cost one (benchmarks/RESULTS.md, "Packed JPEG
batches"). Why one batch ahead: decoding batch n + 1 on a side stream overlaps the step on batch n.
On a CPU device the same code runs without streams, which is how the tests exercise it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from xception_pl.data.samples import SKIP_REASONS, Skip, pil_decode, unpack

BatchTransform = Callable[[list[torch.Tensor]], torch.Tensor]  # uint8 [3, H_i, W_i] images -> uint8 [B, 3, S, S]


def decode_all(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 [3, H, W] on `device` per JPEG, None where it cannot be decoded. One batched (nvjpeg) call;
    when it fails, image by image, falling back to the CPU decoders (libjpeg-turbo, then PIL)."""
    try:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad image fails the whole batched call
        return [decode_one(jpeg, device) for jpeg in jpegs]


def decode_one(jpeg: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    for decode in (lambda: decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device),
                   lambda: decode_jpeg(jpeg, mode=ImageReadMode.RGB).to(device),
                   lambda: pil_decode(jpeg.numpy().tobytes()).to(device)):
        try:
            return decode()
        except (RuntimeError, Skip):
            continue
    return None


class DecodeOnDevice:
    """Main-process loader stage: {"jpeg", "jpeg_offsets", ...} batches -> {"image": uint8 [B, 3, S, S] on
    `device`, ...}. Corrupt JPEGs are dropped and counted in "skipped"; an all-corrupt batch comes out
    empty (key []), for carry_skips to drop. "target" stays where it was (Lightning moves it)."""

    def __init__(self, transform: BatchTransform, device: torch.device) -> None:
        self.transform, self.device = transform, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        ahead = None
        for batch in batches:
            launched = self.launch(batch)  # batch n + 1 starts on the side stream ...
            if ahead is not None:
                yield self.finish(*ahead)  # ... while the model steps on batch n
            ahead = launched
        if ahead is not None:
            yield self.finish(*ahead)

    def launch(self, batch: dict[str, Any]) -> tuple[dict[str, Any], torch.cuda.Event | None]:
        if "jpeg" not in batch:  # the empty batch that carries a worker's last skip counts
            return batch, None
        jpegs = unpack(batch.pop("jpeg"), batch.pop("jpeg_offsets"))
        if "stream" in batch:  # a training batch: its crops' draws are a function of its place in the stream
            torch.default_generator.manual_seed(int(batch["stream"][2]) ^ 1)
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            images = decode_all(jpegs, self.device) if jpegs else []
            keep = [i for i, image in enumerate(images) if image is not None]
            if len(keep) < len(images):
                batch["skipped"][SKIP_REASONS.index("corrupt_image")] += len(images) - len(keep)
                batch["target"] = batch["target"][torch.tensor(keep, dtype=torch.long)]
                batch["key"] = [batch["key"][i] for i in keep]
            batch["image"] = self.transform([images[i] for i in keep]) if keep else torch.empty(
                0, 3, 0, 0, dtype=torch.uint8, device=self.device)
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        return batch, event

    def finish(self, batch: dict[str, Any], event: torch.cuda.Event | None) -> dict[str, Any]:
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)  # this batch's decode only, not the one launched after it
            batch["image"].record_stream(current)  # made on the side stream, used on this one
        return batch
