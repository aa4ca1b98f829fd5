"""The progress bar: Lightning's TQDM bar on a terminal, one line per logging step in a log file.

Both read metric values only when Lightning has just logged (or after validation): reading a
logged tensor is a device-to-host copy that makes the host wait for the device, and Lightning's
own bar reads `trainer.progress_bar_metrics` (.item() on every value) on every refresh.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from xception_pl.callbacks import logs_this_step
from xception_pl.schedules import samples_per_step


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDMProgressBar that reads metrics only on logging steps; with `log_file` (default:
    stdout is not a terminal, e.g. a SLURM output file) no bar at all, but a line every
    `trainer.log_every_n_steps` steps (step, epoch, samples seen, loss, lr, images/s, time left) and
    one after each validation. Validation bars show their total, from the data module's manifest."""

    def __init__(self, refresh_rate: int = 1, log_file: bool | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.log_file = not sys.stdout.isatty() if log_file is None else log_file
        self.may_read = True  # False inside a training step that Lightning does not log
        self.metrics: dict[str, Any] = {}
        self.start: tuple[float, int] | None = None  # (time, global step) when this run's training began
        self.last_line: tuple[float, int] | None = None  # (time, global step) of the previous line

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if self.may_read:
            # The module's training metrics are logged without prog_bar (Lightning would read them on every step);
            # it names them (XceptionModule.training_metrics), and they are read here when a step logs.
            names = getattr(pl_module, "shown_metrics", ())
            shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k in names}
            self.metrics = {**super().get_metrics(trainer, pl_module), **shown}
        return self.metrics  # on other steps: the values of the last logging step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.start = self.last_line = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning's own criterion (its ThroughputMonitor uses it too); it logs right after this hook.
        logs = logs_this_step(trainer)
        self.may_read = logs
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self.may_read = True
        if self.log_file and logs and self.is_enabled:
            self.print_line(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.log_file and self.is_enabled and not trainer.sanity_checking:
            values = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith("val/")}
            shown = ", ".join(f"{k} {fmt(v)}" for k, v in values.items())
            print(f"validation at step {trainer.global_step} (epoch {epoch(trainer)}): {shown}", flush=True)

    def print_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now, step = time.monotonic(), trainer.global_step
        metrics = self.get_metrics(trainer, pl_module)
        batch = global_batch(trainer, pl_module)
        fields = [f"step {step}/{total_steps(trainer)}", f"epoch {epoch(trainer)}", f"{step * batch:,} samples"]
        fields += [f"{k.removeprefix('train/')} {fmt(v)}" for k, v in metrics.items() if k.startswith("train/")]
        then, before = self.last_line
        if now > then and step > before:
            fields.append(f"{(step - before) * batch / (now - then):,.1f} img/s")
        left = time_left(trainer, self.start, now)
        if left is not None:
            fields.append(f"{left} left")
        print(" | ".join(fields), flush=True)
        self.last_line = (now, step)

    @property
    def is_disabled(self) -> bool:  # what Lightning's bars are built with: no bars in a log file
        return super().is_disabled or self.log_file

    @property
    def total_val_batches_current_dataloader(self) -> int | float:
        total = super().total_val_batches_current_dataloader
        if math.isinf(total) and not self.trainer.sanity_checking:
            trainer = self.trainer
            counted = getattr(trainer.datamodule, "eval_batches", None)  # a data module that can tell
            return (counted("val", trainer.global_rank, trainer.world_size) if counted else None) or total
        return total


def epoch(trainer: L.Trainer) -> str:
    """Counted from 1 for people ("epoch 1/2"; checkpoint names and TensorBoard count from 0)."""
    end = trainer.max_epochs
    return f"{trainer.current_epoch + 1}/{end}" if end is not None and end > 0 else str(trainer.current_epoch + 1)


def per_device_batch(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """Images per device per forward: the module's batch_size (ours: what its schedules count), else the data's."""
    return pl_module.hparams.get("batch_size") or getattr(trainer.datamodule, "batch_size", None) or 1


def global_batch(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """Samples per optimizer step over all devices (xception_pl.schedules.samples_per_step)."""
    return samples_per_step(trainer, per_device_batch(trainer, pl_module))


def total_steps(trainer: L.Trainer) -> int | str:
    total = trainer.estimated_stepping_batches  # min of max_steps and max_epochs x steps per epoch
    return "?" if math.isinf(total) else int(total)


def time_left(trainer: L.Trainer, start: tuple[float, int] | None, now: float) -> str | None:
    """Remaining optimizer steps at this run's pace so far (validation included)."""
    total = trainer.estimated_stepping_batches
    if start is None or math.isinf(total) or trainer.global_step <= start[1]:
        return None
    per_step = (now - start[0]) / (trainer.global_step - start[1])
    return str(timedelta(seconds=round(max(0, total - trainer.global_step) * per_step)))


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
