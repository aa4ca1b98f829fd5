"""TensorFlow's RMSprop (the JFT recipe, sec. 4.2) as a multi-tensor step that can skip on the device."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer


class RMSpropTF(Optimizer):
    """timm's `RMSpropTF` with its TensorFlow defaults, in a handful of multi-tensor kernels per step:

        g = grad + weight_decay * p                     (L2, coupled)
        square_avg = alpha * square_avg + (1 - alpha) * g^2       (initialised to ones, as TF)
        buf = momentum * buf + lr * g / sqrt(square_avg + eps)   (eps inside the sqrt, lr in the buffer)
        p = p - buf

    Why not timm's class as it is: it loops over tensors (~8 kernels each, 276 tensors in Xception) and
    cannot skip a step without the host. This one honours `found_inf` (and `grad_scale`), the contract
    torch's fused optimizers have with GradScaler: where `found_inf` is set, nothing changes (ours).
    Equal to timm's `RMSpropTF(centered=False, decoupled_decay=False, lr_in_momentum=True)` (tested).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-2, alpha: float = 0.9,
                 eps: float = 1e-10, weight_decay: float = 0.0, momentum: float = 0.0) -> None:
        if lr <= 0 or eps <= 0 or not 0.0 <= alpha <= 1.0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(f"RMSpropTF: need lr > 0, eps > 0, 0 <= alpha <= 1, 0 <= momentum < 1 and "
                             f"weight_decay >= 0; got lr={lr}, eps={eps}, alpha={alpha}, momentum={momentum}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum))
        self._step_supports_amp_scaling = True  # reads self.found_inf / self.grad_scale, as fused SGD

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["square_avg"] = torch.ones_like(p)  # TF initialises to 1 (torch: 0)
                    if group["momentum"] > 0:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            self.update(group, params, found_inf, grad_scale)
        return loss

    def update(self, group: dict, params: list[Tensor], found_inf: Tensor | None, grad_scale: Tensor | None) -> None:
        grads = [p.grad for p in params]
        if grad_scale is not None:  # GradScaler left the gradients scaled (16-mixed)
            grads = torch._foreach_div(grads, grad_scale.reshape(()))
        keep = None
        if found_inf is not None:
            # NaN gradients would poison every state they touch (NaN * 0 is NaN): zero them through one
            # flat copy, then scale every change by keep = 0 (skip) or 1.
            grads = zeroed_if(found_inf, grads)
            keep = (1.0 - found_inf).reshape(())
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        square_avgs = [self.state[p]["square_avg"] for p in params]
        squares = torch._foreach_mul(grads, grads)
        rate = 1.0 - group["alpha"]
        lerp_(square_avgs, squares, rate if keep is None else keep * rate)
        denominators = torch._foreach_add(square_avgs, group["eps"])
        torch._foreach_sqrt_(denominators)
        steps = torch._foreach_div(grads, denominators)
        torch._foreach_mul_(steps, group["lr"])  # lr * g / sqrt(square_avg + eps)
        if group["momentum"] > 0:
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_add_(steps, buffers, alpha=group["momentum"] - 1.0)  # change of the buffer
            if keep is not None:
                torch._foreach_mul_(steps, keep)
            torch._foreach_add_(buffers, steps)
            steps = buffers if keep is None else torch._foreach_mul(buffers, keep)
        elif keep is not None:
            torch._foreach_mul_(steps, keep)
        torch._foreach_sub_(params, steps)


def zeroed_if(found_inf: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """`tensors`, or zeros where `found_inf` is 1, through one flat copy in memory order viewed back with each
    tensor's own strides: a channels_last gradient stays channels_last, as the multi-tensor kernels' fast path
    needs it to match its parameter and states (ours)."""
    flat = torch.cat([in_memory_order(t) for t in tensors])
    flat = torch.where(found_inf.bool(), 0.0, flat)
    parts = flat.split([t.numel() for t in tensors])
    return [part.as_strided(t.size(), t.stride()) if dense(t) else part.view_as(t) for part, t in zip(parts, tensors)]


def dense(t: Tensor) -> bool:
    """Elements packed without gaps, in the layouts our networks use (contiguous or channels_last)."""
    return t.is_contiguous() or t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def in_memory_order(t: Tensor) -> Tensor:
    return t.as_strided((t.numel(),), (1,)) if dense(t) else t.reshape(-1)


def lerp_(tensors: list[Tensor], ends: list[Tensor], weight: float | Tensor) -> None:
    """tensors += weight * (ends - tensors), multi-tensor. A weight on the device (a 0-dim tensor: a skip flag
    times a rate) takes three multi-tensor ops: torch's lerp has no overload for one tensor weight, and a list of
    0-dim weights beside full tensors is off the CUDA fast path (one kernel per tensor)."""
    if not isinstance(weight, Tensor):
        return torch._foreach_lerp_(tensors, ends, weight)
    changes = torch._foreach_sub(ends, tensors)
    torch._foreach_mul_(changes, weight)
    torch._foreach_add_(tensors, changes)
