"""The LightningModule, the recipe alone: network, the paper's losses, metrics, optimizers and schedules
(sec. 4.2-4.4). What a run adds around it (checkpoints, Polyak averaging, logging) is xception_pl/wiring.py's."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.distributed import ReduceOp
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from xception_pl.callbacks import logs_this_step
from xception_pl.distributed import broadcast_buffers, stop_buffer_broadcast
from xception_pl.guard import BatchNormState, found_nonfinite, poison, skips_on_device, zero_momentum_buffers
from xception_pl.hyperparameters import UNDESCRIBED, log_hyperparameters, record_factories
from xception_pl.metrics import MeanAveragePrecisionAtK, TopLabelAccuracy
from xception_pl.model import Xception
from xception_pl.pretrained import load_pretrained, param_groups, scale_lrs
from xception_pl.schedules import (SampleCounts, SampleSchedule, SampleScheduleCallable, sample_budget,
                                  samples_per_step)

log = logging.getLogger(__name__)
COUNTS = ("nonfinite_losses", "first_nonfinite_step", "first_nonfinite_batch", "skipped_steps", "fp16_overflows",
          "data_skipped_train", "data_skipped_val", "data_skipped_test")
RESUMED_COUNTS = ("skipped_steps", "fp16_overflows", "data_skipped_train")  # totals a checkpoint keeps

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
        lr_scheduler: a schedule counted in samples (xception_pl.schedules.SampleStepDecay), stepped every
            optimizer step; built with the run's SampleCounts (global batch, training set size).
        weight_decay: L2 rate 1e-5 (sec. 4.2) on conv and linear weights; BatchNorm parameters
            and biases are not decayed (ours). Replaces any weight_decay given to the optimizer.
        label_smoothing: 0 as the paper (ours otherwise): softmax targets (1 - e) on the class + e / C on every class
            (Szegedy et al., CVPR 2016); multi-label, each class's target y (1 - e) + e / C, timm's BinaryCrossEntropy
            smoothing. Applies to mixed soft targets too (data/mixing.py).
        channels_last: NHWC memory format for the network and its inputs.
        compile: torch.compile the network.
        compile_mode: torch.compile's mode: "default", "reduce-overhead" (CUDA graphs) or "max-autotune".
        nonfinite_loss: on a NaN/inf loss, "stop" with a message naming the step and batch,
            or "skip" the batch on every rank (counted in train/skipped_nonfinite).
        map_k, map_mode, class_weights: MAP@K for multi-label data (sec. 4.4: MAP@100).
        predict_top_k: classes and probabilities returned per image by predict.
        pretrained: start a fit from these weights (xception_pl.pretrained): one of our checkpoints
            (its Polyak weights) or timm's legacy_xception file; a resumed fit ignores it.
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
        lr_scheduler: SampleScheduleCallable | None = None,
        weight_decay: float = 1e-5,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default",
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        map_k: int = 100,
        map_mode: Literal["per_class", "per_image"] = "per_class",
        class_weights: str | None = None,
        predict_top_k: int = 5,
        pretrained: str | None = None,
        backbone_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: need at least 2 classes")
        # Under the CLI the hyperparameters are the config, callables included (class_path + init_args), so a
        # checkpoint rebuilds its network, optimizer and schedule: load_from_checkpoint(path) needs no arguments.
        # Built in Python, the callables are recorded where they can be written down (hyperparameters.py).
        if isinstance(network, str) and network.startswith(UNDESCRIBED):
            raise ValueError(f"this checkpoint's network was built in Python from {network[len(UNDESCRIBED):]}, which "
                             "it cannot describe: pass the same network again, load_from_checkpoint(path, network=...)")
        by_cli = _given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=[] if by_cli else ["network", "optimizer", "lr_scheduler"])
        if not by_cli:
            record_factories(self.hparams, {"network": network, "optimizer": optimizer, "lr_scheduler": lr_scheduler})
        self.network = network(num_classes)
        self.factories = Shared({"optimizer": optimizer, "lr_scheduler": lr_scheduler})
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        if compile:
            # One static graph per input size (ours): with progressive resizing and a larger evaluation size a run
            # sees a handful of sizes. Dynamic shapes (torch's default from the second size on) graph-break at the
            # TF-"same" max-pools, whose padding depends on the size, and recompile at every size (measured,
            # docs/training.md "Progressive resizing"); static graphs compile once per size and never again.
            self.network.compile(mode=compile_mode, dynamic=False)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)  # sizes x modes
            # (a dynamo setting, docs/code.md "Seams": at its default of 8 a frame past 8 graphs runs uncompiled)
        self.metrics = nn.ModuleDict({stage: self.build_metrics(stage) for stage in ("val", "test")})
        self.losses = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self.batchnorm_state = BatchNormState(self.network)
        self.step_kept: Tensor | None = None  # 0-dim float on the device: 0.0 if the last step was skipped
        self.loss_bad: Tensor | None = None  # bool on the device: a micro-batch of this step had a non-finite loss
        self.shown_metrics: tuple[str, ...] = ()  # the names training_metrics logged
        # Counters of this run, on the device (moved by _apply): the host reads them on logging steps only.
        self.counts = {name: torch.zeros((), dtype=torch.long) for name in COUNTS}
        self.counts["first_nonfinite_step"] -= 1
        self.counts["first_nonfinite_batch"] -= 1
        # The totals of the runs before this one (from the checkpoint), added when logged: a requeued run goes on
        # counting. (Not added to `counts`: the schedule keeps its own count of the samples skipped before.)
        self.counts_before = dict.fromkeys(RESUMED_COUNTS, 0)

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
    def optimizer(self) -> OptimizerCallable:
        return self.factories.value["optimizer"]

    @property
    def lr_scheduler(self) -> SampleScheduleCallable | None:
        return self.factories.value["lr_scheduler"]

    @property
    def main_metric(self) -> str:
        return f"val/map{self.hparams.map_k}" if self.hparams.multilabel else "val/acc1"

    @property
    def global_batch_size(self) -> int:
        return samples_per_step(self.trainer, self.hparams.batch_size)

    def forward(self, images: Tensor) -> Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.network(images)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """target: class ids [B], or float [B, C] class weights (multi-hot, or mixed: data/mixing.py)."""
        smoothing = self.hparams.label_smoothing
        if self.hparams.multilabel:
            target = target.to(logits.dtype)
            if smoothing:
                target = target * (1.0 - smoothing) + smoothing / self.hparams.num_classes
            # Logistic regression per class (sec. 4.1); summed over classes, mean over images (ours).
            return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(logits)
        return F.cross_entropy(logits, target, label_smoothing=smoothing)

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> "XceptionModule":
        super()._apply(fn, *args, **kwargs)
        self.counts = {name: fn(count) for name, count in self.counts.items()}
        return self

    def shared_step(self, batch: Batch, stage: str) -> tuple[Tensor, Tensor]:
        logits = self(batch["image"])
        loss = self.loss(logits, batch.get("soft_target", batch["target"]))  # mixed training batches: soft targets
        if "skipped" in batch:  # samples the data workers dropped (corrupt, unreadable, bad label)
            self.counts[f"data_skipped_{stage}"] += batch["skipped"].sum()
        return logits, loss

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits, loss = self.shared_step(batch, "train")
        bad = ~torch.isfinite(loss.detach())  # checked for every micro-batch when accumulating
        first = bad & (self.counts["nonfinite_losses"] == 0)
        self.counts["first_nonfinite_step"].masked_fill_(first, self.global_step)
        self.counts["first_nonfinite_batch"].masked_fill_(first, batch_idx)
        self.counts["nonfinite_losses"] += bad
        self.loss_bad = bad if self.loss_bad is None else self.loss_bad | bad
        if logs_this_step(self.trainer):  # only then may the host wait for the device: see training_metrics
            metrics = {f"train/{name}": value for name, value in self.training_metrics(loss, logits, batch).items()}
            self.log_dict(metrics)  # not prog_bar: Lightning would read the values on other steps too
            self.shown_metrics = tuple(metrics)  # what the progress bar and the log line show (progress.py)
        return poison(loss)

    def training_metrics(self, loss: Tensor, logits: Tensor, batch: Batch) -> dict[str, Tensor | float]:
        """The training values logged as train/<name> (TensorBoard, every logger) and shown in the progress bar
        and the log line; add one here, or in a subclass. Computed and read on logging steps only (every
        trainer.log_every_n_steps), so a value here costs the other steps nothing."""
        return {"loss": loss, "lr": self.trainer.optimizers[0].param_groups[0]["lr"]}  # this step's lr

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # Lightning's closure contract (so 16-mixed's GradScaler steps and updates), with a device-side
        # guard: a step whose gradients are not finite changes nothing, and nobody waits for the host.
        loss = optimizer_closure()  # forward and backward (the last micro-batch of an accumulated step)
        raw = optimizer.optimizer
        found = found_nonfinite([p.grad for group in raw.param_groups for p in group["params"] if p.grad is not None])
        self.batchnorm_state.restore_where(found)  # the forward of a skipped step updated the statistics
        self.step_kept = (1.0 - found).reshape(())  # read by PolyakAveraging
        self.counts["skipped_steps"] += found.long().reshape(())
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # 16-mixed's GradScaler
        if scaler is not None:  # non-finite gradients from a finite loss: the loss scale overflowed fp16
            self.counts["fp16_overflows"] += (found.bool() & ~self.loss_bad).long().reshape(())
        self.loss_bad = None
        if skips_on_device(raw):
            raw.found_inf = found  # GradScaler (16-mixed) sets its own, which includes this one
            optimizer.step(closure=lambda: loss)
            raw.__dict__.pop("found_inf", None)
        elif scaler is not None or not found.item():
            # Through the GradScaler always: it skips a non-finite step itself and must see it to lower its scale
            # (else every later step overflows too). Without one, an optimizer that cannot skip on the device
            # costs one host read per step.
            optimizer.step(closure=lambda: loss)
        self.batchnorm_state.save()
        if self.hparams.nonfinite_loss == "stop" and logs_this_step(self.trainer):
            self.stop_on_nonfinite_loss()  # before any callback of this step (a checkpoint) runs

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        if not logs_this_step(self.trainer):
            return  # everything below reads the device or the other ranks: logging steps only
        skipped = self.counts["skipped_steps"] + self.counts_before["skipped_steps"]
        overflows = self.counts["fp16_overflows"] + self.counts_before["fp16_overflows"]
        self.log("train/skipped_nonfinite", (skipped - overflows).float())  # a non-finite loss (or gradient)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            self.log("train/fp16_overflow", overflows.float())  # the GradScaler's skipped steps, then lowered

    def stop_on_nonfinite_loss(self) -> None:
        """Raised at the first logging step after a NaN/inf loss on any rank (the step itself was skipped on
        the device, so the weights and the last checkpoint are those of the last good step)."""
        strategy, counts = self.trainer.strategy, self.counts
        if not strategy.reduce(counts["nonfinite_losses"].float(), reduce_op="sum").item():
            return
        # The first bad (step, batch) over the ranks, as one number; ranks without one offer the largest.
        first = counts["first_nonfinite_step"] * 2**32 + counts["first_nonfinite_batch"]
        first = torch.where(counts["nonfinite_losses"] > 0, first, torch.iinfo(torch.int64).max)
        if strategy.world_size > 1:
            first = strategy.reduce(first, reduce_op=ReduceOp.MIN)
        first = divmod(int(first.item()), 2**32)
        raise FloatingPointError(
            f"non-finite training loss at global step {first[0]} (batch {first[1]} of its epoch); that step and "
            "any after it were skipped, so the weights and the last checkpoint are intact. Lower the lr or check "
            "the data, then resume with --ckpt_path last; or set model.nonfinite_loss=skip to skip such batches.")

    def on_train_epoch_end(self) -> None:
        self.log_data_skipped("train")

    def log_data_skipped(self, stage: str) -> None:
        """data/skipped: training samples skipped so far in the run (requeues included); data/val_skipped and
        data/test_skipped: in this evaluation."""
        if stage == "train":  # the total before this run rides on rank 0's count (the others are summed in)
            before = self.counts_before["data_skipped_train"] if self.global_rank == 0 else 0
            self.log("data/skipped", (self.counts["data_skipped_train"] + before).float(), reduce_fx="sum",
                     sync_dist=True)  # all ranks, once
            return
        self.log(f"data/{stage}_skipped", self.counts[f"data_skipped_{stage}"].float(), reduce_fx="sum", sync_dist=True)
        self.counts[f"data_skipped_{stage}"].zero_()

    def evaluation_step(self, batch: Batch, stage: str) -> None:
        if not len(batch["image"]):  # only the skips after this rank's last batch (data/pipeline.py carry_skips)
            self.counts[f"data_skipped_{stage}"] += batch["skipped"].sum()
            return
        logits, loss = self.shared_step(batch, stage)
        # Metric objects accumulate locally and sync once, at epoch end (on_*_epoch_end): ranks may see
        # different numbers of batches, or none (each evaluation sample exactly once), so nothing syncs here.
        self.losses[stage].update(loss, weight=len(logits))
        self.metrics[stage].update(logits.float(), batch["target"])

    def log_evaluation(self, stage: str) -> None:
        """Every rank syncs its metric states here, also a rank that had no batch."""
        self.log(f"{stage}/loss", self.losses[stage].compute(), prog_bar=True)
        self.log_dict(self.metrics[stage].compute(), prog_bar=True)
        self.losses[stage].reset()
        self.metrics[stage].reset()
        self.log_data_skipped(stage)

    def on_validation_epoch_start(self) -> None:
        broadcast_buffers(self.network)  # every rank evaluates rank 0's weights, with or without data (distributed.py)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")

    def on_test_epoch_start(self) -> None:
        broadcast_buffers(self.network)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log_evaluation("test")

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
        zero_momentum_buffers(optimizer)
        self.configured_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        if not skips_on_device(optimizer):
            log.warning("%s cannot skip a non-finite step on the device, so every step waits for the host to check "
                        "the gradients. Use torch.optim.SGD with fused: true, or xception_pl.optim.RMSpropTF.",
                        type(optimizer).__name__)
        if self.lr_scheduler is None:
            return optimizer
        samples = SampleCounts(self.global_batch_size, self.hparams.train_size,
                               skipped_steps=lambda: int(self.counts["skipped_steps"].item()),
                               per_run=sample_budget(self.trainer, self.hparams.train_size, self.global_batch_size))
        scheduler = self.lr_scheduler(optimizer, samples)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.world_size > 1:
            # Each rank its own dropout masks (and GPU-side augmentation); seed_everything gave all the same.
            # The data stream has its own seeds (seed, epoch, rank, worker).
            torch.manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)) + self.trainer.global_rank)
        if stage == "fit" and self.hparams.pretrained:  # a resumed fit then loads its checkpoint over these
            load_pretrained(self.network, self.hparams.pretrained)

    def on_fit_start(self) -> None:
        stop_buffer_broadcast(self.trainer.strategy.model)  # no collective inside an evaluation step (distributed.py)

    def on_train_start(self) -> None:
        self.batchnorm_state.save()
        self.apply_configured_optimizer()
        for logger in self.loggers:
            logger.log_metrics({"train/global_batch_size": self.global_batch_size}, step=self.global_step)

    def apply_configured_optimizer(self) -> None:
        """On resume the optimizer's hyperparameters come back from the checkpoint; the config's win (an edited
        momentum or weight decay takes effect), and the lr is the schedule's at the restored sample count."""
        optimizer = self.trainer.optimizers[0]
        edits = set()
        for group, configured in zip(optimizer.param_groups, self.configured_groups):
            for key, value in configured.items():
                if key not in ("lr", "initial_lr") and group.get(key) != value:
                    edits.add(f"{key}={value} (checkpoint: {group.get(key)})")
                    group[key] = value
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, SampleSchedule):  # ours (lr_find swaps in its own, which sets its own lrs)
            for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
                group["lr"] = lr
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if edits and self.global_rank == 0:
            log.warning("the config's optimizer settings replace the checkpoint's: %s", ", ".join(sorted(edits)))

    def on_fit_end(self) -> None:
        if self.logger is not None:  # hparams beside the final validation metrics in TensorBoard's HPARAMS tab
            final = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
            log_hyperparameters(self.loggers, self.hparams, final)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.hparams.nonfinite_loss == "stop" and self._trainer is not None and self.trainer.training:
            self.stop_on_nonfinite_loss()  # no checkpoint after a non-finite loss (every rank dumps: collective ok)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint["class_names"] = getattr(datamodule, "class_names", None)
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            checkpoint["counts"] = self.run_totals()

    def run_totals(self) -> dict[str, int]:
        """RESUMED_COUNTS over the whole run: skipped steps and fp16 overflows are the same on every rank (they
        follow the all-reduced gradients), skipped samples are summed over the ranks (every rank dumps a
        checkpoint in fit, so the collective is met)."""
        now = {name: self.counts[name].float() for name in RESUMED_COUNTS}
        if self.trainer.world_size > 1:
            now["data_skipped_train"] = self.trainer.strategy.reduce(now["data_skipped_train"], reduce_op="sum")
        return {name: int(now[name]) + self.counts_before[name] for name in RESUMED_COUNTS}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.counts_before.update(checkpoint.get("counts", {}))
        saved = checkpoint.get("hyper_parameters", {})
        for key in ("num_classes", "multilabel"):
            if key in saved and saved[key] != self.hparams[key]:
                raise ValueError(
                    f"the checkpoint was trained with {key}={saved[key]} but the data gives {key}={self.hparams[key]}: "
                    "point --ckpt_path at a checkpoint of this dataset, or use the dataset it was trained on; to "
                    "start a new run from its weights, pass it as --model.pretrained instead of --ckpt_path")


class Shared:
    """A value that deep copies of the module share rather than copy: the optimizer and schedule factories
    (under DDP, jsonargparse's callables reach a lock and cannot be copied; the Polyak copy, which
    WeightAveraging makes with deepcopy, never builds an optimizer)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> "Shared":
        return self
