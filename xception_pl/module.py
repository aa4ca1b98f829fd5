"""The LightningModule: the paper's losses, metrics, optimizers and Polyak averaging (sec. 4.2-4.4)."""

from __future__ import annotations

from typing import Any, Callable, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from xception_pl.callbacks import ImagesPerSecond, LastCheckpoint
from xception_pl.metrics import MeanAveragePrecisionAtK, TopLabelAccuracy
from xception_pl.model import Xception
from xception_pl.per_class import per_class_metrics
from xception_pl.pretrained import FreezeBackbone, load_pretrained, param_groups, scale_lrs
from xception_pl.schedules import SampleStepDecay

NetworkCallable = Callable[[int], nn.Module]  # num_classes -> network
Batch = dict[str, Any]  # {"image": [B,3,H,W] in [-1, 1], "target": [B] or [B, C] multi-hot, "skipped", "key"}


class XceptionModule(L.LightningModule):
    """Trains a classifier with the recipe of sec. 4.2-4.4, on single-label or multi-label data.

    Args:
        num_classes: outputs; linked from the data by the CLI.
        multilabel: sigmoid cross-entropy on multi-hot targets (JFT) instead of softmax
            (ImageNet); linked from the data.
        train_size: training samples per epoch, for epoch-based lr decay; linked from the data.
        batch_size: per-device batch; linked from the data. The global batch
            (x devices x nodes x accumulation) is derived and logged.
        network: the backbone, given num_classes: Xception (default) or
            xception_pl.inception.InceptionV3, the paper's baseline (sec. 4.3).
        optimizer: SGD momentum 0.9 (ImageNet) or timm's RMSpropTF (JFT) (sec. 4.2).
        lr_scheduler: e.g. xception_pl.schedules.SampleStepDecay, stepped every optimizer step.
        weight_decay: L2 rate 1e-5 (sec. 4.2) on conv and linear weights; BatchNorm parameters
            and biases are not decayed (ours). Replaces any weight_decay given to the optimizer.
        label_smoothing: single-label only; 0 as the paper.
        ema_decay: Polyak averaging (sec. 4.2) as an exponential moving average of weights and
            BN statistics, used for validation, test, predict and saved weights; None = off.
            0.9999 is ours (TensorFlow Inception lineage); short runs need a smaller value.
        channels_last: NHWC memory format for the network and its inputs.
        compile: torch.compile the network.
        nonfinite_loss: on a NaN/inf loss, "stop" with a message naming the step and batch,
            or "skip" the batch on every rank (counted in train/skipped_nonfinite).
        map_k, map_mode, class_weights: MAP@K for multi-label data (sec. 4.4: MAP@100).
        predict_top_k: classes and probabilities returned per image by predict.
        save_top_k: best checkpoints kept by val/acc1 (val/map100 for multi-label).
        checkpoint_every_n_steps: also save `last.ckpt` every n optimizer steps (long epochs).
        pretrained: start a fit from these weights (xception_pl.pretrained): one of our checkpoints
            (its Polyak weights) or timm's legacy_xception file; a resumed fit ignores it.
        freeze_backbone_samples: only the head trains for this many samples (ours; fine-tuning).
        backbone_lr_scale: the backbone's lr is the optimizer's lr times this (ours; fine-tuning).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        multilabel: bool = False,
        train_size: int | None = None,
        batch_size: int = 32,
        network: NetworkCallable = Xception,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        weight_decay: float = 1e-5,
        label_smoothing: float = 0.0,
        ema_decay: float | None = 0.9999,
        channels_last: bool = False,
        compile: bool = False,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        map_k: int = 100,
        map_mode: Literal["per_class", "per_image"] = "per_class",
        class_weights: str | None = None,
        predict_top_k: int = 5,
        save_top_k: int = 3,
        checkpoint_every_n_steps: int | None = None,
        pretrained: str | None = None,
        freeze_backbone_samples: int = 0,
        backbone_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: need at least 2 classes")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"model.ema_decay={ema_decay} must be in (0, 1), or null to turn Polyak averaging off")
        self.save_hyperparameters(ignore=["network", "optimizer", "lr_scheduler"])
        self.network = network(num_classes)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        if compile:
            self.network.compile()
        self.metrics = nn.ModuleDict({stage: self.build_metrics(stage) for stage in ("val", "test")})
        self.losses = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self.step_is_finite = True  # of the last optimizer step; see optimizer_step

    def build_metrics(self, stage: str) -> MetricCollection:
        """val/acc1 (+ val/acc5) for single-label (Table 1); val/map100 and val/acc1 (top label is a
        positive) for multi-label (Table 2)."""
        hp = self.hparams
        if hp.multilabel:
            metrics = {f"map{hp.map_k}": MeanAveragePrecisionAtK(hp.num_classes, hp.map_k, hp.map_mode, hp.class_weights),
                       "acc1": TopLabelAccuracy()}
        else:  # "micro": the fraction of images, not torchmetrics' default per-class mean
            metrics = {f"acc{k}": MulticlassAccuracy(hp.num_classes, top_k=k, average="micro")
                       for k in (1, 5) if k < hp.num_classes}
        return MetricCollection(metrics, prefix=f"{stage}/")

    @property
    def main_metric(self) -> str:
        return f"val/map{self.hparams.map_k}" if self.hparams.multilabel else "val/acc1"

    @property
    def global_batch_size(self) -> int:
        return self.hparams.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def forward(self, images: Tensor) -> Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.network(images)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.hparams.multilabel:
            # Logistic regression per class (sec. 4.1); summed over classes, mean over images (ours).
            return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="sum") / len(logits)
        return F.cross_entropy(logits, target, label_smoothing=self.hparams.label_smoothing)

    def shared_step(self, batch: Batch, stage: str) -> tuple[Tensor, Tensor]:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["target"])
        if "skipped" in batch:  # samples the data workers dropped (corrupt, unreadable, bad label)
            key = "data/skipped" if stage == "train" else f"data/{stage}_skipped"
            self.log(key, batch["skipped"].sum().float(), reduce_fx="sum", on_step=False, on_epoch=True)
        return logits, loss

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits, loss = self.shared_step(batch, "train")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().optimizer.param_groups[0]["lr"], prog_bar=True)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # Forward and backward run on every rank (DDP's gradient all-reduce stays in step), then
        # the loss is checked once, after backward is queued: one host sync per step, the price of
        # never stepping on a NaN. A skipped batch changes nothing (no step, momentum or EMA update).
        loss = optimizer_closure()
        self.step_is_finite = self.loss_is_finite(loss, batch_idx)
        if self.step_is_finite:
            optimizer.step()

    def loss_is_finite(self, loss: Tensor, batch_idx: int) -> bool:
        """Agreed by all ranks; raises for nonfinite_loss="stop"."""
        nonfinite = self.trainer.strategy.reduce((~torch.isfinite(loss.detach())).float(), reduce_op="sum")
        if not nonfinite.item():
            return True
        if self.hparams.nonfinite_loss == "stop":
            raise FloatingPointError(
                f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch}, batch "
                f"{batch_idx}); the weights were not updated and the last checkpoint is intact. Lower the lr or "
                "check the data, then resume with --ckpt_path last; or set model.nonfinite_loss=skip to skip such "
                "batches.")
        return False

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        skipped = float(not self.step_is_finite)
        self.log("train/skipped_nonfinite", skipped, reduce_fx="sum", on_step=False, on_epoch=True)

    def evaluation_step(self, batch: Batch, stage: str) -> None:
        logits, loss = self.shared_step(batch, stage)
        # Metric objects accumulate locally and sync once, at epoch end: ranks may see different
        # numbers of batches (each validation sample exactly once), so nothing syncs per step.
        self.losses[stage].update(loss, weight=len(logits))
        self.metrics[stage].update(logits.float(), batch["target"])
        self.log(f"{stage}/loss", self.losses[stage], prog_bar=True)
        self.log_dict(self.metrics[stage], prog_bar=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        logits = self(batch["image"]).float()
        probs = logits.sigmoid() if self.hparams.multilabel else logits.softmax(-1)
        probs, classes = probs.topk(min(self.hparams.predict_top_k, self.hparams.num_classes), dim=-1)
        return {"key": batch.get("key"), "classes": classes, "probs": probs}

    def configure_optimizers(self) -> Any:
        groups = param_groups(self.network, self.hparams.weight_decay, self.hparams.backbone_lr_scale)
        try:
            optimizer = self.optimizer(groups)
            scale_lrs(optimizer)
        except (ValueError, TypeError) as error:
            raise ValueError(f"model.optimizer: {error}. Fix model.optimizer.init_args in the config "
                             "(lr must be positive, momentum in [0, 1)).") from error
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, SampleStepDecay):
            scheduler.configure(self.global_batch_size, self.hparams.train_size)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[L.Callback]:
        metric = self.main_metric
        name = "epoch={epoch}-step={step}-" + metric.split("/")[1] + "={" + metric + ":.4f}"
        callbacks: list[L.Callback] = [
            ModelCheckpoint(monitor=metric, mode="max", save_top_k=self.hparams.save_top_k,
                            filename=name, auto_insert_metric_name=False),
            LastCheckpoint(every_n_train_steps=self.hparams.checkpoint_every_n_steps),
            ImagesPerSecond(),
            *per_class_metrics(self.trainer),  # per-class accuracy, confusion matrix
        ]
        if self.hparams.ema_decay is not None:
            callbacks.append(EMAWeightAveraging(decay=self.hparams.ema_decay))
        if self.hparams.freeze_backbone_samples > 0:
            callbacks.append(FreezeBackbone(self.hparams.freeze_backbone_samples))
        return callbacks

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.pretrained:  # a resumed fit then loads its checkpoint over these
            load_pretrained(self.network, self.hparams.pretrained)

    def on_train_start(self) -> None:
        if self.logger is not None:
            self.logger.log_metrics({"train/global_batch_size": self.global_batch_size}, step=self.global_step)

    def on_fit_end(self) -> None:
        if self.logger is not None:  # hparams beside the final validation metrics in TensorBoard's HPARAMS tab
            final = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
            self.logger.log_hyperparams(self.hparams, final)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        for key in ("num_classes", "multilabel"):
            if key in saved and saved[key] != self.hparams[key]:
                raise ValueError(
                    f"the checkpoint was trained with {key}={saved[key]} but the data gives {key}={self.hparams[key]}: "
                    "point --ckpt_path at a checkpoint of this dataset, or use the dataset it was trained on; to "
                    "start a new run from its weights, pass it as --model.pretrained instead of --ckpt_path")
