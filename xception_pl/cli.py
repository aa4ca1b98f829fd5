"""`python -m xception_pl {fit,validate,test,predict}`: LightningCLI over XceptionModule and any DataModule.

A run lives in one directory, `trainer.default_root_dir`: the resolved config, the TensorBoard
event files and `checkpoints/` (last.ckpt and the best k) all go there, so a run is resumed
with `--ckpt_path last` in the same directory.
"""

from __future__ import annotations

from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from xception_pl import slurm
from xception_pl.callbacks import (UNREADABLE_CHECKPOINT, AtomicCheckpointIO, CheckpointLoadError,
                                   CheckpointWriteError, unreadable_checkpoint)
from xception_pl.console import RunSummary, quiet_lightning
from xception_pl.images import ImageGrids
from xception_pl.module import XceptionModule
from xception_pl.progress import ProgressBar


class XceptionCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        slurm.check_launch()  # a wrong SLURM launch fails here, before any process waits on another
        quiet_lightning()
        super().__init__(
            XceptionModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # the module steps its schedule per optimizer step
            # "omegaconf+" resolves ${...} after command-line overrides are merged, so an override
            # reaches every value interpolated from it.
            parser_kwargs={"parser_mode": "omegaconf+"},
            save_config_kwargs={"overwrite": True},  # a resumed or requeued run writes it again
            seed_everything_default=0,  # one seed for every process (ours)
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Facts of the data, typed once: in the data config (or its manifest).
        for fact in ("num_classes", "multilabel", "train_size", "batch_size"):
            parser.link_arguments(f"data.{fact}", f"model.{fact}", apply_on="instantiate")
        parser.add_lightning_class_args(ImageGrids, "images")  # grids in TensorBoard; --images.enabled false: off

    def instantiate_classes(self) -> None:
        """The data module and the model check their arguments when built: a bad value ends the run with
        their one-line message, not a traceback (jsonargparse wraps the data module's in a Union report)."""
        try:
            super().instantiate_classes()
        except (ValueError, OSError) as error:
            if error.__cause__ is not None and "jsonargparse" in last_frame(error).f_code.co_filename:
                error = error.__cause__  # the constructor's own message, inside jsonargparse's report
            raise SystemExit(f"error: {error}") from None

    def before_fit(self) -> None:
        """Resolve `--ckpt_path last` to the newest checkpoint of this run directory (a requeued SLURM
        job's hpc_ckpt included); refuse to start a fresh fit over an earlier run's checkpoints."""
        config = self.config_init[self.subcommand]
        root = Path(self.trainer.default_root_dir)
        newest = newest_checkpoint(root)
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = str(newest) if newest else None
            print(f"resuming from {newest}" if newest else f"no checkpoint in {root} yet: starting a new run",
                  flush=True)
        elif config.get("ckpt_path") is None and newest is not None:
            raise SystemExit(
                f"error: {root} already holds checkpoints of an earlier run ({newest.name}). Resume it with "
                "--ckpt_path last, or start a new run in another --trainer.default_root_dir.")
        elif missing_checkpoint(config.get("ckpt_path")):
            raise SystemExit(f"error: --ckpt_path {config['ckpt_path']} does not exist. Give the path of a .ckpt "
                             "file, or --ckpt_path last to resume the newest checkpoint of the run directory.")
        if self.trainer.is_global_zero:
            slurm.record_run(root)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the hyperparameters of --ckpt_path before anything else: an unreadable file is
        reported in one line with the fix, not as torch's traceback."""
        try:
            super()._parse_ckpt_path()
        except UNREADABLE_CHECKPOINT as error:
            raise SystemExit(f"error: {unreadable_checkpoint(self.config[self.config.subcommand].ckpt_path, error)}"
                             ) from None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> L.Trainer:
        root = config.get("default_root_dir") or "."
        if config.get("logger") in (None, True):
            # The run directory itself holds the event files (no version_N subfolders), so a resumed
            # run keeps logging into the same place and checkpoints land in <root>/checkpoints.
            config["logger"] = TensorBoardLogger(save_dir=root, name="", version="", default_hp_metric=False)
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        # Inert outside an srun step; inside one it replaces Lightning's SIGUSR1 save-and-requeue.
        callbacks = [*callbacks, slurm.RequeueOnSignal()]
        parsed = self.config[self.subcommand] if self.subcommand else self.config
        callbacks.append(RunSummary([str(path) for path in parsed.get("config") or []]))
        if config.get("enable_progress_bar") is not False:  # ours: reads metrics only on logging steps
            callbacks.append(ProgressBar())
        return super()._instantiate_trainer(config, callbacks)


def newest_checkpoint(root: Path) -> Path | None:
    """The newest of <root>/checkpoints/last*.ckpt and the <root>/hpc_ckpt_*.ckpt that Lightning
    writes when SLURM signals a job before its time limit."""
    candidates = [*root.glob("hpc_ckpt_*.ckpt"), *(root / "checkpoints").glob("last*.ckpt")]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def last_frame(error: BaseException) -> FrameType:
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame


def missing_checkpoint(ckpt_path: str | None) -> bool:
    special = ckpt_path in (None, "last", "best", "hpc", "registry") or "://" in str(ckpt_path)
    return not special and not Path(ckpt_path).is_file()


def main(args: list[str] | None = None) -> None:
    try:
        XceptionCLI(args=args)
    except (CheckpointWriteError, CheckpointLoadError, FloatingPointError) as error:
        # Failures with a message that names the fix: that line, not a traceback through Lightning's loops.
        raise SystemExit(f"error: {error}") from None
