"""Skipping a batch whose loss is NaN or inf, decided on the device: the host never waits for it.

A skipped batch changes nothing: weights, optimizer state, BatchNorm running statistics, the Polyak
average and the lr schedule stay as they were, on every rank alike. How, without a host read or a
collective of our own on the step:

1. `poison(loss)`: a non-finite loss is multiplied by NaN, so backward makes every gradient NaN and
   DDP's gradient all-reduce carries the verdict to every rank (an inf loss alone can leave finite
   gradients: softmax cross-entropy with a -inf target logit).
2. `found_nonfinite(grads)`: one multi-tensor check of the gradients (GradScaler's kernel) into a
   device flag; optimizers that honour `optimizer.found_inf` (torch's fused SGD and Adam, and
   `xception_pl.optim.RMSpropTF`) skip the update on the device. Others fall back to a host check.
3. `BatchNormState`: the running statistics as they were before the step's forward, put back
   where the flag is set (one `where` over one flat copy).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim import Optimizer


def poison(loss: Tensor) -> Tensor:
    """loss if it is finite, else NaN: its gradients are then NaN too (exactly loss * 1.0 otherwise)."""
    return loss * torch.where(torch.isfinite(loss), 1.0, float("nan"))


def found_nonfinite(grads: list[Tensor]) -> Tensor:
    """float32 [1] on the gradients' device: 1.0 if any gradient holds a NaN or inf, else 0.0."""
    found = torch.zeros(1, device=grads[0].device)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    one = torch.ones(1, device=found.device)
    for group in by_dtype.values():  # checks and multiplies by 1 (its unscale step) in one launch per dtype
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
    return found


def skips_on_device(optimizer: Optimizer) -> bool:
    """Whether `optimizer.step()` honours `optimizer.found_inf` (torch's contract with GradScaler)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def zero_momentum_buffers(optimizer: Optimizer) -> None:
    """Fused SGD allocates its momentum buffers uninitialised on the first step; if that step is skipped
    they stay garbage. Zero buffers from the start give the same first update (buf = grad)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))


class BatchNormState:
    """The running statistics of every layer of `model` that keeps them (BatchNorm), as one flat copy per dtype."""

    def __init__(self, model: nn.Module) -> None:
        # The modules, not their buffers: moving the model to a device replaces the buffer tensors.
        self.norms = [m for m in model.modules() if isinstance(getattr(m, "running_mean", None), Tensor)]
        self.saved: dict[torch.dtype, Tensor] = {}

    def groups(self) -> dict[torch.dtype, list[Tensor]]:
        groups: dict[torch.dtype, list[Tensor]] = {}
        for m in self.norms:
            for buffer in (m.running_mean, m.running_var, m.num_batches_tracked):
                if buffer is not None:
                    groups.setdefault(buffer.dtype, []).append(buffer)
        return groups

    def save(self) -> None:
        self.saved = {dtype: torch.cat([b.reshape(-1) for b in group]) for dtype, group in self.groups().items()}

    def restore_where(self, found: Tensor) -> None:
        """Put the saved statistics back where `found` (a device flag) is set; no host read."""
        for dtype, group in self.groups().items():
            now = torch.cat([b.reshape(-1) for b in group])
            kept = torch.where(found.bool(), self.saved[dtype], now)
            torch._foreach_copy_(group, [part.view_as(b) for part, b in zip(kept.split([b.numel() for b in group]),
                                                                              group)])
