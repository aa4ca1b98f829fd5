"""What a checkpoint records of how its module was built, so `load_from_checkpoint(path)` rebuilds the same
network or refuses, and where the hyperparameters are shown (TensorBoard's HPARAMS tab)."""

from __future__ import annotations

import functools
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

# Lightning's own instantiator for hyperparameters in LightningCLI's form (class_path + init_args): the CLI
# records it too, and load_from_checkpoint builds the module through it (its allowlist holds it).
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
UNDESCRIBED = "undescribed: "  # the start of hparams["network"] for a network built from a lambda or a local


def describe(factory: Any) -> dict[str, Any] | None:
    """{"class_path", "init_args"} of an importable class, or of a functools.partial of one with keyword
    arguments only, of plain values (numbers, strings, None, lists of them); None for anything else."""
    init_args: dict[str, Any] = {}
    if isinstance(factory, functools.partial):
        if factory.args or not all(plain(v) for v in factory.keywords.values()):
            return None
        init_args, factory = dict(factory.keywords), factory.func
    if not isinstance(factory, type) or "<" in factory.__qualname__:  # "<lambda>", "<locals>": not importable
        return None
    return {"class_path": f"{factory.__module__}.{factory.__qualname__}", "init_args": init_args}


def plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def record_factories(hparams: dict[str, Any], factories: dict[str, Any]) -> None:
    """Hyperparameters of a module built in Python (the CLI records its config instead): each factory that
    `describe` can write down, in the CLI's form, with Lightning's instantiator; a network it cannot, as a
    string that makes XceptionModule refuse to load without `network=` (the default network would load the
    same shapes and give other outputs, silently)."""
    described = {name: describe(factory) for name, factory in factories.items()}
    if described["network"] is None:
        hparams["network"] = f"{UNDESCRIBED}{factories['network']!r}"
        return
    hparams.update({name: spec for name, spec in described.items() if spec is not None})
    hparams["_instantiator"] = INSTANTIATOR


def log_hyperparameters(loggers: list[Logger], params: Any, final: dict[str, float]) -> None:
    """The hyperparameters to every logger, and in TensorBoard's HPARAMS tab beside the final validation metrics.

    TensorBoardLogger.log_hyperparams(params, metrics) also logs each metric as a scalar at step 0, which
    TensorBoard then draws as the first point of every val/* curve (at its final value). The HPARAMS tab
    reads the metrics' values from their own scalar series, so the summary only needs to name them.
    """
    for logger in loggers:
        logger.log_hyperparams(params)  # hparams.yaml (TensorBoard), or the logger's own record (CSV, W&B, MLflow)
        if not isinstance(logger, TensorBoardLogger) or not final:
            continue
        from torch.utils.tensorboard.summary import hparams

        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(dict(params)).items()}
        writer = logger.experiment._get_file_writer()
        if writer is None:  # not rank 0: its experiment is a stand-in without a file
            continue
        for summary in hparams(flat, final):
            writer.add_summary(summary)


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
