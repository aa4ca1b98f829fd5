"""Workers stack batches into shared-memory buffers they reuse (data/buffers.py): every batch a consumer holds
stays intact, a worker whose buffers are all busy falls back to a fresh segment, and each pass frees them."""

import itertools

import torch

from tests.component.test_data_pipeline import datamodule
from xception_pl.data.buffers import BatchBuffers


class Recorded(BatchBuffers):
    """BatchBuffers noting the buffer of every batch the main process receives (None: a fresh segment)."""

    def __init__(self, workers: int, buffers: int) -> None:
        super().__init__(workers, buffers)
        self.received: list[int | None] = []

    def release(self, batches):
        def note(batches):
            for batch in batches:
                self.received.append(batch.get("buffer"))
                yield batch
        return super().release(note(batches))


def loaders(tmp_path, buffers: int):
    """(train loader, val loader, their BatchBuffers) of 2 forked workers, batches of 4 from 12 samples."""
    dm = datamodule(tmp_path, num_workers=2, multiprocessing_context="fork", seed=3, batch_size=4)
    made = []
    dm.batch_buffers = lambda workers: made.append(Recorded(workers, buffers)) or made[-1]
    dm.setup("fit")
    return dm.train_dataloader(), dm.val_dataloader(), made


def images(batches):
    return [(b["key"], b["image"]) for b in batches]


def test_batches_held_by_the_consumer_stay_intact_while_workers_reuse_their_buffers(tmp_path):
    train, val, (train_buffers, val_buffers) = loaders(tmp_path, buffers=3)
    held = [b for _ in range(4) for b in train] + list(val) + list(val)  # 4 passes of 3; val: 2 of 4, 2 short
    assert len(held) == 12 + 8
    assert all(buffer is not None for buffer in train_buffers.received + val_buffers.received)  # no fresh segment
    assert len(set(train_buffers.received)) < len(train_buffers.received)  # buffers were reused ...
    assert not any(b["image"].is_shared() for b in held)  # ... and every batch handed out is a copy

    before, before_val, _ = loaders(tmp_path, buffers=0)  # no buffers: a fresh segment per batch, as torch does
    expected = [b for _ in range(4) for b in before] + list(before_val) + list(before_val)
    for got, want in zip(images(held), images(expected), strict=True):
        assert got[0] == want[0] and torch.equal(got[1], want[1])


def test_a_worker_whose_buffers_are_all_busy_stacks_into_a_fresh_segment_and_a_new_pass_frees_them(tmp_path):
    train, _, (buffers, _) = loaders(tmp_path, buffers=1)
    raw = train.pipeline[0]  # the DataLoader itself (endless): no main-process release, so buffers stay busy
    batches = iter(raw)
    first = [(b.get("buffer"), b["image"]) for b in itertools.islice(batches, 3)]
    assert [buffer is not None for buffer, _ in first] == [True, True, False]  # one buffer per worker, then fresh
    assert first[2][1].is_shared() and first[0][0] != first[1][0]
    again = [b.get("buffer") for b in itertools.islice(iter(raw), 2)]  # a new pass: every buffer free again
    assert again == [first[0][0], first[1][0]]

    reference, _, _ = loaders(tmp_path, buffers=0)
    for (_, got), want in zip(first, reference, strict=True):  # what a busy buffer held was never overwritten
        assert torch.equal(got, want["image"])
