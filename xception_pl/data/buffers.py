"""Worker-to-main transfer of image batches through shared-memory buffers that each worker reuses (ours).

In a DataLoader worker, torch's default_collate stacks every batch into a fresh shared-memory segment, whose pages
the kernel zeroes and maps one fault at a time: ~8 ms for a [32, 3, 299, 299] uint8 batch against < 1 ms into a
segment already mapped, a seventh of a worker's decode + augment time (benchmarks/RESULTS.md, "Data pipeline").
Here each worker keeps a few segments and stacks into one that is free.

A buffer is busy from the worker's `stack` to the main process's `release` (one flag per buffer in shared
memory). `release` runs on each batch as the DataLoader hands it out: a pinned batch (pin_memory) is already a
copy; otherwise the images are copied out first. So no batch a consumer holds is ever overwritten, however long
it holds it. A worker whose buffers are all busy stacks into a fresh segment, as torch does. Each pass frees its
worker's flags (`new_pass`): the batches of the previous pass that the DataLoader discarded never reach `release`.

How many: a worker has at most prefetch_factor batches the DataLoader has not handed out, and it is sent its next
task just before `release` frees the batch handed out: prefetch_factor + 1 buffers, and a fresh segment is the
exception.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import default_collate, get_worker_info


class BatchBuffers:
    """Args: workers: the loader's worker processes (0: the main process loads, stacks as torch does);
    buffers: per worker (prefetch_factor + 1)."""

    def __init__(self, workers: int, buffers: int) -> None:
        self.buffers = buffers
        self.busy = multiprocessing.RawArray("b", max(1, workers) * buffers)
        self.storages: list[torch.UntypedStorage | None] = [None] * buffers  # this worker's, made at first use
        self.mapped: dict[int, torch.Tensor] = {}  # the main process's view of each buffer

    def __getstate__(self) -> dict[str, Any]:  # a worker starts with no buffer of its own and no main-process view
        return {**self.__dict__, "storages": [None] * self.buffers, "mapped": {}}

    def new_pass(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Worker pipeline stage at the start of each pass: this worker's buffers are free again."""
        info = get_worker_info()
        if info is not None:
            for i in range(self.buffers):
                self.busy[info.id * self.buffers + i] = 0
        yield from samples

    def stack(self, images: list[Any]) -> tuple[torch.Tensor, int | None]:
        """(the images stacked, the buffer they are in); (default_collate's batch, None) outside a worker, when
        every buffer is busy, or for images that are not tensors of one shape and dtype."""
        info = get_worker_info()
        first = images[0]
        if info is None or not all(isinstance(image, torch.Tensor) and image.shape == first.shape
                                   and image.dtype == first.dtype for image in images):
            return default_collate(images), None
        free = next((i for i in range(self.buffers) if not self.busy[info.id * self.buffers + i]), None)
        if free is None:
            return default_collate(images), None
        shape = (len(images), *first.shape)
        nbytes = first.element_size() * first.numel() * len(images)
        storage = self.storages[free]
        if storage is None or storage.nbytes() < nbytes:  # first use, or larger images (progressive resizing)
            storage = self.storages[free] = torch.UntypedStorage(nbytes).share_memory_()
        batch = torch.stack(images, out=torch.empty(0, dtype=first.dtype).set_(storage, 0, shape))
        self.busy[info.id * self.buffers + free] = 1
        return batch, info.id * self.buffers + free

    def release(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Main-process stage: each batch's buffer is freed, after its images are copied out unless pinned. The
        buffer stays mapped here (`mapped`): torch's receiving end finds it in its cache next time, no new mapping."""
        for batch in batches:
            buffer = batch.pop("buffer", None)
            if buffer is not None:
                if not batch["image"].is_pinned():
                    self.mapped[buffer] = batch["image"]
                    batch["image"] = batch["image"].clone()
                self.busy[buffer] = 0
            yield batch
