"""Progressive resizing: training images grow from a small side to the full one over the first part of the sample
budget (ours, not in the paper; FFCV's ImageNet recipes train ResNet-50 at 160 -> 192 px, and a network trained at
low resolution early loses little while its steps are cheaper: Touvron et al., FixRes, NeurIPS 2019).

The size is a function of the samples trained so far (schedules.samples_seen: the lr schedule's count, restored
from the checkpoint), so every rank resizes at the same step, and a resume, on any world size, goes on at the
size of its sample count. The data crops at its image_size as always; the batch is resized on the device
(bilinear, antialiased) just before the training step: one kernel per batch, on either decode path, and the
workers need not know the schedule. Evaluation is not resized (data.eval_image_size).

The batch size stays fixed: the lr schedule, the Polyak averaging and the sample counts assume one global batch,
and the memory a step needs is bounded by the final size, which the run must fit anyway. Each new size is a new
input shape: with `trainer.benchmark: true` cuDNN autotunes once per size (a handful per run), and
`model.compile` compiles one static graph per size, once (module.py says why not dynamic shapes);
compile_mode "reduce-overhead" records one CUDA graph per size.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch.nn.functional as F

from xception_pl.callbacks import logs_this_step
from xception_pl.schedules import sample_budget, samples_per_step, samples_seen


class ProgressiveResizing(L.Callback):
    """The training images' side at s samples: start_size, growing linearly to end_size at end_fraction of the
    budget (rounded to a multiple of `multiple`, as FFCV), then end_size. Logged as train/image_size.

    Args:
        start_size: the side at the start of the fit; None = off (the default).
        end_size: the side from end_fraction of the budget on; default: the data's crop (image_size).
        end_fraction: the fraction of the budget over which the size grows (ours: 0.7, as FFCV's ramps end before
            the last epochs, which train at full size).
        multiple: sizes in between are multiples of this (32, FFCV's; also Xception's total stride).
        max_samples: the budget; default: the trainer's, max_epochs x the training set (or max_steps x the
            global batch), as SampleBudgetDecay's.
    """

    def __init__(self, start_size: int | None = None, end_size: int | None = None, end_fraction: float = 0.7,
                 multiple: int = 32, max_samples: int | None = None) -> None:
        if start_size is not None and start_size < 71:
            raise ValueError(f"progressive_resizing.start_size={start_size}: Xception needs at least 71 px")
        if not 0.0 < end_fraction <= 1.0 or multiple < 1:
            raise ValueError(f"progressive_resizing: end_fraction={end_fraction} must be in (0, 1] and "
                             f"multiple={multiple} >= 1")
        self.start_size, self.end_size, self.end_fraction = start_size, end_size, end_fraction
        self.multiple, self.max_samples = multiple, max_samples
        self.budget: int | None = max_samples

    @property
    def enabled(self) -> bool:
        return self.start_size is not None

    def size_at(self, samples: int, end_size: int) -> int:
        """The side at `samples` trained samples, when the data crops to end_size (or self.end_size)."""
        end = self.end_size or end_size
        ramp = self.end_fraction * self.budget
        if samples >= ramp or self.start_size >= end:
            return end
        size = self.start_size + (end - self.start_size) * samples / ramp
        return min(end, max(self.start_size, round(size / self.multiple) * self.multiple))

    def per_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        return samples_per_step(trainer, pl_module.hparams.batch_size)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.budget = self.max_samples or sample_budget(trainer, pl_module.hparams.get("train_size"),
                                                        self.per_step(trainer, pl_module))
        if self.budget is None:
            raise ValueError("progressive_resizing needs a budget: give progressive_resizing.max_samples, or the "
                             "trainer max_epochs (with the data's train_size) or max_steps")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        images = batch["image"]
        size = self.size_at(samples_seen(trainer, self.per_step(trainer, pl_module)), images.shape[-1])
        if size != images.shape[-1] and len(images):
            batch["image"] = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)
        if logs_this_step(trainer):
            pl_module.log("train/image_size", float(size))
