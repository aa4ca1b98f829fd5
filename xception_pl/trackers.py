"""Experiment trackers beside TensorBoard: Lightning's MLFlowLogger and WandbLogger, kept to one tracker run per
training run however often it is stopped, requeued and resumed.

`TrackerRuns`, a part every run gets (wiring.py), with a tracker among the trainer's loggers:
- keeps each tracker's run id in the checkpoint. A resumed fit logs into the same tracker run: the CLI sets the
  ids before the loggers start a run (`continue_runs`, which a Trainer built in Python can call too); otherwise
  they are switched when the checkpoint is restored, and the empty run the logger had just started is deleted
  (MLflow) or finished (W&B);
- logs no step twice: a run killed after its last checkpoint had logged the steps after it, which the resumed
  fit trains again (with the same values, docs/reliability.md); steps the tracker already holds are not logged
  again (MLflow: the run's metric history; W&B: the run's summary, online);
- logs the run's config.yaml (the CLI's) when the fit starts and the best checkpoint (of the checkpoint callback with a
  metric) when it ends, as artifacts: MLflow under checkpoints/, W&B as a "model" artifact aliased best. Leave
  the loggers' own `log_model` off: with several checkpoint callbacks, Lightning's MLflow logger logs the last
  one's files, and it cannot read a run directory on an object store.
"""

from __future__ import annotations

import importlib
import io
import socket
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger

from xception_pl import storage

# The extra of this package that installs what a tracker (or store) needs: the fix a missing module's error names.
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb", "s3fs": "s3"}


def missing_extra(error: ModuleNotFoundError) -> str:
    """The error's first line, and the extra that installs the missing module where it is one of ours."""
    line = str(error).splitlines()[0].split(" HINT:")[0].rstrip(".")  # not Lightning's pip hint too
    extra = next((extra for module, extra in EXTRAS.items() if module in f"{error.name} {line}"), None)
    return f"{line}: pip install 'xception_pl[{extra}]'" if extra and "xception_pl[" not in line else line


def require(loggers: list[Logger]) -> None:
    """A tracker's package, imported before anything starts: missing, the extra that installs it."""
    for name in trackers(loggers):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ModuleNotFoundError(f"{name} is not installed ({error})", name=name) from None


def kind(logger: Logger) -> str | None:
    return "mlflow" if isinstance(logger, MLFlowLogger) else "wandb" if isinstance(logger, WandbLogger) else None


def trackers(loggers: list[Logger]) -> dict[str, Logger]:
    return {kind(logger): logger for logger in loggers if kind(logger)}


def run_id(logger: Logger) -> str | None:
    return logger.run_id if isinstance(logger, MLFlowLogger) else logger.version


def saved_runs(ckpt_path: str | Path) -> dict[str, str]:
    """The tracker run ids a checkpoint keeps (empty for one written before any tracker was used)."""
    if storage.is_url(ckpt_path):
        checkpoint = torch.load(io.BytesIO(storage.read_bytes(str(ckpt_path))), map_location="cpu", weights_only=True)
    else:  # mapped: only the small entries are read
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return next((state for key, state in checkpoint.get("callbacks", {}).items() if key.startswith("TrackerRuns")), {})


def check_reachable(loggers: list[Logger], timeout: float = 10.0) -> None:
    """One line naming the fix when an MLflow tracking server cannot be reached (its client would retry for
    minutes before the first step)."""
    for logger in loggers:
        uri = getattr(logger, "_tracking_uri", None) if isinstance(logger, MLFlowLogger) else None
        if not uri or not uri.startswith(("http://", "https://")):
            continue
        address = urllib.parse.urlsplit(uri)
        try:
            socket.create_connection((address.hostname, address.port or (443 if address.scheme == "https" else 80)),
                                     timeout=timeout).close()
        except OSError as error:
            raise OSError(f"cannot reach the MLflow tracking server at {uri} ({error.strerror or error}): start it, or "
                          "fix the MLFlowLogger's tracking_uri (or MLFLOW_TRACKING_URI)") from None


def continue_runs(loggers: list[Logger], ckpt_path: str | Path | None) -> None:
    """Before a fit from `ckpt_path` starts its loggers: each tracker continues the run the checkpoint names."""
    found = trackers(loggers)
    saved = saved_runs(ckpt_path) if ckpt_path and found else {}  # from a store: a download, so only if needed
    for name, logger in found.items():
        if saved.get(name):
            preset(logger, saved[name])


