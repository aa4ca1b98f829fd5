"""One sample from raw tar bytes to (image, target): checks, decode, augment; bad samples counted, not raised.

webdataset's own handlers either raise, drop silently, or (warn_and_continue) sleep 0.5 s per
error; here every drop is counted per reason, rides along with the next batch, and is logged.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from xception_pl.data.buffers import BatchBuffers

log = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt_image", "missing_field", "bad_label", "too_large", "read_error")
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
MAX_READ_ERROR_STREAK = 100  # this many unreadable shards in a row, no good sample between: a broken source


class Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SkipCounter:
    """Dropped samples per reason in one worker since its previous batch; rate-limited WARNING log."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.counts = [0] * len(SKIP_REASONS)
        self.total = 0
        self.read_error_streak = 0

    def skip(self, reason: str, detail: str) -> None:
        self.counts[SKIP_REASONS.index(reason)] += 1
        self.total += 1
        if self.total <= 10 or self.total % 1000 == 0:
            log.warning("%s data: skipped a sample (%s: %s); %d skipped by this worker so far",
                        self.stage, reason, detail, self.total)

    def handler(self, exn: Exception) -> bool:
        """webdataset handler for shard open/untar errors: count, and go on with the next shard."""
        self.read_error_streak += 1
        if self.read_error_streak >= MAX_READ_ERROR_STREAK:
            raise RuntimeError(f"{self.stage} data: {self.read_error_streak} shard read errors in a row and no "
                               "readable sample; check the shard paths/URLs and that they are readable") from exn
        self.skip("read_error", repr(exn)[:300])
        return True

    def take(self) -> torch.Tensor:
        counts = torch.tensor(self.counts, dtype=torch.long)
        self.counts = [0] * len(SKIP_REASONS)
        return counts


def jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF header without decoding; None when `data` is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    raise Skip("corrupt_image", "no JPEG frame header")


def image_dimensions(data: bytes) -> tuple[tuple[int, int], bool]:
    """((width, height), is_jpeg) read from the header only."""
    dimensions = jpeg_dimensions(data)
    if dimensions is not None:
        return dimensions, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # lazy: parses the header, decodes nothing
                return im.size, False
    except Image.DecompressionBombError as exn:
        raise Skip("too_large", str(exn)) from exn
    except Exception as exn:
        raise Skip("corrupt_image", repr(exn)[:200]) from exn


def pil_decode(data: bytes) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    except Exception as exn:
        raise Skip("corrupt_image", repr(exn)[:200]) from exn


def decode(data: bytes, is_jpeg: bool) -> torch.Tensor:
    """uint8 [3, H, W]. torchvision's libjpeg-turbo for JPEGs (faster than PIL), PIL for the rest
    and for the JPEGs libjpeg-turbo refuses."""
    if is_jpeg:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass
    return pil_decode(data)


