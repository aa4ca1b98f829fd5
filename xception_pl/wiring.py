"""Everything a run gets besides the recipe (the module) and the data: one call, `trainer_parts`, for the CLI and
for a Trainer built in Python alike.

    what                         class (file)                            configured by    a user's own ... replaces it
    TensorBoard in the run dir   TensorBoardLogger(name="", version="")  -                --trainer.logger
    atomic checkpoint files      AtomicCheckpointIO (checkpointing.py)   -                a CheckpointIO plugin
    best-k checkpoints           BestCheckpoints (checkpointing.py)      --checkpoint.*   a ModelCheckpoint
    last.ckpt, the newest state  LastCheckpoint (checkpointing.py)       --last_checkpoint.*  save_last=True
    Polyak averaging             PolyakAveraging (ema.py)                --ema.*          a WeightAveraging
    frozen backbone              FreezeBackbone (pretrained.py)          --freeze_backbone.*  a FreezeBackbone
    progressive resizing         ProgressiveResizing (resizing.py)       --progressive_resizing.*  a ProgressiveResizing
    image grids                  ImageGrids (images.py)                  --images.*       an ImageGrids
    images/s                     ImagesPerSecond (callbacks.py)          -                a ThroughputMonitor
    final validation             ValidateAtEnd (callbacks.py)            -                a ValidateAtEnd
    per-class results            PerClassMetrics (per_class.py)          -                a PerClassMetrics
    graceful stop and requeue    RequeueOnSignal (slurm.py)              -                a RequeueOnSignal
    one MLflow / W&B run         TrackerRuns (trackers.py)               -                a TrackerRuns
    stuck, stalled or lost ranks FaultWatch (watchdog.py)                --faults.*       a FaultWatch
    start and end summary        RunSummary (console.py)                 -                a RunSummary
    progress bar                 ProgressBar (progress.py)               enable_progress_bar: false;  any ProgressBar
    config.yaml                  SaveConfigCallback                      LightningCLI (CLI only)

A part whose config turns it off (`--ema.decay null`, `--checkpoint.save_top_k 0`, `--images.enabled false`,
`--freeze_backbone.samples 0`, `--progressive_resizing.start_size null`) is left out. The checkpoint callbacks come
last, as Lightning orders them, so they save what the other callbacks of the same hook have done.

In Python:

    trainer = L.Trainer(max_epochs=2, **trainer_parts("runs/mine", ema=PolyakAveraging(0.999)))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, ProgressBar as AnyProgressBar, ThroughputMonitor, \
    WeightAveraging
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from xception_pl import storage
from xception_pl.callbacks import ImagesPerSecond, ValidateAtEnd
from xception_pl.checkpointing import AtomicCheckpointIO, BestCheckpoints, LastCheckpoint
from xception_pl.console import RunSummary
from xception_pl.ema import PolyakAveraging
from xception_pl.images import ImageGrids
from xception_pl.per_class import PerClassMetrics
from xception_pl.pretrained import FreezeBackbone
from xception_pl.progress import ProgressBar
from xception_pl.resizing import ProgressiveResizing
from xception_pl.slurm import RequeueOnSignal
from xception_pl.trackers import TrackerRuns, require as require_trackers
from xception_pl.watchdog import FaultWatch

# The configurable parts: the CLI's argument group of each (as Lightning's callback groups), its class.
CONFIGURED = {"checkpoint": BestCheckpoints, "last_checkpoint": LastCheckpoint, "ema": PolyakAveraging,
              "freeze_backbone": FreezeBackbone, "progressive_resizing": ProgressiveResizing, "images": ImageGrids,
              "faults": FaultWatch}
# What a user's own callback replaces of ours: the kind, as a test.
SAME_KIND: dict[type, Callable[[L.Callback], bool]] = {
    BestCheckpoints: lambda c: isinstance(c, ModelCheckpoint) and not isinstance(c, LastCheckpoint),
    LastCheckpoint: lambda c: isinstance(c, LastCheckpoint) or bool(getattr(c, "save_last", None)),
    PolyakAveraging: lambda c: isinstance(c, WeightAveraging),
    ImagesPerSecond: lambda c: isinstance(c, (ImagesPerSecond, ThroughputMonitor)),
    ProgressBar: lambda c: isinstance(c, AnyProgressBar),
}


def trainer_parts(
    default_root_dir: str | Path = ".",
    callbacks: Sequence[L.Callback] | L.Callback | None = None,
    *,
    logger: Logger | Sequence[Logger] | bool | None = None,
    plugins: Sequence[Any] | Any = None,
    checkpoint: BestCheckpoints | None = None,
    last_checkpoint: LastCheckpoint | None = None,
    ema: PolyakAveraging | None = None,
    freeze_backbone: FreezeBackbone | None = None,
    progressive_resizing: ProgressiveResizing | None = None,
    images: ImageGrids | None = None,
    faults: FaultWatch | None = None,
    progress_bar: bool = True,
    config_files: Sequence[str] = (),
) -> dict[str, Any]:
    """Trainer arguments for a run in `default_root_dir`: {default_root_dir, logger, plugins, callbacks}.

    `callbacks`, `logger` and `plugins` are the user's, kept; ours are added beside them, except a part of a
    kind the user gave (theirs win; said once). A configurable part left at None is built with its defaults
    (those of the CLI's groups). `progress_bar` must match the Trainer's enable_progress_bar.
    """
    if storage.is_url(default_root_dir):
        storage.filesystem(str(default_root_dir))  # its package missing: the extra to install, before anything starts
    if logger in (None, True):
        # The run directory itself holds the event files (no version_N subfolders), so a resumed
        # run keeps logging into the same place and checkpoints land in <root>/checkpoints.
        logger = TensorBoardLogger(save_dir=default_root_dir, name="", version="", default_hp_metric=False)
    require_trackers(as_list(logger))
    plugins = as_list(plugins)
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    given = as_list(callbacks)
    configured = {"checkpoint": checkpoint, "last_checkpoint": last_checkpoint, "ema": ema,
                  "freeze_backbone": freeze_backbone, "progressive_resizing": progressive_resizing, "images": images,
                  "faults": faults}
    ours = [part if part is not None else CONFIGURED[group]() for group, part in configured.items()]
    ours += [ImagesPerSecond(), ValidateAtEnd(), PerClassMetrics(), RequeueOnSignal(), TrackerRuns(),
             RunSummary(list(config_files))]
    if progress_bar:  # ours: reads metrics only on logging steps
        ours.append(ProgressBar())
    every = given + [c for c in ours if getattr(c, "enabled", True) and not replaced(c, given)]
    callbacks = [c for c in every if not isinstance(c, Checkpoint)] + [c for c in every if isinstance(c, Checkpoint)]
    return {"default_root_dir": default_root_dir, "logger": logger, "plugins": plugins, "callbacks": callbacks}


def replaced(ours: L.Callback, given: list[L.Callback]) -> bool:
    same_kind = SAME_KIND.get(type(ours), lambda c: isinstance(c, type(ours)))
    theirs = next((c for c in given if same_kind(c)), None)
    if theirs is not None:
        rank_zero_info(f"{type(ours).__name__}: using {type(theirs).__name__} from the trainer's callbacks, not ours")
    return theirs is not None


def as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
