"""Polyak averaging (sec. 4.2) as an exponential moving average whose horizon counts samples."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from xception_pl.optim import lerp_


class PolyakAveraging(WeightAveraging):
    """EMA of the weights and BatchNorm statistics, used by validation, test, predict and the checkpoint's
    `state_dict` (Lightning's WeightAveraging swaps and saves it; the raw weights stay in the checkpoint as
    `current_model_state` for resuming).

    Args:
        decay: the decay per `reference_batch` samples (ours: 0.9999, TensorFlow's Inception lineage); None: off
            (`--ema.decay null`). Short runs need a smaller value (the demo's 0.9).
        reference_batch: samples one `decay` stands for; by default the module's per-device batch, so a
            1-device run averages exactly with `decay` per step and a run on N devices with decay ** N per step:
            the horizon is the same number of samples on any world size, as the lr schedule's (ours).

    Per update, with t = samples averaged so far / reference_batch, the decay is TensorFlow's warm-up
    min(decay, (1 + t) / (10 + t)) (so an early validation is not an average of the initial weights),
    raised to the power global batch / reference_batch. One multi-tensor lerp over all parameters and
    buffers (three multi-tensor ops with the skip flag: optim.lerp_); no host read (Lightning's
    EMAWeightAveraging goes through AveragedModel, ~4 kernels per tensor plus a host read of its update count). A step the module skipped (non-finite loss) leaves the
    average untouched: the lerp weight is multiplied by the module's device flag `step_kept`.
    """

    def __init__(self, decay: float | None = 0.9999, reference_batch: int | None = None) -> None:
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay={decay} must be in (0, 1), or null to turn Polyak averaging off")
        super().__init__(use_buffers=True)
        self.decay, self.reference_batch = decay, reference_batch
        self.samples = 0  # averaged in so far, over all ranks
        self.updated_step = 0  # trainer.global_step of the last update

    @property
    def enabled(self) -> bool:
        return self.decay is not None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.reference_batch is None:
            self.reference_batch = pl_module.hparams.get("batch_size") or trainer.datamodule.batch_size
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The average starts from the weights the fit starts from. Lightning copies the module in `setup`, before
        # the module's own setup loads pretrained weights (fine-tuning): the sanity check and the first steps
        # would average in the random initialisation. A resumed fit has its average from the checkpoint.
        if self._average_model is not None and trainer.ckpt_path is None:
            torch._foreach_copy_(self.tensors(self._average_model.module), self.tensors(pl_module))

    def step_decay(self, global_batch: int) -> float:
        t = self.samples / self.reference_batch
        return min(self.decay, (1.0 + t) / (10.0 + t)) ** (global_batch / self.reference_batch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step <= self.updated_step:  # accumulating gradients: no optimizer step yet
            return
        self.updated_step = trainer.global_step
        global_batch = pl_module.global_batch_size
        weight = 1.0 - self.step_decay(global_batch)
        self.samples += global_batch
        averaged, current = self.tensors(self._average_model.module), self.tensors(pl_module)
        kept: Tensor | None = getattr(pl_module, "step_kept", None)
        floats = [i for i, t in enumerate(averaged) if t.is_floating_point()]
        others = [i for i, t in enumerate(averaged) if not t.is_floating_point()]  # BN's num_batches_tracked
        lerp_([averaged[i] for i in floats], [current[i] for i in floats], weight if kept is None else kept * weight)
        if others:
            torch._foreach_copy_([averaged[i] for i in others], [current[i] for i in others])

    @staticmethod
    def tensors(module: torch.nn.Module) -> list[Tensor]:
        return [t.detach() for t in (*module.parameters(), *module.buffers())]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # updated after optimizer steps only

    # Lightning swaps the average in for validation only; a Trainer that fits and then tests or predicts (the
    # Python API) would evaluate the raw weights there. A fresh test or predict run has no average (nothing swaps).
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_validation_epoch_start(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_validation_epoch_end(trainer, pl_module)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_validation_epoch_start(trainer, pl_module)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning copies the average into the model here, before the final last.ckpt is written, which
        # then loses the raw weights (a run extended from it would go on from the average): not here.
        pass

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None:  # after the last checkpoint: the model left in memory is the average
            super().on_train_end(trainer, pl_module)  # Lightning's copy of the average into the model

    def state_dict(self) -> dict[str, Any]:  # under Lightning's key for the last update's step
        return {**super().state_dict(), "latest_update_step": self.updated_step, "samples": self.samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.updated_step = state_dict["latest_update_step"]
        self.samples = state_dict.get("samples", 0)
