"""Pictures of the data in TensorBoard's IMAGES tab: what the network sees, and what it gets wrong."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid

MIN_TILE = 128  # px: small inputs (71 px in the demo) are enlarged so their labels stay readable (ours)


class ImageGrids(L.Callback):
    """Labelled image grids, on rank 0, in TensorBoard (other loggers: nothing):

    - `images/train_batch`: the first training batch of a fit, as the network sees it (after
      augmentation), with its class names;
    - `images/val_batch`: the first validation batch, once per fit (or validate);
    - `images/val_misclassified`: after each validation, up to `num_images` validation images whose
      top class is wrong ("true" / "pred" class names), from the first `search_batches` batches.

    Cost: the first two copy one batch to the host once. The third uses the logits when validation_step
    returns them ({"logits": ...} or a tensor), else runs the network again on those few batches, in
    validation, off the training step. Off with `enabled=False` (`--images.enabled false`).
    """

    def __init__(self, enabled: bool = True, num_images: int = 16, search_batches: int = 4) -> None:
        self.enabled, self.num_images, self.search_batches = enabled, num_images, search_batches
        self.shown: set[str] = set()
        self.wrong: list[tuple[Tensor, str]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.shown = set()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.active(trainer) and "train_batch" not in self.shown:
            self.log_grid(trainer, "train_batch", batch["image"][:self.num_images],
                          [true_names(t, trainer) for t in batch["target"][:self.num_images]])

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.active(trainer) or trainer.sanity_checking or batch_idx >= self.search_batches:
            return
        if "val_batch" not in self.shown:
            self.log_grid(trainer, "val_batch", batch["image"][:self.num_images],
                          [true_names(t, trainer) for t in batch["target"][:self.num_images]])
        if len(self.wrong) < self.num_images:
            logits = outputs.get("logits") if isinstance(outputs, dict) else outputs
            if not isinstance(logits, Tensor):
                with torch.no_grad(), trainer.precision_plugin.forward_context():
                    logits = pl_module(batch["image"])
            predicted = logits.argmax(-1)
            target = batch["target"]
            right = target.gather(1, predicted[:, None])[:, 0].bool() if target.ndim == 2 else predicted == target
            for i in (~right).nonzero()[:self.num_images - len(self.wrong), 0].tolist():
                self.wrong.append((batch["image"][i],
                                   f"true {true_names(target[i], trainer)}\npred {name(int(predicted[i]), trainer)}"))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.wrong:
            images, labels = zip(*self.wrong)
            self.log_grid(trainer, "val_misclassified", torch.stack(images), list(labels), once=False)
        self.wrong = []

    def active(self, trainer: L.Trainer) -> bool:
        return self.enabled and trainer.is_global_zero and tensorboard(trainer) is not None

    def log_grid(self, trainer: L.Trainer, tag: str, images: Tensor, labels: list[str], once: bool = True) -> None:
        tensorboard(trainer).experiment.add_image(f"images/{tag}", labelled_grid(images, labels),
                                                  global_step=trainer.global_step)
        if once:
            self.shown.add(tag)


def tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)


def name(class_id: int, trainer: L.Trainer) -> str:
    names = getattr(trainer.datamodule, "class_names", None)
    return str(names[class_id]) if names and class_id < len(names) else str(class_id)


def true_names(target: Tensor, trainer: L.Trainer) -> str:
    """A class id, or the positives of a multi-hot target (multi-label)."""
    ids = target.nonzero()[:, 0].tolist() if target.ndim == 1 else [int(target)]
    return ",".join(name(i, trainer) for i in ids)


def labelled_grid(images: Tensor, labels: list[str]) -> Tensor:
    """[N, 3, H, W] in [-1, 1] (the network's input) -> one [3, H', W'] grid in [0, 1], a label on each tile."""
    images = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    if images.shape[-1] < MIN_TILE:
        images = F.interpolate(images, scale_factor=math.ceil(MIN_TILE / images.shape[-1]), mode="nearest")
    tiles = torch.stack([labelled(image, label) for image, label in zip(images, labels)])
    return make_grid(tiles, nrow=math.ceil(math.sqrt(len(tiles))), padding=2)


def labelled(image: Tensor, label: str) -> Tensor:
    """Writes `label` in white on a black box at the top left of one [3, H, W] image in [0, 1]."""
    tile = to_pil_image(image)
    pen = ImageDraw.Draw(tile)
    font = ImageFont.load_default(size=max(10, tile.width // 9))  # readable in TensorBoard's thumbnails
    box = pen.multiline_textbbox((3, 2), label, font=font)
    pen.rectangle((0, 0, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
    pen.multiline_text((3, 2), label, font=font, fill=(255, 255, 255))
    return pil_to_tensor(tile).float() / 255
