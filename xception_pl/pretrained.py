"""Fine-tuning: start a fit from weights, and train the backbone gently at first (all ours; the paper
trains from scratch).

`--model.pretrained PATH` reads one of our checkpoints (its Polyak weights: Lightning's
EMAWeightAveraging saves the averaged weights as `state_dict` and the raw ones apart), a safetensors
file of `python -m xception_pl export`, or timm's `legacy_xception` weights (.pth, .bin,
.safetensors: the Keras-trained ImageNet model). Classifier layers whose shapes differ (another
number of classes, other FC widths) keep their fresh initialisation and are named in the log; every
other tensor must load, or the run stops naming the keys.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from xception_pl.backbone import head_prefix
from xception_pl.checkpointing import CheckpointLoadError
from xception_pl.timm_weights import read_state_dict, timm_to_ours

TIMM_KEYS = ("block1.", "conv1.weight")  # names only timm's legacy_xception uses


class PretrainedWeightsError(CheckpointLoadError):
    """--model.pretrained cannot start this network; the message names the keys and the fix."""


def network_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The network's tensors in our names, from a checkpoint of ours, our export, or timm's file."""
    state = dict(read_state_dict(path))  # unwraps a checkpoint's "state_dict": the Polyak weights
    if any(k.startswith("network.") for k in state):  # a LightningModule's state dict
        return {k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")}
    if any(k.startswith(TIMM_KEYS) for k in state):
        return {timm_to_ours(k): v for k, v in state.items()}
    return state


def load_pretrained(network: nn.Module, path: str | os.PathLike) -> list[str]:
    """Copy the weights at `path` into `network`; returns the tensors left freshly initialised."""
    try:
        state = network_state(path)
    except (ValueError, OSError) as error:
        raise PretrainedWeightsError(f"--model.pretrained: {error}") from None
    ours = network.state_dict()
    misshaped = {k for k in ours.keys() & state.keys() if state[k].shape != ours[k].shape}
    missing = {k for k in ours.keys() - state.keys() if not k.endswith("num_batches_tracked")}
    unexpected = state.keys() - ours.keys()
    head = head_prefix(network)  # the classifier (and any FC layers): may be freshly initialised
    fatal = {name: sorted(k for k in keys if not k.startswith(head))
             for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))}
    if any(fatal.values()):
        found = "; ".join(f"{len(keys)} {name}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                          for name, keys in fatal.items() if keys)
        raise PretrainedWeightsError(
            f"--model.pretrained {path} does not fit this network ({found}). Give one of our checkpoints, our "
            "export, or timm's legacy_xception weights, with the network settings they were trained with "
            "(only the classifier and FC layers may differ)")
    network.load_state_dict({k: v for k, v in state.items() if k in ours and k not in misshaped}, strict=False)
    fresh = sorted((missing | misshaped) & ours.keys())
    ignored = sorted(unexpected)
    rank_zero_info(f"pretrained weights from {path}: {len(ours) - len(fresh)} tensors loaded"
                   + (f"; freshly initialised (shapes differ or absent): {', '.join(fresh)}" if fresh else "")
                   + (f"; not used: {', '.join(ignored)}" if ignored else ""))
    return fresh


def backbone_parameters(network: nn.Module) -> list[nn.Parameter]:
    head_prefix(network)  # or the error that says what is missing
    head = {id(p) for p in network.head.parameters()}
    return [p for p in network.parameters() if id(p) not in head]


def param_groups(network: nn.Module, weight_decay: float, backbone_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Conv and linear weights decayed, BN and biases not (ours); with backbone_lr_scale != 1 each is split
    again into backbone (carrying "lr_scale", applied by `scale_lrs`) and head."""
    params = [p for p in network.parameters() if p.requires_grad]
    backbone = {id(p) for p in backbone_parameters(network)} if backbone_lr_scale != 1.0 else set()
    groups = []
    for matrices, decay in ((True, weight_decay), (False, 0.0)):
        chosen = [p for p in params if (p.ndim > 1) == matrices]
        for scale in (backbone_lr_scale, 1.0) if backbone else (1.0,):
            part = [p for p in chosen if (id(p) in backbone) == (scale != 1.0)] if backbone else chosen
            if part:
                groups.append({"params": part, "weight_decay": decay, "lr_scale": scale})
    return groups


def scale_lrs(optimizer: torch.optim.Optimizer) -> None:
    """lr x lr_scale per group; before the scheduler is built, so it decays the scaled lr."""
    for group in optimizer.param_groups:
        group["lr"] *= group.get("lr_scale", 1.0)


class FreezeBackbone(L.Callback):
    """For the first `samples` training samples only the head learns: the backbone's gradients are dropped
    before each optimizer step (so its weights, momentum and weight decay are untouched) and its BatchNorm
    layers keep their running statistics (eval mode). Counted in samples, like every schedule here."""

    def __init__(self, samples: int = 0) -> None:
        if samples < 0:
            raise ValueError(f"freeze_backbone.samples={samples} must be >= 0 (0: off)")
        self.samples = samples

    @property
    def enabled(self) -> bool:
        return self.samples > 0

    def frozen(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        return trainer.global_step * pl_module.global_batch_size < self.samples

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        frozen = self.frozen(trainer, pl_module)
        head = head_prefix(pl_module.network)
        for name, module in pl_module.network.named_modules():
            if isinstance(getattr(module, "running_mean", None), Tensor) and not (name + ".").startswith(head):
                module.train(not frozen)  # a BatchNorm: its running statistics (buffers) stay as they are

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.frozen(trainer, pl_module):
            for p in backbone_parameters(pl_module.network):
                p.grad = None  # SGD and RMSpropTF skip parameters without a gradient
