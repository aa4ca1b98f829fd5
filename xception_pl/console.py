"""What a run prints besides progress: what it is about to do, and where everything went; Lightning's
advertising tips and a deprecation warning a user cannot act on are left out."""

from __future__ import annotations

import logging
import time
import warnings
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from xception_pl.progress import global_batch, per_device_batch


class WithoutTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines. Lightning has no switch
    for them (2.6: LoggerConnector and CallbackConnector call rank_zero_info unconditionally), so this
    filter sits on the one logger they go through and drops only lines starting with the tip marker."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning() -> None:
    """Called once by the CLI, before the Trainer is built."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, WithoutTips) for f in rank_zero.filters):
        rank_zero.addFilter(WithoutTips())
    # Lightning's own call into a torch API that torch deprecated (lightning/pytorch/utilities/_pytree.py):
    # nothing for a user to change; it goes away with a Lightning release that follows torch.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class RunSummary(L.Callback):
    """On rank 0, before the first step: the config files, the data, the global batch, the run directory
    and the checkpoint resumed from; after fit: the best and last checkpoints and the TensorBoard command."""

    def __init__(self, config_files: list[str] | None = None) -> None:
        self.config_files = config_files or []
        self.started = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.monotonic()
        if trainer.is_global_zero:
            say(trainer, "\n".join(start_lines(trainer, pl_module, self.config_files)))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            took = timedelta(seconds=round(time.monotonic() - self.started))
            epochs = f"{trainer.current_epoch} epoch{'s' * (trainer.current_epoch != 1)}"
            say(trainer, "\n".join([f"done: {trainer.global_step} steps ({epochs}) in {took}",
                                    *where_lines(trainer)]))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero and trainer.state.fn == "fit":
            say(trainer, "\n".join([f"stopped at step {trainer.global_step} ({type(exception).__name__}); resume "
                                    "with the same command and --ckpt_path last", *where_lines(trainer)]))


def start_lines(trainer: L.Trainer, pl_module: L.LightningModule, config_files: list[str]) -> list[str]:
    data = trainer.datamodule
    lines = [f"config: {', '.join(config_files)}"] if config_files else []
    if data is not None:
        lines.append(f"data: {type(data).__name__}, {data_facts(data)}")
    steps, per_device = trainer.estimated_stepping_batches, per_device_batch(trainer, pl_module)
    lines.append(f"global batch: {per_device} per device x {trainer.num_devices} devices x {trainer.num_nodes} "
                 f"nodes x {trainer.accumulate_grad_batches} accumulation = {global_batch(trainer, pl_module)}; "
                 f"{trainer.num_training_batches // trainer.accumulate_grad_batches:,} steps per epoch, "
                 f"{steps:,} steps in all (max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps})")
    lines.append(f"run directory: {trainer.default_root_dir}")
    if trainer.ckpt_path:
        lines.append(f"resumed from {trainer.ckpt_path} at step {trainer.global_step}, epoch {trainer.current_epoch}")
    return lines


def data_facts(data: L.LightningDataModule) -> str:
    """Classes and, per split, what the data module says of itself (`describe`: images and shards of a
    WebDatasetDataModule), e.g. "10 classes; train 1,000 images in 16 shards, val 200 images in 16 shards"."""
    kind = "multi-label" if getattr(data, "multilabel", False) else "single-label"
    facts = [f"{getattr(data, 'num_classes', '?')} classes ({kind})"]
    if hasattr(data, "describe"):
        facts += data.describe()
    else:
        sizes = {k.removesuffix("_size"): v for k, v in getattr(data, "hparams", {}).items()
                 if k in ("train_size", "val_size")}
        facts += [f"{name} {count(size)} images" for name, size in sizes.items()]
    return "; ".join(facts)


def count(size: int | None) -> str:
    return "?" if size is None else f"{size:,}"


def where_lines(trainer: L.Trainer) -> list[str]:
    lines = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.monitor and callback.best_model_path:
            score = callback.best_model_score
            shown = f"{float(score):.4f}" if score is not None else "?"
            lines.append(f"best checkpoint ({callback.monitor} {shown}): {callback.best_model_path}")
        elif callback.monitor is None and (callback.last_model_path or callback.best_model_path):
            lines.append(f"last checkpoint: {callback.last_model_path or callback.best_model_path}")
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            lines.append(f"watch it: tensorboard --logdir {logger.log_dir}")
    return lines


def say(trainer: L.Trainer, text: str) -> None:
    # Plain stdout, with the progress lines. RunSummary comes before the progress bar in the CLI's
    # callbacks, so on a terminal the start summary is printed before the training bar is drawn.
    print(text, flush=True)
