"""Callbacks that the multi-process tests hand to the CLI (`--trainer.callbacks+=tests.probes.X`): each rank
writes what it saw to `<output>.rank<r>.json`."""

import json
from pathlib import Path

import lightning as L
import torch


class RankProbe(L.Callback):
    """Per rank: the dropout masks of the first training step (drawn from the model's torch generator, as
    the network's dropout is), and `rank + 1` skipped samples reported in every training batch."""

    def __init__(self, output: str) -> None:
        self.output, self.masks = Path(output), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.masks = torch.nn.functional.dropout(torch.ones(16), 0.5).tolist()
        batch["skipped"] = torch.tensor([trainer.global_rank + 1], device=pl_module.device)

    def on_train_end(self, trainer, pl_module):
        path = self.output.with_name(f"{self.output.stem}.rank{trainer.global_rank}.json")
        path.write_text(json.dumps({"masks": self.masks, "batches": trainer.num_training_batches}))


class SlowSteps(L.Callback):
    """Each training step takes at least `seconds`; rank 0 touches `marker` after step `after` (a signal sent
    then lands in the middle of an epoch)."""

    def __init__(self, marker: str, seconds: float = 0.3, after: int = 3) -> None:
        self.marker, self.seconds, self.after = Path(marker), seconds, after

    def on_train_batch_end(self, trainer, pl_module, *args):
        import time

        time.sleep(self.seconds)
        if trainer.is_global_zero and trainer.global_step == self.after:
            self.marker.touch()


class SignalsNoted(L.Callback):
    """Per rank, when the fit stops on an exception (the SIGTERM exit): the signal that rank's RequeueOnSignal
    noted itself (null: it learned of the stop only from the other ranks) and the rank's process id."""

    def __init__(self, output: str) -> None:
        self.output = Path(output)

    def on_exception(self, trainer, pl_module, exception):
        import os

        from xception_pl.slurm import RequeueOnSignal

        [requeue] = [c for c in trainer.callbacks if isinstance(c, RequeueOnSignal)]
        path = self.output.with_name(f"{self.output.stem}.rank{trainer.global_rank}.json")
        path.write_text(json.dumps({"signal": requeue.signal, "pid": os.getpid()}))


class HangAt(L.Callback):
    """Rank `rank` stops dead after global step `step` (a rank stuck where the others wait in a collective); it
    touches `marker` first."""

    def __init__(self, marker: str, step: int = 3, rank: int = 1) -> None:
        self.marker, self.step, self.rank = Path(marker), step, rank

    def on_train_batch_end(self, trainer, pl_module, *args):
        import time

        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            self.marker.touch()
            time.sleep(3600)


class StopCheckEvery(L.Callback):
    """The ranks agree on a stop signal every `seconds` (RequeueOnSignal.stop_check_s), besides logging steps."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def setup(self, trainer, pl_module, stage):
        from xception_pl.slurm import RequeueOnSignal

        for callback in trainer.callbacks:
            if isinstance(callback, RequeueOnSignal):
                callback.stop_check_s = self.seconds


class TouchAt(L.Callback):
    """Rank 0 touches `marker` at the end of global step `step` (benchmarks/stop_latency.py)."""

    def __init__(self, marker: str, step: int = 3) -> None:
        self.marker, self.step = Path(marker), step

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step and trainer.is_global_zero:
            self.marker.touch()
