"""Small builders shared by the training tests: tiny synthetic data, a tiny fast trainer, a run config file."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from xception_pl.checkpointing import AtomicCheckpointIO
from xception_pl.data.synthetic import SyntheticDataModule
from xception_pl.module import XceptionModule
from xception_pl.schedules import SampleStepDecay

IMAGE = 71  # Xception's smallest input keeps CPU steps fast


def tiny_data(**kwargs: Any) -> SyntheticDataModule:
    return SyntheticDataModule(**{"num_classes": 6, "train_size": 16, "val_size": 8, "batch_size": 4,
                                  "image_size": IMAGE, **kwargs})


def tiny_module(data: SyntheticDataModule, **kwargs: Any) -> XceptionModule:
    defaults = dict(
        num_classes=data.num_classes, multilabel=data.multilabel, train_size=data.train_size,
        batch_size=data.batch_size, ema_decay=0.5,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
        lr_scheduler=lambda opt, samples: SampleStepDecay(opt, samples, decay_rate=0.5, decay_every_samples=8),
    )
    return XceptionModule(**{**defaults, **kwargs})


def tiny_trainer(root: Path, **kwargs: Any) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=root, log_every_n_steps=1,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    plugins=[AtomicCheckpointIO()],
                    logger=L.pytorch.loggers.TensorBoardLogger(root, name="", version=""))
    return L.Trainer(**{**defaults, **kwargs})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's TensorBoard event files, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def synthetic_data(**init_args: Any) -> dict[str, Any]:
    """The `data:` section of tiny_data(): 6 classes, 16 training and 8 validation images in batches of 4."""
    return {"class_path": "xception_pl.data.synthetic.SyntheticDataModule",
            "init_args": {"num_classes": 6, "train_size": 16, "val_size": 8, "batch_size": 4, "image_size": IMAGE,
                          **init_args}}


def run_config(path: Path, run_dir: Path, *, data: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
               trainer: dict[str, Any] | None = None, **top: Any) -> Path:
    """Write a `fit --config` YAML to `path`: one quiet CPU epoch into run_dir on synthetic_data() with SGD and a
    sample-step decay, as tiny_trainer and tiny_module build in-process. `trainer` and `model` keys override
    single keys; `data` replaces the whole section; `top` adds top-level keys (seed_everything)."""
    config = {
        **top,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "default_root_dir": str(run_dir),
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    **(trainer or {})},
        "data": data or synthetic_data(),
        "model": {"ema_decay": 0.5,
                  "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}},
                  "lr_scheduler": {"class_path": "xception_pl.schedules.SampleStepDecay",
                                   "init_args": {"decay_rate": 0.5, "decay_every_samples": 12}},
                  **(model or {})},
    }
    path.write_text(yaml.safe_dump(config))
    return path
