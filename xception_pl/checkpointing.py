"""Checkpoints: written atomically, read safely, found again.

- `atomic_path`: every file a run writes for a user (checkpoints, exports, results) appears whole or not at all.
- `AtomicCheckpointIO`: Lightning's checkpoint I/O through it; reads with weights_only=True; a failed write
  stops the run with CheckpointWriteError, an unreadable file is one CheckpointLoadError line with the fix.
- `BestCheckpoints`: the best k by the module's main metric; `LastCheckpoint`: checkpoints/last.ckpt, the newest state; `newest_checkpoint`: what `--ckpt_path last` resumes.

A run directory may be on an object store (trainer.default_root_dir: s3://bucket/runs/x): checkpoints are then
written with xception_pl.storage.write_object (a multipart upload completed only at the end), found by listing.
"""

from __future__ import annotations

import contextlib
from functools import partial
import errno
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from xception_pl import storage

TMP_INFIX = ".tmp-"  # .<name>.tmp-<pid>: a file being written


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; when the block ends without error it is synced to disk and
    renamed over `path` (atomic within a directory), so a reader, or a kill, sees the old file or the new one.
    On error the temporary file is removed and `path` keeps its old content."""
    tmp = temporary_path(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def temporary_path(path: str | os.PathLike) -> Path:
    """.<name>.tmp-<pid> beside `path`: where a file is written before `publish` makes it `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")


def publish(tmp: Path, path: str | os.PathLike) -> None:
    """Sync the written `tmp` to disk and rename it over `path` (atomic within a directory)."""
    fsync(tmp)
    os.replace(tmp, path)
    fsync(Path(path).parent)  # the rename itself survives a power cut


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """`data` to `path`, whole or not at all: a local file (atomic_path) or an object (storage.write_object)."""
    if storage.is_url(path):
        return storage.write_object(str(path), lambda f: f.write(data.encode() if isinstance(data, str) else data))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, fsyncs it, then renames it; reads
    checkpoints with `weights_only=True`. On an object store, a multipart upload of `part_size` bytes a part
    (xception_pl.storage.write_object), completed only when the whole checkpoint is written.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in
    the system temp dir, so the final move may be a copy that a kill leaves half-written;
    a rename within one directory is atomic, so a reader sees the old file or the new one.
    A failed write (disk full, no permission) keeps the old file, and stops training with a
    CheckpointWriteError that names the path and the fix: a run that went on without
    checkpoints could lose days of work at its next failure.
    """

    def __init__(self, part_size: int = storage.PART) -> None:
        super().__init__()
        self.part_size = part_size

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage.is_url(path):  # an object store: the upload completes only when the whole checkpoint is written
            return storage.write_object(str(path), partial(torch.save, checkpoint), storage_options, self.part_size)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".*{path.suffix}{TMP_INFIX}*"):  # of a killed writer (one per run)
                stale.unlink(missing_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as error:
            cause = cause_in(error, OSError)  # torch.save reports a failed write as a RuntimeError from its zip writer
            if cause is None:
                raise
            raise CheckpointWriteError(cause, path) from error

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # Tensors, containers and primitives only (our checkpoints hold nothing else): a checkpoint from
        # elsewhere cannot run code on load. Explicit, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD does not undo it.
        weights_only = True if weights_only is None else weights_only
        if not Path(path).is_file() and not storage.is_url(path):
            raise CheckpointLoadError(f"checkpoint {path} does not exist: check --ckpt_path, or pass "
                                      "--ckpt_path last to resume the newest checkpoint of the run directory")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except UNREADABLE_CHECKPOINT as error:
            raise CheckpointLoadError(unreadable_checkpoint(path, error)) from error


# What torch.load raises on a truncated, corrupt or foreign file, or (weights_only) on pickled objects.
UNREADABLE_CHECKPOINT = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the path and the fix."""

    def __init__(self, error: OSError, path: Path) -> None:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = (f"free space on the file system of {path.parent} (or raise the quota), or point "
                   "trainer.default_root_dir at one with room")
        elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"make {path.parent} writable by this user (check its permissions and that it is not read-only)"
        else:
            fix = f"check that {path.parent} is a writable, healthy file system"
        super().__init__(error.errno, f"could not write checkpoint {path}: {error.strerror or error}. Training stops "
                                      f"here rather than go on without checkpoints; {path.name} still holds the "
                                      f"previous checkpoint, if any. Fix: {fix}, then resume with --ckpt_path last.")

    def __str__(self) -> str:
        return self.strerror  # the message, without OSError's "[Errno N]" prefix


def cause_in(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first exception of `kind` in the chain of `error` (its causes and contexts)."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error


class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be read; the message names the path and the fix."""


def unreadable_checkpoint(path: str | os.PathLike, error: BaseException) -> str:
    if isinstance(error, pickle.UnpicklingError) and "GLOBAL" in str(error):  # a pickled class or function
        return (f"checkpoint {path} holds objects other than tensors and plain containers, so it is not loaded "
                "(weights_only=True: unpickling them could run arbitrary code). Load only checkpoints this "
                "project wrote; if you trust this file, load it with torch.load(..., weights_only=False) and save "
                f"its state dict again. ({str(error).splitlines()[0]})")
    return (f"checkpoint {path} is not a readable torch checkpoint (truncated, corrupt or another format: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'empty'}). Resume from another "
            "one: the best-k files in checkpoints/, or an hpc_ckpt_*.ckpt of the run directory.")


class BestCheckpoints(ModelCheckpoint):
    """The best `save_top_k` checkpoints by the module's `main_metric` (val/acc1, or val/map100 for multi-label
    data), named after it: epoch=1-step=400-acc1=0.7012.ckpt. 0 keeps none (last.ckpt is still written)."""

    def __init__(self, save_top_k: int = 3) -> None:
        if save_top_k < -1:
            raise ValueError(f"checkpoint.save_top_k={save_top_k}: give the number of best checkpoints to keep, "
                             "0 for none or -1 for all")
        super().__init__(monitor="val/acc1", mode="max", save_top_k=save_top_k, auto_insert_metric_name=False)

    @property
    def enabled(self) -> bool:
        return self.save_top_k != 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.monitor = getattr(pl_module, "main_metric", self.monitor)  # known once the data's facts are
        self.filename = "epoch={epoch}-step={step}-" + self.monitor.split("/")[1] + "={" + self.monitor + ":.4f}"
        super().setup(trainer, pl_module, stage)

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        """As Lightning's, and on an object store too: never the checkpoint this run resumed from (Lightning
        removes any remote one, Lightning#21813), nor one outside this callback's directory."""
        if storage.is_url(previous):
            return previous != current and previous != str(trainer.ckpt_path) and \
                previous.startswith(str(self.dirpath).rstrip("/") + "/")
        return super()._should_remove_checkpoint(trainer, previous, current)

    @property
    def state_key(self) -> str:  # as Lightning's ModelCheckpoint named it: checkpoints written before resume
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)


class LastCheckpoint(ModelCheckpoint):
    """checkpoints/last.ckpt, the newest state: (atomically) rewritten after every validation (or at the end
    of every training epoch, without one), at the end of training, and every `every_n_train_steps` optimizer
    steps if given. List it after the best-k ModelCheckpoint: in a hook both save in, last.ckpt then holds
    the best-k bookkeeping of that save.

    Not Lightning's `save_last=True`: that writes last.ckpt only right after a top-k save, so while the
    monitored metric stalls, last.ckpt (and a resume from it) stays at the last improvement, and the
    last.ckpt of a finished run is not its final state.
    """

    def __init__(self, every_n_train_steps: int | None = None) -> None:
        super().__init__(filename="last", monitor=None, save_top_k=1, enable_version_counter=False,
                         every_n_train_steps=every_n_train_steps, every_n_epochs=0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        # Every n steps, but not at an epoch's last batch, whose epoch end saves next: resumed from inside that
        # batch's end, Lightning's restored epoch progress never counts the next epoch as started, and a later
        # resume from that epoch's end trains it again (docs/reliability.md, the fault trials).
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    # The hooks a ModelCheckpoint saves its best-k in, so last.ckpt (written after it) holds its new state.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_save_on_train_epoch_end(trainer):
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_save_on_train_epoch_end(trainer):
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)  # e.g. max_steps in the middle of an epoch

    def save(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # not fitting, sanity check, or saved at this step
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def newest_checkpoint(root: str | Path) -> Path | str | None:
    """The newest of <root>/checkpoints/last*.ckpt and the <root>/hpc_ckpt_*.ckpt that Lightning
    writes when SLURM signals a job before its time limit (a URL where root is one)."""
    if storage.is_url(root):
        return newest_object(str(root))
    root = Path(root)
    candidates = [*root.glob("hpc_ckpt_*.ckpt"), *(root / "checkpoints").glob("last*.ckpt")]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def newest_object(root: str) -> str | None:
    """newest_checkpoint on an object store, by the objects' modification times. S3 keeps those to the second, so
    of a last.ckpt and an hpc_ckpt written in the same second the hpc_ckpt wins: a stop's save is the later one."""
    fs, path = storage.filesystem(root)
    fs.invalidate_cache()
    found = [*fs.glob(f"{path}/hpc_ckpt_*.ckpt", detail=True).values(),
             *fs.glob(f"{path}/checkpoints/last*.ckpt", detail=True).values()]
    newest = max(found, key=lambda f: (fs.modified(f["name"]), "/hpc_ckpt_" in f["name"]), default=None)
    return f"{storage.protocol(root)}://{newest['name']}" if newest else None


def next_hpc_checkpoint(root: str | Path) -> str:
    """<root>/hpc_ckpt_<N+1>.ckpt after the highest N there (root: a directory or an object store's URL)."""
    if storage.is_url(root):
        fs, path = storage.filesystem(str(root))
        fs.invalidate_cache()
        names = [name.rsplit("/", 1)[-1] for name in fs.glob(f"{path}/hpc_ckpt_*.ckpt")]
    else:
        names = [p.name for p in Path(root).glob("hpc_ckpt_*.ckpt")]
    numbers = [int(m.group(1)) for name in names if (m := re.search(r"_(\d+)\.ckpt$", name))]
    return f"{str(root).rstrip('/')}/hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def missing_checkpoint(ckpt_path: str | None) -> bool:
    if ckpt_path in (None, "last", "best", "hpc", "registry"):
        return False
    if storage.is_url(ckpt_path):
        fs, path = storage.filesystem(ckpt_path)
        return not fs.exists(path)
    return not Path(ckpt_path).is_file()
