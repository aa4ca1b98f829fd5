"""The WebDataset pipelines: training (equal batches on every rank) and evaluation (every sample once).

Rank and world size are passed in explicitly and pickled into the workers: webdataset's own
lookup (RANK/WORLD_SIZE env vars, else torch.distributed) fails inside spawned workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import webdataset as wds
from torch.utils.data import get_worker_info
from webdataset.tariterators import group_by_keys, url_opener

from xception_pl.data.position import StreamPosition
from xception_pl.data.samples import SKIP_REASONS, Collate, DecodeSamples, SkipCounter
from xception_pl.data.tar import tar_samples

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)


def worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class EpochSeed:
    """Seeds every random stream from (seed, epoch, rank, worker) and, on the pass that resumes an epoch
    mid-way, the batch it resumes at. Epoch and batch live in shared memory, so persistent workers see
    the values the main process sets before each pass (EpochLoader)."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank
        self._epoch = multiprocessing.RawValue("q", 0)
        self._batch = multiprocessing.RawValue("q", 0)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = value

    @property
    def batch(self) -> int:
        return self._batch.value

    @batch.setter
    def batch(self, value: int) -> None:
        self._batch.value = value

    def rng(self, stream: str) -> random.Random:
        worker, _ = worker_slot()
        resumed = f"/resumed-at-{self.batch}" if self.batch else ""
        return random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{stream}{resumed}")


class ResampledShards:
    """Endless shard URLs drawn with replacement. Ours, not wds.ResampledShards: that one counts epochs
    in its own copy (which a fresh or resumed worker restarts at 0) and mixes in time and pid."""

    def __init__(self, urls: list[str], seeds: EpochSeed) -> None:
        self.urls, self.seeds = urls, seeds

    def __call__(self) -> Iterator[dict[str, str]]:
        if get_worker_info() is not None:  # augmentation draws from torch's RNG; only reseed a worker's own
            torch.manual_seed(self.seeds.rng("torch").getrandbits(63))
        rng = self.seeds.rng("shards")
        while True:
            yield {"url": rng.choice(self.urls)}


