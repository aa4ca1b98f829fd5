"""`python -m xception_pl {fit,validate,test,predict}`: LightningCLI over XceptionModule and any DataModule.

A run lives in one directory, `trainer.default_root_dir`: the resolved config, the TensorBoard
event files and `checkpoints/` (last.ckpt and the best k) all go there, so a run is resumed
with `--ckpt_path last` in the same directory.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from xception_pl import slurm, storage
from xception_pl.checkpointing import (UNREADABLE_CHECKPOINT, CheckpointLoadError, cause_in,
                                       CheckpointWriteError, missing_checkpoint, newest_checkpoint,
                                       unreadable_checkpoint)
from xception_pl.console import quiet_lightning
from xception_pl.facts import DATA_FACTS, data_fact
from xception_pl.hyperparameters import UNDESCRIBED
from xception_pl.module import XceptionModule
from xception_pl.trackers import check_reachable, continue_runs, missing_extra
from xception_pl.wiring import CONFIGURED, trainer_parts

# Keys that moved out of the model (the recipe) into the groups of their callbacks; an old config stops with the
# new place. (Checkpoints keep them in their hyperparameters; loading one ignores them.)
MOVED = {"model.ema_decay": "ema.decay", "model.save_top_k": "checkpoint.save_top_k",
         "model.checkpoint_every_n_steps": "last_checkpoint.every_n_train_steps",
         "model.freeze_backbone_samples": "freeze_backbone.samples"}


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
        # Facts of the data (xception_pl.facts.DataFacts), typed once: in the data config (or its manifest).
        for fact in DATA_FACTS:
            parser.link_arguments("data", f"model.{fact}", compute_fn=partial(data_fact, name=fact),
                                  apply_on="instantiate")
        for group, part in CONFIGURED.items():  # callbacks with a config: --checkpoint.save_top_k 1, --ema.decay 0.999
            parser.add_lightning_class_args(part, group)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        moved = moved_keys(args) if args is None or isinstance(args, list) else {}
        if moved:
            raise SystemExit("error: " + "; ".join(f"{old} is now {new}" for old, new in moved.items())
                             + ": rename it in the config or on the command line")
        super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        """The data module and the model check their arguments when built: a bad value ends the run with
        their one-line message, not a traceback (jsonargparse wraps the data module's in a Union report)."""
        try:
            super().instantiate_classes()
        except (ValueError, OSError, ModuleNotFoundError) as error:
            missing = cause_in(error, ModuleNotFoundError)  # a tracker's or store's package (jsonargparse wraps it)
            if missing is not None:
                raise SystemExit(f"error: {missing_extra(missing)}") from None
            if error.__cause__ is not None and "jsonargparse" in last_frame(error).f_code.co_filename:
                error = error.__cause__  # the constructor's own message, inside jsonargparse's report
            raise SystemExit(f"error: {error}") from None

    def before_fit(self) -> None:
        """Resolve `--ckpt_path last` to the newest checkpoint of this run directory (a requeued SLURM
        job's hpc_ckpt included); refuse to start a fresh fit over an earlier run's checkpoints."""
        config = self.config_init[self.subcommand]
        root = self.trainer.default_root_dir  # a local directory, or an object store's URL (xception_pl.storage)
        try:  # before any process waits on another: the run directory's store and the trackers answer
            if storage.is_url(root):
                storage.reachable(root, what="trainer.default_root_dir", must_exist=False)
            check_reachable(self.trainer.loggers)
        except OSError as error:
            raise SystemExit(f"error: {error}") from None
        newest = newest_checkpoint(root)
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = str(newest) if newest else None
            print(f"resuming from {newest}" if newest else f"no checkpoint in {root} yet: starting a new run",
                  flush=True)
        elif config.get("ckpt_path") is None and newest is not None:
            raise SystemExit(
                f"error: {root} already holds checkpoints of an earlier run ({str(newest).rsplit('/', 1)[-1]}). "
                "Resume it with "
                "--ckpt_path last, or start a new run in another --trainer.default_root_dir.")
        elif missing_checkpoint(config.get("ckpt_path")):
            raise SystemExit(f"error: --ckpt_path {config['ckpt_path']} does not exist. Give the path of a .ckpt "
                             "file, or --ckpt_path last to resume the newest checkpoint of the run directory.")
        if self.trainer.is_global_zero:
            slurm.record_run(root)
            continue_runs(self.trainer.loggers, config.get("ckpt_path"))  # the same MLflow / W&B run

    def _parse_ckpt_path(self) -> None:
        """The model arguments of --ckpt_path fill in what the config and command line leave at their defaults
        (`validate --ckpt_path FILE` rebuilds the trained network without its config); what the user set wins,
        and differences are said once. (LightningCLI's own rule: the checkpoint's win over --model.*.)
        An unreadable file is reported in one line with the fix, not as torch's traceback."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        try:
            saved = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        except UNREADABLE_CHECKPOINT as error:
            raise SystemExit(f"error: {unreadable_checkpoint(ckpt_path, error)}") from None
        given = self.config[subcommand].model
        defaults = self._parser(subcommand).get_defaults().model
        taken, kept = {}, []
        for key, value in saved.items():
            if key.startswith("_") or key in DATA_FACTS or key not in given:
                continue  # Lightning's bookkeeping, and facts the data gives
            if plain(given[key]) == plain(defaults.get(key)):
                if key == "network" and str(value).startswith(UNDESCRIBED):
                    raise SystemExit(f"error: --ckpt_path {ckpt_path}: its network was built in Python from "
                                     f"{value[len(UNDESCRIBED):]}, which it cannot describe: give --model.network")
                taken[key] = value
            elif plain(given[key]) != plain(value):
                kept.append(f"model.{key}")
        if kept:
            print(f"--ckpt_path {ckpt_path}: the config's {', '.join(kept)} replace the checkpoint's", flush=True)
        if taken:
            self.config = self.parser.parse_object({subcommand: {"model": taken}}, self.config)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer of the config, with what every run gets: xception_pl.wiring.trainer_parts, given the
        configured groups (so not also added as Lightning's extra callbacks)."""
        parsed, init = ((self.config[self.subcommand], self.config_init[self.subcommand]) if self.subcommand
                        else (self.config, self.config_init))
        trainer = {**init.get("trainer", {}), **kwargs}
        parts = trainer_parts(trainer.get("default_root_dir") or ".", trainer.get("callbacks"),
                              logger=trainer.get("logger"), plugins=trainer.get("plugins"),
                              progress_bar=trainer.get("enable_progress_bar") is not False,
                              config_files=[str(path) for path in parsed.get("config") or []],
                              **{group: init[group] for group in CONFIGURED})
        return self._instantiate_trainer({**trainer, **parts}, [])


def moved_keys(args: list[str] | None) -> dict[str, str]:
    """The MOVED keys given on the command line (sys.argv when args is None) or in a --config file."""
    args = sys.argv[1:] if args is None else args
    given = {arg[2:].split("=")[0] for arg in args if arg.startswith("--")}
    files = [value for flag, value in zip(args, args[1:]) if flag in ("--config", "-c")]
    files += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    for file in files:
        try:
            config = yaml.safe_load(Path(file).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # jsonargparse says what is wrong with it
        model = config.get("model") if isinstance(config, dict) else None
        given |= {f"model.{key}" for key in (model if isinstance(model, dict) else {})}
    return {old: new for old, new in MOVED.items() if old in given}


def plain(value: Any) -> Any:
    """A config value as plain data, to compare a checkpoint's hyperparameters with the parsed config."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return value


def last_frame(error: BaseException) -> FrameType:
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame


def main(args: list[str] | None = None) -> None:
    try:
        XceptionCLI(args=args)
    except (CheckpointWriteError, CheckpointLoadError, FloatingPointError) as error:
        # Failures with a message that names the fix: that line, not a traceback through Lightning's loops.
        raise SystemExit(f"error: {error}") from None
