"""Where the training stream is: what a checkpoint saves, and where the next pass over the data starts."""

from __future__ import annotations

from typing import Any


class StreamPosition:
    """(seed, epoch, batch) of the training stream, and the raw samples each of the rank's streams (slots, one per
    worker) has used, kept in the main process.

    Lightning restores a loader's counters, not its stream. So a pass seeds its streams from (seed, epoch, rank,
    slot) and yields only the epoch's remaining batches: the epoch ends at the same step as an uninterrupted one
    without replaying what it trained on. Resumed on the same world size and workers, the pass is exact: each slot
    reads its stream again from the epoch's start and passes the raw samples its trained batches used without
    decoding them (reading, not decoding, up to an epoch of tar bytes), so the batches and their random draws are
    an uninterrupted run's. On another world size the rest of the epoch is a fresh draw seeded with the batch it
    resumes at (shards are drawn with replacement anyway); later epochs equal an uninterrupted run's.
    """

    def __init__(self, seed: int) -> None:
        self.seed, self.epoch, self.batch = seed, 0, 0  # the current pass starts at (epoch, batch)
        self.restored = False  # load_state_dict ran: the next pass starts where the checkpoint left off
        self.loaded: dict[str, Any] = {}  # what load_state_dict was given
        self.started = False
        self.batch_shift = 0  # see load_state_dict
        self.saved_used: list[list[int]] | None = None  # restored: raw samples used per (rank, slot)
        self.skips: list[int] | None = None  # this pass resumes exactly, skipping these per slot
        self.used: list[int] = [0]  # raw samples used per slot by the batches trained in this pass's epoch
        self.done = 0  # batches of this pass that reached the step

    def next_pass(self, trainer_epoch: int | None, workers: int = 1, rank: int = 0) -> tuple[int, int]:
        """(epoch, batch) the next pass starts at: the restored position right after load_state_dict, else
        the start of the trainer's epoch (without a trainer: of the epoch after the previous pass)."""
        self.skips = None
        if self.restored:
            self.restored = False
            saved = self.saved_used
            if self.batch and saved is not None and rank < len(saved) and len(saved[rank]) == workers:
                self.skips = saved[rank]
        elif trainer_epoch is not None:
            self.epoch, self.batch = trainer_epoch, 0
        elif self.started:
            self.epoch, self.batch = self.epoch + 1, 0
        self.started = True
        self.used, self.done = list(self.skips or [0] * workers), 0
        return self.epoch, self.batch

    def note(self, stream: list[int]) -> int:
        """A training batch's "stream" [slot, raw samples used, seed] reached the step: note it; its seed."""
        slot, used, seed = stream
        if slot < len(self.used):
            self.used[slot] = used
        self.done += 1
        return seed

    @property
    def trained(self) -> int:
        """Batches of the current epoch trained: the pass's start and its batches noted since. Ours, not
        Lightning's batch counters: after a resume from the end of an epoch, a later checkpoint's epoch progress
        says the next epoch has not started, and a resume from it restarts Lightning's count of that epoch."""
        return self.batch + self.done

    def state_dict(self, trained: int = 0, epoch_batches: int | None = None, global_batch: int = 0) -> dict[str, Any]:
        """The next batch to train, `trained` of the current epoch's `epoch_batches` batches of `global_batch`
        samples (all ranks) being done; "samples" and "trained" let a resume on another world size convert.
        Restored and no pass started since (a checkpoint after the resumed run's first validation): the restored
        position, as loaded; Lightning's batch counters may still be those of the epoch the checkpoint ended."""
        if self.restored:
            return dict(self.loaded)
        ended = epoch_batches is not None and trained >= epoch_batches  # saved at the end of the epoch
        state = {"seed": self.seed, "epoch": self.epoch + ended, "batch": 0 if ended else trained}
        if global_batch:  # in a fit
            state.update(samples=0 if ended else trained * global_batch, trained=trained)
        return state

    def load_state_dict(self, state_dict: dict[str, Any], global_batch: int | None = None,
                        epoch_batches: int | None = None, world_size: int = 1) -> None:
        """Restore; with the global batch and epoch length of this run, convert a position taken on another world
        size: the epoch goes on at the same sample (rounded down to a whole global batch), and `batch_shift` is
        what Lightning's restored batch counters (in batches of the saved run) must move by to agree."""
        self.seed, self.epoch, self.batch = state_dict["seed"], state_dict["epoch"], state_dict.get("batch", 0)
        self.restored, self.loaded = True, dict(state_dict)
        self.batch_shift = 0
        used = state_dict.get("used")  # [rank][slot], when saved by a fit (the datamodule gathers it)
        self.saved_used = used if used is not None and len(used) == world_size else None
        if global_batch is None or "samples" not in state_dict:  # without a trainer, or an older checkpoint
            return
        if state_dict["batch"] == 0 and state_dict["samples"] == 0 and state_dict["trained"]:  # an epoch's end
            self.batch_shift = epoch_batches - state_dict["trained"]  # Lightning then sees its epoch whole
            return
        self.batch = state_dict["samples"] // global_batch
        self.batch_shift = self.batch - state_dict["trained"]
        if self.batch_shift:
            self.saved_used = None  # another global batch: the rest of the epoch is a fresh draw