def preset(logger: Logger, run: str) -> None:
    if isinstance(logger, MLFlowLogger):
        logger._run_id = run
    else:
        logger._id = logger._wandb_init["id"] = run
        logger._wandb_init["resume"] = "allow"


def switch(logger: Logger, run: str) -> None:
    """Point a logger that has already started a new, still empty run at `run`, dropping the empty one."""
    if isinstance(logger, MLFlowLogger):
        empty, client = logger.run_id, logger.experiment
        logger._run_id, logger._experiment_id = run, client.get_run(run).info.experiment_id
        client.delete_run(empty)
    else:
        logger.experiment.finish()
        logger._experiment = None
        preset(logger, run)
        _ = logger.experiment


def logged_steps(logger: Logger) -> int | None:
    """The highest step the tracker run holds (None: unknown, as for a W&B run offline)."""
    if isinstance(logger, MLFlowLogger):
        client, run = logger.experiment, logger.run_id
        steps = [m.step for key in client.get_run(run).data.metrics for m in client.get_metric_history(run, key)]
        return max(steps, default=None)
    summary = getattr(logger.experiment, "summary", {})
    step = summary.get("trainer/global_step") if hasattr(summary, "get") else None
    return int(step) if step is not None else None


class AfterStep:
    """A logger's log_metrics that drops the steps up to `floor`, which the tracker already holds."""

    def __init__(self, log_metrics: Any, floor: int) -> None:
        self.log_metrics, self.floor = log_metrics, floor

    def __call__(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is None or step > self.floor:
            self.log_metrics(metrics, step)


class TrackerRuns(L.Callback):
    """One tracker run per training run: its id in the checkpoint, no step logged twice, the config and the
    best checkpoint as artifacts (the module docstring)."""

    def __init__(self) -> None:
        self.trackers: dict[str, Logger] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trackers = trackers(trainer.loggers) if trainer.is_global_zero else {}

    def state_dict(self) -> dict[str, Any]:
        return {name: run_id(logger) for name, logger in self.trackers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, logger in self.trackers.items():
            if state_dict.get(name) and run_id(logger) != state_dict[name]:
                switch(logger, state_dict[name])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        config = f"{str(trainer.default_root_dir).rstrip('/')}/config.yaml"
        if self.trackers and exists(config):
            with local_copy(config) as path:
                for logger in self.trackers.values():
                    log_config(logger, path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        for logger in self.trackers.values():
            floor = logged_steps(logger)
            if floor is not None and floor >= trainer.global_step:  # the first step this fit logs is global_step
                logger.log_metrics = AfterStep(logger.log_metrics, floor)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = next((c for c in trainer.checkpoint_callbacks
                     if isinstance(c, ModelCheckpoint) and c.monitor and c.best_model_path), None)
        if not self.trackers or best is None:
            return
        with local_copy(best.best_model_path) as path:
            for logger in self.trackers.values():
                log_checkpoint(logger, path, best)


def exists(url: str) -> bool:
    fs, path = storage.filesystem(url)
    return fs.exists(path)


class local_copy:
    """A local path of `url`: itself, or a temporary download of an object (removed afterwards)."""

    def __init__(self, url: str) -> None:
        self.url, self.folder = url, None

    def __enter__(self) -> str:
        if not storage.is_url(self.url):
            return self.url
        self.folder = tempfile.TemporaryDirectory()
        path = str(Path(self.folder.name) / self.url.rsplit("/", 1)[-1])
        fs, remote = storage.filesystem(self.url)
        fs.get_file(remote, path)
        return path

    def __exit__(self, *args: Any) -> None:
        if self.folder is not None:
            self.folder.cleanup()


def log_config(logger: Logger, path: str) -> None:
    """MLflow: config/config.yaml, an artifact; W&B: the run config's "config" entry (its files dir has a
    config.yaml of its own)."""
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, path, "config")
    else:
        logger.experiment.config.update({"config": yaml.safe_load(Path(path).read_text())}, allow_val_change=True)


def log_checkpoint(logger: Logger, path: str, best: ModelCheckpoint) -> None:
    score = float(best.best_model_score) if best.best_model_score is not None else None
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, path, "checkpoints")
        logger.experiment.set_tag(logger.run_id, "best_checkpoint", f"checkpoints/{Path(path).name}")
        return
    import wandb

    artifact = wandb.Artifact(f"model-{logger.version}", type="model",
                              metadata={"monitor": best.monitor, "score": score, "file": Path(path).name})
    artifact.add_file(path)
    logger.experiment.log_artifact(artifact, aliases=["best", "latest"])
