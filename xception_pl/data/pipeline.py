"""The WebDataset pipelines: training (equal batches on every rank) and evaluation (every sample once).

Rank and world size are passed in explicitly and pickled into the workers: webdataset's own
lookup (RANK/WORLD_SIZE env vars, else torch.distributed) fails inside spawned workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import webdataset as wds
from torch.utils.data import get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

from xception_pl import storage

from xception_pl.data.buffers import BatchBuffers
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
    """Seeds every random stream of a pass from (seed, epoch, rank, slot). Epoch, batch and the exact resume's
    skips live in shared memory, so persistent workers see the values the main process sets before each pass
    (EpochLoader).

    A slot is one of the rank's `num_workers` streams: batch t of an epoch comes from slot t % num_workers (the
    DataLoader takes its workers in turn). A pass that resumes an epoch at batch b exactly (same world size and
    workers) runs slot (worker + b) % num_workers in each worker, from the epoch's start, skipping the raw
    samples the slot's trained batches used without decoding them: its batches are those an uninterrupted run
    draws. Otherwise (another world size) the resumed pass is a fresh draw seeded with its batch."""

    def __init__(self, seed: int, rank: int, workers: int = 1) -> None:
        self.seed, self.rank = seed, rank
        self._epoch = multiprocessing.RawValue("q", 0)
        self._batch = multiprocessing.RawValue("q", 0)
        self._exact = multiprocessing.RawValue("b", 1)
        self._skips = multiprocessing.RawArray("q", max(1, workers))

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @property
    def batch(self) -> int:
        return self._batch.value

    @property
    def exact(self) -> bool:
        return bool(self._exact.value)

    def start(self, epoch: int, batch: int, skips: list[int] | None) -> None:
        """Before a pass: it starts at (epoch, batch); `skips`, raw samples per slot, for an exact resume."""
        self._epoch.value, self._batch.value = epoch, batch
        self._exact.value = batch == 0 or skips is not None
        for slot in range(len(self._skips)):
            self._skips[slot] = skips[slot] if skips is not None else 0

    def slot(self) -> tuple[int, int]:
        """(this worker's slot, the number of slots)."""
        worker, workers = worker_slot()
        return ((worker + self.batch) % workers if self.exact else worker), workers

    def skip(self) -> int:
        """Raw samples this worker's slot skips at the start of the pass (an exact resume)."""
        return self._skips[self.slot()[0]] if self.exact else 0

    def first_batch(self) -> int:
        """The epoch's index of the first batch this worker yields in the pass."""
        slot, workers = self.slot()
        if not self.exact:
            return self.batch + worker_slot()[0]
        done = max(0, -(-(self.batch - slot) // workers))  # the slot's batches among the epoch's first `batch`
        return slot + done * workers

    def rng(self, stream: str) -> random.Random:
        resumed = f"/resumed-at-{self.batch}" if self.batch and not self.exact else ""
        return random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{self.slot()[0]}/{stream}{resumed}")


class ResampledShards:
    """Endless shard URLs drawn with replacement. Ours, not wds.ResampledShards: that one counts epochs
    in its own copy (which a fresh or resumed worker restarts at 0) and mixes in time and pid."""

    def __init__(self, urls: list[str], seeds: EpochSeed) -> None:
        self.urls, self.seeds = urls, seeds

    def __call__(self) -> Iterator[dict[str, str]]:
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


def open_shards(urls: Iterator[dict[str, Any]], handler: Callable[[Exception], bool],
                storage_options: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Each shard's byte stream: object store URLs through fsspec (xception_pl.storage, read ahead in the
    background), local paths and `pipe:` commands through webdataset's gopen. An unreadable shard is the
    handler's (counted, skipped)."""
    for sample in urls:
        url = sample["url"]
        try:
            stream = storage.open_shard(url, storage_options) if storage.is_url(url) else gopen(url)
        except Exception as error:  # noqa: BLE001 - as webdataset's url_opener: the handler decides
            error.args = (*error.args, url)
            if handler(error):
                continue
            break
        yield {**sample, "stream": stream}


def shuffle_samples(samples: Iterator[dict[str, Any]], shuffle_buffer: int,
                    seeds: EpochSeed) -> Iterator[dict[str, Any]]:
    """wds.shuffle with its RNG drawn per worker and epoch (it would seed itself from pid and time);
    yields once a tenth of the buffer is full, which then grows to shuffle_buffer."""
    return wds.shuffle(shuffle_buffer, initial=max(1, shuffle_buffer // 10), rng=seeds.rng("samples"))(samples)


def number_samples(samples: Iterator[dict[str, Any]], seeds: EpochSeed) -> Iterator[dict[str, Any]]:
    """Each raw sample of the slot's stream gets its index and the seed of its augmentation, a function of
    (seed, epoch, rank, slot, index) alone (counter-based, ours); on an exact resume the samples the slot
    already trained on pass by undecoded."""
    skip, base = seeds.skip(), seeds.rng("augmentation").getrandbits(62)
    for index, sample in enumerate(samples):
        if index >= skip:
            sample["__index__"], sample["__seed__"] = index, (base + index * 0x9E3779B97F4A7C15) % 2 ** 62
            yield sample


def number_batches(batches: Iterator[dict[str, Any]], seeds: EpochSeed) -> Iterator[dict[str, Any]]:
    """Each training batch carries "stream": [slot, raw samples the slot has used, the seed of the batch's
    randomness in the main process (device augmentation, mixing, dropout)], a function of (seed, epoch, rank,
    the batch's index in the epoch)."""
    slot, workers = seeds.slot()
    index = seeds.first_batch()
    for batch in batches:
        seed = random.Random(f"{seeds.seed}/{seeds.epoch}/{seeds.rank}/batch/{index}").getrandbits(62)
        batch["stream"] = torch.tensor([slot, batch.pop("used"), seed])
        index += workers
        yield batch


def train_pipeline(urls: list[str], seeds: EpochSeed, decoder: DecodeSamples, batch_size: int,
                   shuffle_buffer: int, encoded: bool, buffers: BatchBuffers,
                   storage_options: dict[str, Any] | None = None) -> wds.DataPipeline:
    counter = decoder.counter
    return wds.DataPipeline(
        ResampledShards(urls, seeds),  # endless shard URLs, per (seed, epoch, rank, worker)
        buffers.new_pass,  # a pass starts: this worker's batch buffers are free
        partial(open_shards, handler=counter.handler, storage_options=storage_options),  # local, store, pipe:
        partial(tar_samples, handler=counter.handler),  # the files in each tar (errors counted)
        partial(group_by_keys, handler=counter.handler),  # files with one key -> one raw sample
        partial(shuffle_samples, shuffle_buffer=shuffle_buffer, seeds=seeds),  # shuffle raw bytes, before decoding
        partial(number_samples, seeds=seeds),  # index and seed each sample; an exact resume skips what was trained
        decoder,  # check header and label, decode, augment; bad samples counted and dropped
        wds.batched(batch_size, partial=False, collation_fn=Collate(counter, encoded, buffers)),  # full batches only
        partial(number_batches, seeds=seeds),  # the batch's place in the stream and its seed
    )


def eval_pipeline(urls: list[str], rank: int, world_size: int, decoder: DecodeSamples, batch_size: int,
                  encoded: bool, buffers: BatchBuffers,
                  storage_options: dict[str, Any] | None = None) -> wds.DataPipeline:
    counter = decoder.counter
    return wds.DataPipeline(
        ShardSlot(urls, rank, world_size),  # whole shards per (rank, worker): each sample exactly once
        buffers.new_pass,  # a pass starts: this worker's batch buffers are free
        partial(open_shards, handler=counter.handler, storage_options=storage_options),  # local, store, pipe:
        partial(tar_samples, handler=counter.handler),  # the files in each tar (errors counted)
        partial(group_by_keys, handler=counter.handler),  # files with one key -> one raw sample
        decoder,  # check header and label, decode, resize + centre crop; bad samples counted and dropped
        wds.batched(batch_size, partial=True, collation_fn=Collate(counter, encoded, buffers)),  # last may be short
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
        self.slots = max(1, loader_args.get("num_workers", 0))  # one stream per worker (EpochSeed)
        self.with_epoch(num_batches)

    def __iter__(self) -> Iterator[Any]:
        # Lazily, at the first batch: Lightning also calls iter() once just to see that the loader is iterable.
        trainer_epoch = self.trainer.current_epoch if self.trainer is not None else None
        epoch, batch = self.position.next_pass(trainer_epoch, self.slots, self.seeds.rank)
        self.seeds.start(epoch, batch, self.position.skips)
        self.nsamples = self.num_batches - batch
        if self.nsamples > 0:  # with_epoch reads 0 as "endless"
            yield from super().__iter__()

    def __len__(self) -> int:
        return self.num_batches  # the whole epoch, on a resumed pass too: Lightning counts the epoch's batches
