"""Where the training stream is: what a checkpoint saves, and where the next pass over the data starts."""

from __future__ import annotations


class StreamPosition:
    """(seed, epoch, batch) of the training stream, kept in the main process.

    Lightning restores a loader's counters, not its stream. So a pass seeds its streams from (seed, epoch,
    rank, worker) and, when it resumes an epoch mid-way, the batch it starts at, and yields only the epoch's
    remaining batches: the epoch ends at the same step as an uninterrupted one without replaying what it
    trained on. Its rest is a fresh draw (shards are drawn with replacement anyway), the same on every resume
    from that checkpoint; later epochs equal an uninterrupted run's. Fast-forwarding the old stream instead
    would read and decode up to an epoch of data on every resume.
    """

    def __init__(self, seed: int) -> None:
        self.seed, self.epoch, self.batch = seed, 0, 0  # the current pass starts at (epoch, batch)
        self.restored = False  # load_state_dict ran: the next pass starts where the checkpoint left off
        self.started = False
        self.batch_shift = 0  # see load_state_dict

    def next_pass(self, trainer_epoch: int | None) -> tuple[int, int]:
        """(epoch, batch) the next pass starts at: the restored position right after load_state_dict, else
        the start of the trainer's epoch (without a trainer: of the epoch after the previous pass)."""
        if self.restored:
            self.restored = False
        elif trainer_epoch is not None:
            self.epoch, self.batch = trainer_epoch, 0
        elif self.started:
            self.epoch, self.batch = self.epoch + 1, 0
        self.started = True
        return self.epoch, self.batch

    def state_dict(self, trained: int = 0, epoch_batches: int | None = None, global_batch: int = 0) -> dict[str, int]:
        """The next batch to train, `trained` of the current epoch's `epoch_batches` batches of `global_batch`
        samples (all ranks) being done; "samples" and "trained" let a resume on another world size convert."""
        ended = epoch_batches is not None and trained >= epoch_batches  # saved at the end of the epoch
        state = {"seed": self.seed, "epoch": self.epoch + ended, "batch": 0 if ended else trained}
        if global_batch:  # in a fit
            state.update(samples=0 if ended else trained * global_batch, trained=trained)
        return state

    def load_state_dict(self, state_dict: dict[str, int], global_batch: int | None = None,
                        epoch_batches: int | None = None) -> None:
        """Restore; with the global batch and epoch length of this run, convert a position taken on another world
        size: the epoch goes on at the same sample (rounded down to a whole global batch), and `batch_shift` is
        what Lightning's restored batch counters (in batches of the saved run) must move by to agree."""
        self.seed, self.epoch, self.batch = state_dict["seed"], state_dict["epoch"], state_dict.get("batch", 0)
        self.restored = True
        self.batch_shift = 0
        if global_batch is None or "samples" not in state_dict:  # without a trainer, or an older checkpoint
            return
        if state_dict["batch"] == 0 and state_dict["samples"] == 0 and state_dict["trained"]:  # an epoch's end
            self.batch_shift = epoch_batches - state_dict["trained"]  # Lightning then sees its epoch whole
            return
        self.batch = state_dict["samples"] // global_batch
        self.batch_shift = self.batch - state_dict["trained"]
