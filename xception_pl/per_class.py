"""Per-class validation results for single-label runs: accuracy per class and a confusion matrix.

At each validation end: `val_per_class/acc1/<class name>` scalars and (up to MAX_MATRIX_CLASSES)
a `val_per_class/confusion_matrix` image (row: true class, column: predicted, rows normalised) in TensorBoard,
and optionally a JSON file, written atomically:

    python -m xception_pl validate --config CONFIG --ckpt_path CKPT \
        --trainer.callbacks+=xception_pl.per_class.PerClassMetrics --trainer.callbacks.output per_class.json

The metrics are torchmetrics', updated locally on each validation batch and synced across ranks
once, at the end; training steps are untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from xception_pl.checkpointing import write_atomically

MAX_MATRIX_CLASSES = 100  # a larger matrix image is unreadable (ours)
CELL_PIXELS = 400  # the image's side is about this many pixels (ours)


def matrix_image(confusion: Tensor) -> Tensor:
    """uint8 [1, H, W] heat map, rows normalised; drawn by hand: torchmetrics' plot() needs matplotlib."""
    rows = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1)
    cell = max(1, CELL_PIXELS // len(confusion))
    image = (255 * (1 - rows)).round().to(torch.uint8)  # dark = many
    return image.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[None]


class PerClassMetrics(L.Callback):
    """Per-class accuracy and confusion matrix of every validation (single-label only).

    Args:
        output: also write {"step", "class_names", "accuracy", "confusion_matrix"} as JSON here.
    """

    def __init__(self, output: str | None = None) -> None:
        self.output = Path(output) if output else None
        self.logits: Tensor | None = None
        self.hook: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.enabled = not pl_module.hparams.multilabel
        if not self.enabled:
            return
        num_classes = pl_module.hparams.num_classes
        self.accuracy = MulticlassAccuracy(num_classes, average=None)
        self.confusion = MulticlassConfusionMatrix(num_classes)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        self.accuracy, self.confusion = self.accuracy.to(pl_module.device), self.confusion.to(pl_module.device)
        self.accuracy.reset()
        self.confusion.reset()
        # The network's output, read as the validation step computes it: no second forward pass.
        self.hook = pl_module.network.register_forward_hook(lambda module, args, output: setattr(self, "logits", output))

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.hook is not None and self.logits is not None:
            logits = self.logits.detach().float()
            self.accuracy.update(logits, batch["target"])
            self.confusion.update(logits, batch["target"])
            self.logits = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.hook is None:
            return
        self.hook.remove()
        self.hook = None
        accuracy, confusion = self.accuracy.compute().cpu(), self.confusion.compute().cpu()  # synced across ranks
        if not trainer.is_global_zero:
            return
        names = getattr(trainer.datamodule, "class_names", None) or [str(i) for i in range(len(accuracy))]
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({f"val_per_class/acc1/{n}": a for n, a in zip(names, accuracy.tolist())}, step=step)
            if len(names) <= MAX_MATRIX_CLASSES and hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("val_per_class/confusion_matrix", matrix_image(confusion), step)
        if self.output is not None:
            result = {"step": step, "class_names": names, "accuracy": accuracy.tolist(),
                      "confusion_matrix": confusion.tolist()}
            self.output.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.output, json.dumps(result))
