"""Counts, per training step, the reads that make the host wait for the device and the collectives.

    python -m xception_pl fit --config ... --trainer.callbacks+=xception_pl.host_syncs.HostSyncCounter \
        --trainer.callbacks.output syncs.json [--trainer.callbacks.mode cuda_debug]

A step runs from one `on_train_batch_start` to the next (or the end of training), so every callback's
batch-end hook, logging, a validation or checkpoint in between, and fetching the next batch count in it.
Modes (ours): "dispatch" counts `aten._local_scalar_dense` (`.item()`, `float()`/`bool()` of a tensor)
with a TorchDispatchMode, on any device; "cuda_debug" counts the warnings of
`torch.cuda.set_sync_debug_mode("warn")` (every synchronizing CUDA call, copies included; it does not
disturb torch.compile, which a dispatch mode around a compiled step may); "both". Collectives are the
Python calls of `torch.distributed` functions below, wrapped while counting and restored after (DDP's
gradient buckets are all-reduced in C++, asynchronously, and are not counted).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from xception_pl.checkpointing import write_atomically

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce", "reduce_scatter", "gather", "scatter")
SYNC_WARNING = "synchronizing CUDA operation"  # c10::cuda::warn_or_error_on_sync's message


class _ReadCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter(L.Callback):
    """Per training step: `reads` (dispatch), `cuda_syncs` (cuda_debug), `collectives` and which ones, whether
    Lightning logs on the step, and whether a validation or checkpoint ran in it. `records` holds them;
    `output` (JSON, written at train end; `<stem>.rank<r><suffix>` per rank when there are several)."""

    def __init__(self, output: str | None = None, mode: Literal["dispatch", "cuda_debug", "both"] = "dispatch") -> None:
        if mode not in ("dispatch", "cuda_debug", "both"):
            raise ValueError(f"HostSyncCounter mode {mode!r}: choose dispatch, cuda_debug or both")
        self.output, self.mode = output, mode
        self.records: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the step being counted
        self._reads: _ReadCounter | None = None
        self._warnings: warnings.catch_warnings | None = None
        self._originals: dict[str, Any] = {}
        self._calls: Counter[str] = Counter()
        self._cuda_syncs = 0

    # ---- counting on and off -------------------------------------------------------------------
    def _start(self, trainer: L.Trainer) -> None:
        self._calls.clear()
        self._cuda_syncs = 0
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._originals[name] = original = getattr(dist, name)
                setattr(dist, name, self._wrap(name, original))
        if self.mode != "dispatch" and trainer.strategy.root_device.type == "cuda":
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()  # restores the filters and showwarning on exit
            warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")
            show = warnings.showwarning

            def count(message, category, *args, **kwargs) -> None:
                if SYNC_WARNING in str(message):
                    self._cuda_syncs += 1
                else:
                    show(message, category, *args, **kwargs)

            warnings.showwarning = count
            torch.cuda.set_sync_debug_mode("warn")
        if self.mode != "cuda_debug":
            self._reads = _ReadCounter()
            self._reads.__enter__()

    def _wrap(self, name: str, original):
        def counted(*args, **kwargs):
            self._calls[name] += 1
            return original(*args, **kwargs)

        return counted

    def _stop(self) -> tuple[int | None, int | None]:
        reads = cuda_syncs = None
        if self._reads is not None:
            self._reads.__exit__(None, None, None)
            reads, self._reads = self._reads.reads, None
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(None, None, None)
            cuda_syncs, self._warnings = self._cuda_syncs, None
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()
        return reads, cuda_syncs

    def _close(self, trainer: L.Trainer) -> None:
        if self._open is None:
            return
        reads, cuda_syncs = self._stop()
        record, self._open = self._open, None
        # Lightning's LoggerConnector.should_update_logs, as evaluated after the step's batch-end hooks:
        # (batches stepped before this one + 1) % log_every_n_steps == 0, or the trainer is stopping. With one
        # optimizer (ours), the batches stepped before a batch are the global step at its start.
        every = trainer.log_every_n_steps
        logs = every > 0 and ((record.pop("_stepped") + 1) % every == 0 or trainer.should_stop)
        # The stop signal's agreement (slurm.RequeueOnSignal): one small all-reduce every ~STOP_CHECK_S seconds.
        stop_check = any(getattr(c, "checked_step", None) == trainer.global_step for c in trainer.callbacks)
        record.update(global_step=trainer.global_step, reads=reads, cuda_syncs=cuda_syncs,
                      collectives=sum(self._calls.values()), collective_calls=dict(self._calls),
                      logs=bool(logs or trainer.fast_dev_run), stop_check=stop_check)
        self.records.append(record)

    # ---- hooks ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._close(trainer)
        self._open = {"batch_idx": batch_idx, "_stepped": trainer.global_step,
                      "validated": False, "checkpointed": False}
        self._start(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._open is not None:
            self._open["validated"] = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._open is not None:
            self._open["checkpointed"] = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(trainer)
        if self.output is None:
            return
        path = Path(self.output)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps({"mode": self.mode, "device": str(pl_module.device),
                                           "log_every_n_steps": trainer.log_every_n_steps, "records": self.records}))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._open is not None:  # leave no mode, warning filter or wrapped collective behind
            self._open = None
            self._stop()
