"""Test-only pieces that the reliability tests put inside `xception_pl fit`: a callback that SIGKILLs its
own process at a chosen moment, and a tiny network that keeps many such runs cheap."""

from __future__ import annotations

import atexit
import contextlib
import io
import multiprocessing
import os
import signal
import sys
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

Hook = Literal["train_step", "validation", "checkpoint_write", "sigterm"]
HOOKS: tuple[Hook, ...] = ("train_step", "validation", "checkpoint_write", "sigterm")


class KillAt(L.Callback):
    """SIGKILLs this process at the `at`-th (1-based) occurrence of `hook` in it: "train_step" between
    backward and the optimizer step, "validation" after a validation batch, "checkpoint_write" halfway
    through writing a checkpoint's temporary file (the half is flushed and fsynced, so it is on disk);
    "sigterm" sends SIGTERM instead at the `at`-th train step (a graceful stop: hpc_ckpt_N.ckpt, exit 143).
    With `rank`, only that rank's process; `marker` is touched just before."""

    def __init__(self, hook: Hook, at: int, rank: int | None = None, marker: str | None = None) -> None:
        self.hook, self.at, self.count, self.rank, self.marker = hook, at, 0, rank, marker
        self.mine = True

    def tick(self, hook: Hook) -> bool:
        self.count += hook == self.hook
        hit = self.mine and hook == self.hook and self.count == self.at
        if hit and self.marker is not None:
            open(self.marker, "w").close()
        return hit

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.mine = self.rank is None or trainer.global_rank == self.rank
        if self.hook != "checkpoint_write":
            return
        save = torch.save

        def save_half_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if not self.tick("checkpoint_write"):
                return save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()  # an object store's file: uploads the parts that are full
            with contextlib.suppress(OSError):  # a local file; an object store's has no descriptor
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_half_then_die  # this process only: it dies with the patch

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.tick("train_step"):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.tick("sigterm"):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.tick("validation"):
            os.kill(os.getpid(), signal.SIGKILL)


class TinyNetwork(nn.Module):
    """Two conv-BN-ReLU layers, global pooling, a linear classifier. The crash tests exercise the module,
    loops, data and checkpoints around the network; Xception's 250 MB checkpoints would make each of their
    many runs take a minute."""

    def __init__(self, num_classes: int, dropout: float = 0.0, padding: int = 0) -> None:
        super().__init__()
        if padding:  # unused floats: a checkpoint of a chosen size
            self.register_buffer("padding", torch.zeros(padding))
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(self.features(images))


def run_cli(argv: list[str], log: str, env: dict[str, str] | None = None) -> int:
    """`python -m xception_pl <argv>` in a process forked from a server that imported the package once (a
    cold start costs ~10 s on a busy 2-core machine), with `env` added to its environment; its output goes to
    `log`. Returns the exit code: -9 for a process that SIGKILLed itself."""
    process = FORKSERVER.Process(target=cli_process, args=(argv, log, env or {}))
    process.start()
    process.join(timeout=600)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"xception_pl {' '.join(argv)} did not finish in 600 s; see {log}")
    return process.exitcode


def cli_process(argv: list[str], log: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    sys.argv = ["xception_pl", *argv]  # not the parent's pytest arguments
    # As in `python -m xception_pl`: data workers forked by this process (a forkserver child inherits the forkserver
    # start method, whose workers are the server's children and outlive a killed training process).
    multiprocessing.set_start_method("fork", force=True)
    from xception_pl.__main__ import main

    try:
        main(argv)
    finally:
        atexit._run_exitfuncs()  # as the interpreter's exit does (a multiprocessing child skips it): W&B's finish

FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["xception_pl.cli", "xception_pl.data", "tests.crash"])


class FactlessData(L.LightningDataModule):
    """A user's data module that forgot a fact the model is built with (xception_pl.facts.DataFacts)."""

    def __init__(self, num_classes: int = 3, batch_size: int = 4) -> None:
        super().__init__()
        self.num_classes, self.batch_size, self.train_size = num_classes, batch_size, 8  # no `multilabel`
