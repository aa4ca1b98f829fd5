"""Everything a run gets besides what its config names, and who adds it: the one list.

    what                         class (file)                            added by; a user's own ... replaces it
    TensorBoard in the run dir   TensorBoardLogger(name="", version="")  CLI; --trainer.logger
    atomic checkpoint files      AtomicCheckpointIO (checkpointing.py)   CLI; a CheckpointIO plugin
    best-k checkpoints           ModelCheckpoint on model.main_metric    module_callbacks; a ModelCheckpoint
    last.ckpt, the newest state  LastCheckpoint (checkpointing.py)       module_callbacks; save_last=True
    images/s                     ImagesPerSecond (callbacks.py)          module_callbacks; a ThroughputMonitor
    final validation             ValidateAtEnd (callbacks.py)            module_callbacks; a ValidateAtEnd
    per-class results            PerClassMetrics (per_class.py)          module_callbacks; a PerClassMetrics
    Polyak averaging             PolyakAveraging (ema.py)                module_callbacks if model.ema_decay;
                                                                         a WeightAveraging
    frozen backbone              FreezeBackbone (pretrained.py)          module_callbacks if
                                                                         model.freeze_backbone_samples
    graceful stop and requeue    RequeueOnSignal (slurm.py)              CLI
    start and end summary        RunSummary (console.py)                 CLI
    progress bar                 ProgressBar (progress.py)               CLI; enable_progress_bar: false
    image grids                  ImageGrids (images.py)                  LightningCLI, from --images.*
    config.yaml                  SaveConfigCallback                      LightningCLI

"CLI" is XceptionCLI.instantiate_trainer, through `cli_additions`. `module_callbacks` depend on the model's
config (and the data's facts in it); the CLI adds them with the rest, and XceptionModule.configure_callbacks
adds them for a Trainer built in Python (it finds them present under the CLI, and adds none twice), through
`attach`: not as configure_callbacks' return value, which would make Lightning drop every trainer callback
whose type one of ours subclasses (the user's ModelCheckpoint, for our LastCheckpoint).
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, ThroughputMonitor, WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from xception_pl.callbacks import ImagesPerSecond, ValidateAtEnd
from xception_pl.checkpointing import AtomicCheckpointIO, LastCheckpoint
from xception_pl.console import RunSummary
from xception_pl.ema import PolyakAveraging
from xception_pl.per_class import PerClassMetrics
from xception_pl.pretrained import FreezeBackbone
from xception_pl.progress import ProgressBar
from xception_pl.slurm import RequeueOnSignal


def cli_additions(trainer: dict[str, Any], module: L.LightningModule, config_files: list[str]) -> dict[str, Any]:
    """Trainer arguments the CLI adds to the parsed `trainer` config: logger, plugins and callbacks."""
    root = trainer.get("default_root_dir") or "."
    logger = trainer.get("logger")
    if logger in (None, True):
        # The run directory itself holds the event files (no version_N subfolders), so a resumed
        # run keeps logging into the same place and checkpoints land in <root>/checkpoints.
        logger = TensorBoardLogger(save_dir=root, name="", version="", default_hp_metric=False)
    plugins = as_list(trainer.get("plugins"))
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    given = as_list(trainer.get("callbacks"))
    callbacks = [*given, *module_callbacks(module, given), RequeueOnSignal(), RunSummary(config_files)]
    if trainer.get("enable_progress_bar") is not False:  # ours: reads metrics only on logging steps
        callbacks.append(ProgressBar())
    return {"logger": logger, "plugins": plugins, "callbacks": callbacks}


def module_callbacks(module: L.LightningModule, given: list[L.Callback]) -> list[L.Callback]:
    """The module's callbacks, except those of a kind the user already gave (theirs win; said once)."""
    hp, metric = module.hparams, module.main_metric
    name = "epoch={epoch}-step={step}-" + metric.split("/")[1] + "={" + metric + ":.4f}"
    ours: dict[str, tuple[L.Callback, Callable[[L.Callback], bool]]] = {
        "best-k checkpoints": (
            ModelCheckpoint(monitor=metric, mode="max", save_top_k=hp.save_top_k, filename=name,
                            auto_insert_metric_name=False),
            lambda c: isinstance(c, ModelCheckpoint) and not isinstance(c, LastCheckpoint)),
        "last.ckpt": (LastCheckpoint(every_n_train_steps=hp.checkpoint_every_n_steps),
                      lambda c: isinstance(c, LastCheckpoint) or getattr(c, "save_last", None)),
        "images/s": (ImagesPerSecond(), lambda c: isinstance(c, (ImagesPerSecond, ThroughputMonitor))),
        "final validation": (ValidateAtEnd(), lambda c: isinstance(c, ValidateAtEnd)),
        "per-class results": (PerClassMetrics(), lambda c: isinstance(c, PerClassMetrics)),
    }
    if hp.ema_decay is not None:
        ours["Polyak averaging"] = (PolyakAveraging(hp.ema_decay, reference_batch=hp.batch_size),
                                    lambda c: isinstance(c, WeightAveraging))
    if hp.freeze_backbone_samples > 0:
        ours["frozen backbone"] = (FreezeBackbone(hp.freeze_backbone_samples), lambda c: isinstance(c, FreezeBackbone))
    callbacks = []
    for what, (callback, same_kind) in ours.items():
        present = [c for c in given if same_kind(c) and not is_lightning_default(c)]
        theirs = [c for c in present if id(c) not in module.added_callbacks]
        if theirs:
            rank_zero_info(f"{what}: using {type(theirs[0]).__name__} from the trainer's callbacks, not ours")
        elif not present:
            callbacks.append(callback)
    module.added_callbacks |= {id(c) for c in callbacks}
    return callbacks


def attach(trainer: L.Trainer, ours: list[L.Callback]) -> None:
    """Add `ours` to the trainer's callbacks beside the user's, replacing only Lightning's default
    ModelCheckpoint when ours checkpoint; checkpoints run last (as Lightning orders them), so they save what the
    other callbacks of the same hook have done."""
    if not ours:
        return
    ours_checkpoint = any(isinstance(c, Checkpoint) for c in ours)
    kept = [c for c in trainer.callbacks if not (ours_checkpoint and is_lightning_default(c))]
    every = kept + ours
    trainer.callbacks = ([c for c in every if not isinstance(c, Checkpoint)]
                         + [c for c in every if isinstance(c, Checkpoint)])


def is_lightning_default(callback: L.Callback) -> bool:
    """The ModelCheckpoint a Trainer adds by itself (enable_checkpointing) when given none."""
    return (type(callback) is ModelCheckpoint and callback.monitor is None and callback.dirpath is None
            and callback.filename is None and not callback.save_last)


def as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]