class DecodeSamples:
    """Pipeline stage: raw webdataset samples -> {"image", "target", "key"}; bad ones counted and dropped.

    Args:
        counter: where drops are counted.
        num_classes: labels must lie in [0, num_classes).
        multilabel: labels from `<key>.json` (a list of class ids) as a multi-hot float vector;
            otherwise `<key>.cls` (an integer) as a class id.
        transform: uint8 [3, H, W] -> [3, S, S] augmentation (None: keep the JPEG bytes; other formats
            are re-encoded as JPEG quality 95, as the shard writer does, for the device's JPEG decoder).
            One with from_bytes(data, width, height, is_jpeg) decodes the image itself (data/scaled_decode.py).
        max_image_pixels: larger images are dropped as "too_large" from their header alone.
        labels_required: False for predict: a missing label gives target -1 (or all zeros).
    """

    def __init__(self, counter: SkipCounter, num_classes: int, multilabel: bool,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None, max_image_pixels: int,
                 labels_required: bool = True) -> None:
        self.counter, self.num_classes, self.multilabel = counter, num_classes, multilabel
        self.transform, self.max_image_pixels, self.labels_required = transform, max_image_pixels, labels_required

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            key = sample.get("__key__", "?")
            if "__seed__" in sample:  # the augmentation's draws, a function of the sample's place alone
                torch.default_generator.manual_seed(sample["__seed__"])
            try:
                out = self.decode(sample)
            except Skip as skip:
                self.counter.skip(skip.reason, f"{key} in {sample.get('__url__')}: {skip}")
                continue
            self.counter.read_error_streak = 0
            if "__index__" in sample:  # training: where the sample is in its slot's stream (pipeline.number_samples)
                out["index"] = sample["__index__"]
            yield out

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        data = next((sample[f] for f in IMAGE_FIELDS if f in sample), None)
        if data is None:
            raise Skip("missing_field", f"no image (.{', .'.join(IMAGE_FIELDS)}) among {sorted(sample)}")
        target = self.target(sample)
        (width, height), is_jpeg = image_dimensions(data)
        if width * height > self.max_image_pixels:
            raise Skip("too_large", f"{width}x{height} pixels > max_image_pixels={self.max_image_pixels}")
        if self.transform is None:  # decode_device="cuda": JPEG bytes travel, the GPU decodes
            image = data if is_jpeg else encode_jpeg(decode(data, False), quality=95).numpy().tobytes()
        elif hasattr(self.transform, "from_bytes"):  # decodes at the scale its crop needs (data/scaled_decode.py)
            image = self.transform.from_bytes(data, width, height, is_jpeg)
        else:
            image = self.transform(decode(data, is_jpeg))
        return {"image": image, "target": target, "key": sample["__key__"]}

    def target(self, sample: dict[str, Any]) -> int | torch.Tensor:
        field = "json" if self.multilabel else "cls"
        if field not in sample:
            if self.labels_required:
                raise Skip("missing_field", f"no .{field} label among {sorted(sample)}")
            return torch.zeros(self.num_classes) if self.multilabel else -1
        try:
            labels = json.loads(sample[field]) if self.multilabel else int(sample[field])
        except ValueError as exn:
            raise Skip("bad_label", f".{field} is not {'a JSON list' if self.multilabel else 'an integer'}") from exn
        ids = labels if self.multilabel else [labels]
        if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < self.num_classes for i in ids):
            raise Skip("bad_label", f"{labels!r} is not {'a list of ' if self.multilabel else ''}class ids "
                                    f"in [0, {self.num_classes})")
        if self.multilabel:
            return torch.zeros(self.num_classes).index_fill_(0, torch.tensor(ids, dtype=torch.long), 1.0)
        return labels


def pack(blobs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded images -> (uint8 bytes of all, int64 offsets [B + 1]); image i is bytes[offsets[i]:offsets[i+1]]."""
    offsets = torch.tensor([0, *itertools.accumulate(len(blob) for blob in blobs)], dtype=torch.long)
    return torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8), offsets


def unpack(data: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    bounds = offsets.tolist()  # a CPU tensor: no device sync
    return [data[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


class Collate:
    """Samples -> the batch dict; "skipped" carries this worker's drops since its previous batch.
    encoded: the samples' JPEG bytes go packed into "jpeg" (uint8) + "jpeg_offsets" [B + 1], in place of
    "image": one tensor to send to the main process, not one per image (device_decode unpacks them).
    buffers: where the images are stacked; in a worker, a shared-memory buffer it reuses, named by "buffer"
    (data/buffers.py)."""

    def __init__(self, counter: SkipCounter, encoded: bool, buffers: BatchBuffers) -> None:
        self.counter, self.encoded, self.buffers = counter, encoded, buffers

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = [s["image"] for s in samples]
        batch = {
            "target": default_collate([s["target"] for s in samples]),
            "skipped": self.counter.take(),
            "key": [s["key"] for s in samples],
        }
        if "index" in samples[-1]:  # training: the raw samples of the stream this batch used up
            batch["used"] = samples[-1]["index"] + 1
        if self.encoded:
            batch["jpeg"], batch["jpeg_offsets"] = pack(images)
        else:
            batch["image"], buffer = self.buffers.stack(images)
            if buffer is not None:
                batch["buffer"] = buffer
        return batch