def rank_shards(urls: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's evaluation shards: shard i goes to rank i % world_size (none when shards < ranks)."""
    return urls[rank::world_size]


class ShardSlot:
    """This (rank, worker)'s evaluation shards: the rank's shards, dealt round-robin to its workers.
    Every shard is read once, by one (rank, worker); a slot without a shard yields nothing."""

    def __init__(self, urls: list[str], rank: int, world_size: int) -> None:
        self.urls = rank_shards(urls, rank, world_size)

    def __call__(self) -> Iterator[dict[str, str]]:
        worker, num_workers = worker_slot()
        for url in self.urls[worker::num_workers]:
            yield {"url": url}


def shuffle_samples(samples: Iterator[dict[str, Any]], shuffle_buffer: int,
                    seeds: EpochSeed) -> Iterator[dict[str, Any]]:
    """wds.shuffle with its RNG drawn per worker and epoch (it would seed itself from pid and time);
    yields once a tenth of the buffer is full, which then grows to shuffle_buffer."""
    return wds.shuffle(shuffle_buffer, initial=max(1, shuffle_buffer // 10), rng=seeds.rng("samples"))(samples)


def train_pipeline(urls: list[str], seeds: EpochSeed, decoder: DecodeSamples, batch_size: int,
                   shuffle_buffer: int, encoded: bool) -> wds.DataPipeline:
    counter = decoder.counter
    return wds.DataPipeline(
        ResampledShards(urls, seeds),  # endless shard URLs, per (seed, epoch, rank, worker)
        partial(url_opener, handler=counter.handler),  # open local paths, pipe: commands, http(s) URLs
        partial(tar_samples, handler=counter.handler),  # the files in each tar (errors counted)
        partial(group_by_keys, handler=counter.handler),  # files with one key -> one raw sample
        partial(shuffle_samples, shuffle_buffer=shuffle_buffer, seeds=seeds),  # shuffle raw bytes, before decoding
        decoder,  # check header and label, decode, augment; bad samples counted and dropped
        wds.batched(batch_size, partial=False, collation_fn=Collate(counter, encoded)),  # full batches only
    )


def eval_pipeline(urls: list[str], rank: int, world_size: int, decoder: DecodeSamples, batch_size: int,
                  encoded: bool) -> wds.DataPipeline:
    counter = decoder.counter
    return wds.DataPipeline(
        ShardSlot(urls, rank, world_size),  # whole shards per (rank, worker): each sample exactly once
        partial(url_opener, handler=counter.handler),  # open local paths, pipe: commands, http(s) URLs
        partial(tar_samples, handler=counter.handler),  # the files in each tar (errors counted)
        partial(group_by_keys, handler=counter.handler),  # files with one key -> one raw sample
        decoder,  # check header and label, decode, resize + centre crop; bad samples counted and dropped
        wds.batched(batch_size, partial=True, collation_fn=Collate(counter, encoded)),  # last batch may be short
        partial(flush_skips, counter=counter),  # drops after the last batch ride on an empty batch
    )


def flush_skips(batches: Iterator[dict[str, Any]], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    yield from batches
    if any(counter.counts):  # e.g. a worker whose only shard was unreadable: its count must not vanish
        yield {"image": torch.empty(0, 3, 0, 0, dtype=torch.uint8), "target": torch.empty(0), "skipped": counter.take(),
               "key": []}


def carry_skips(batches: Iterator[dict[str, Any]], last: bool = False) -> Iterator[dict[str, Any]]:
    """Main-process stage: empty batches never reach the model; their counts go with the next batch. With
    `last` (evaluation), counts after the last batch go out on one empty batch, which the module counts
    without a forward: a rank whose every shard was unreadable still reports its skips."""
    pending = None
    for batch in batches:
        if not batch["key"]:
            pending = batch["skipped"] if pending is None else pending + batch["skipped"]
            continue
        if pending is not None:
            batch["skipped"], pending = batch["skipped"] + pending, None
        yield batch
    if pending is not None and last:
        yield {"image": torch.empty(0, 3, 0, 0, dtype=torch.uint8), "target": torch.empty(0), "skipped": pending,
               "key": []}
    elif pending is not None:
        log.warning("%d samples skipped after this rank's last batch, so not in the data/*skipped count: %s",
                    int(pending.sum()), dict(zip(SKIP_REASONS, pending.tolist())))


class EpochLoader(wds.WebLoader):
    """WebLoader of `num_batches` batches per epoch. Each pass starts where `position` says (the trainer's
    epoch numbers the passes; without a trainer, they are counted): its streams are seeded from that
    (epoch, batch), and it yields the epoch's remaining batches."""

    def __init__(self, dataset: wds.DataPipeline, seeds: EpochSeed, position: StreamPosition,
                 trainer: L.Trainer | None, num_batches: int, **loader_args: Any) -> None:
        super().__init__(dataset, batch_size=None, **loader_args)
        self.seeds, self.position, self.trainer, self.num_batches = seeds, position, trainer, num_batches
        self.with_epoch(num_batches)

    def __iter__(self) -> Iterator[Any]:
        # Lazily, at the first batch: Lightning also calls iter() once just to see that the loader is iterable.
        trainer_epoch = self.trainer.current_epoch if self.trainer is not None else None
        self.seeds.epoch, self.seeds.batch = self.position.next_pass(trainer_epoch)
        self.nsamples = self.num_batches - self.seeds.batch
        if self.nsamples > 0:  # with_epoch reads 0 as "endless"
            yield from super().__iter__()

    def __len__(self) -> int:
        return self.num_batches  # the whole epoch, on a resumed pass too: Lightning counts the epoch's batches
