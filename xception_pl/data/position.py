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

    def state_dict(self, trained: int = 0, epoch_batches: int | None = None) -> dict[str, int]:
        """The next batch to train, `trained` of the current epoch's `epoch_batches` batches being done."""
        if epoch_batches is not None and trained >= epoch_batches:  # saved at the end of the epoch
            return {"seed": self.seed, "epoch": self.epoch + 1, "batch": 0}
        return {"seed": self.seed, "epoch": self.epoch, "batch": trained}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.seed, self.epoch, self.batch = state_dict["seed"], state_dict["epoch"], state_dict.get("batch", 0)
        self.restored = True
