"""Evaluation under DDP with uneven data: no collective inside an evaluation step.

Evaluation gives each rank whole shards (each sample exactly once), so with fewer shards than ranks
(ImageNet's 50 validation shards on 64 GPUs, FastEval14k's 14 on 16) a rank has no batch at all, and with
unreadable shards a rank may read none. Every collective must then be one that every rank makes at the same
point whatever its data: the metric sync at the end of the epoch is. DistributedDataParallel's buffer
broadcast is not: it runs inside the first forward after a grad-enabled one (and the very first, the sanity
check), so rank 0 would wait in it for a rank with nothing to forward, which waits in the metric sync.

The mechanism (ours): DDP never broadcasts buffers in a forward (`forward_sync_buffers`), and every rank takes
rank 0's buffers once at the start of each evaluation epoch, a hook every rank runs. Why this one:
- rank 0's BatchNorm statistics are the same with or without DDP's broadcast (it receives its own), so the
  checkpoint, which rank 0 writes, is unchanged, and a training step makes one collective fewer;
- every rank then evaluates exactly the weights rank 0 saves, so distributed metrics equal a one-process
  evaluation of that checkpoint;
- forwarding on the unwrapped module instead would need Lightning's strategy replaced, and an empty batch on
  every rank would rely on DDP broadcasting in the first forward only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def stop_buffer_broadcast(model: nn.Module | None) -> None:
    """Turn off DDP's per-forward buffer broadcast (read at every forward, so it may change after wrapping):
    `forward_sync_buffers` since torch 2.14, `broadcast_buffers` before."""
    if isinstance(model, DistributedDataParallel):
        model.forward_sync_buffers = model.broadcast_buffers = False


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Every rank's buffers take rank `src`'s values: one broadcast per dtype, of a flat copy."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for group in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, src)
        torch._foreach_copy_(group, [part.view_as(b) for part, b in zip(flat.split([b.numel() for b in group]), group)])
