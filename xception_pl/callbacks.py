"""Callbacks of a run: images/s, the final validation, the prediction writer; and the one test of a logging step."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning sends this training step's logged values to the loggers (the one step kind on which
    the host may read the device or talk to the other ranks). Lightning internal, see docs/code.md "Seams"."""
    return trainer._logger_connector.should_update_logs



class ValidateAtEnd(L.Callback):
    """A fit ends with a validation, also when its validation interval does not divide its length (JFT validates
    every 20,000 batches: a run would never score its last interval, nor leave a best-k checkpoint of it).

    On the run's last training batch this sets `trainer.should_stop`, on which Lightning's epoch loop validates
    (its early-stopping rule: "allow validation if requesting to stop early") and then ends the fit, as it was
    about to; a batch that validates by its interval validates once.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        steps_done = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        epochs_done = (trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
                       and batch_idx + 1 >= trainer.num_training_batches)
        if steps_done or epochs_done:
            trainer.should_stop = True


class ImagesPerSecond(L.Callback):
    """Training images/s over the steps between two logging steps: train/device/samples_per_sec (per device)
    and train/samples_per_sec (all devices).

    Why not Lightning's ThroughputMonitor: it synchronises the device after every batch. Here the clock is
    read on logging steps only, after a synchronise there (where the host reads the logged values anyway);
    validation time is left out.
    """

    def __init__(self) -> None:
        self.start: tuple[float, int] | None = None  # (time, global step) of the interval's start

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.start is None:  # the first step, or the first after a validation
            self.start = (time.perf_counter(), trainer.global_step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.start is None or not logs_this_step(trainer):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now, (start, start_step) = time.perf_counter(), self.start
        steps = trainer.global_step - start_step
        if steps > 0 and now > start:
            per_device = steps * pl_module.global_batch_size / trainer.world_size / (now - start)
            pl_module.log("train/device/samples_per_sec", per_device)
            pl_module.log("train/samples_per_sec", per_device * trainer.world_size)
        self.start = (now, trainer.global_step)


class PredictionWriter(BasePredictionWriter):
    """Writes predict_step outputs as JSON lines: {"key", "classes", "probs"} per image, one file per rank."""

    def __init__(self, output: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict":
            if trainer.world_size > 1:
                self.output = self.output.with_name(f"{self.output.stem}-rank{trainer.global_rank}{self.output.suffix}")
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        keys = prediction.get("key") or [None] * len(prediction["classes"])
        with open(self.output, "a") as f:
            for key, classes, probs in zip(keys, prediction["classes"].tolist(), prediction["probs"].tolist()):
                f.write(json.dumps({"key": key, "classes": classes, "probs": [round(p, 6) for p in probs]}) + "\n")
