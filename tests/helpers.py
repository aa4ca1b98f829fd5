"""Small builders shared by the training tests: tiny synthetic data, a tiny fast trainer, a run config file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.plugins import MixedPrecision

from xception_pl.data.synthetic import SyntheticDataModule
from xception_pl.ema import PolyakAveraging
from xception_pl.images import ImageGrids
from xception_pl.module import XceptionModule
from xception_pl.schedules import SampleStepDecay
from xception_pl.wiring import trainer_parts

ROOT = Path(__file__).resolve().parents[1]  # the repository: configs/, slurm/
IMAGE = 71  # Xception's smallest input keeps CPU steps fast


def tiny_data(**kwargs: Any) -> SyntheticDataModule:
    return SyntheticDataModule(**{"num_classes": 6, "train_size": 16, "val_size": 8, "batch_size": 4,
                                  "image_size": IMAGE, **kwargs})


def tiny_module(data: SyntheticDataModule, cls: type[XceptionModule] = XceptionModule, **kwargs: Any) -> XceptionModule:
    defaults = dict(
        num_classes=data.num_classes, multilabel=data.multilabel, train_size=data.train_size,
        batch_size=data.batch_size,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
        lr_scheduler=lambda opt, samples: SampleStepDecay(opt, samples, decay_rate=0.5, decay_every_samples=8),
    )
    return cls(**{**defaults, **kwargs})


def tiny_trainer(root: Path, *, ema: float | None = 0.5, parts: dict[str, Any] | None = None,
                 **kwargs: Any) -> L.Trainer:
    """A quiet one-epoch CPU trainer with the run's parts (trainer_parts: `ema` the Polyak decay, `parts` the
    other configured parts, image grids off); `callbacks`, `logger` and `plugins` go through trainer_parts."""
    given = {key: kwargs.pop(key) for key in ("callbacks", "logger", "plugins") if key in kwargs}
    progress_bar = kwargs.setdefault("enable_progress_bar", False)
    run = trainer_parts(root, **given, progress_bar=progress_bar, **{"ema": PolyakAveraging(ema),
                        "images": ImageGrids(enabled=False), **(parts or {})})
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, log_every_n_steps=1,
                    enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **run, **kwargs})


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


def run_module(*args: str, cwd: Path = ROOT, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """`python -m xception_pl <args>`; `env` sets (or, with None, removes) environment variables."""
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "xception_pl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in environment.items() if v is not None})



def synthetic_data(**init_args: Any) -> dict[str, Any]:
    """The `data:` section of tiny_data(): 6 classes, 16 training and 8 validation images in batches of 4."""
    return {"class_path": "xception_pl.data.synthetic.SyntheticDataModule",
            "init_args": {"num_classes": 6, "train_size": 16, "val_size": 8, "batch_size": 4, "image_size": IMAGE,
                          **init_args}}


def run_config(path: Path, run_dir: Path, *, data: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
               trainer: dict[str, Any] | None = None, **top: Any) -> Path:
    """Write a `fit --config` YAML to `path`: one quiet CPU epoch into run_dir on synthetic_data() with SGD and a
    sample-step decay, as tiny_trainer and tiny_module build in-process. `trainer` and `model` keys override
    single keys; `data` replaces the whole section; `top` adds or replaces top-level sections (seed_everything,
    ema, checkpoint, last_checkpoint)."""
    config = {
        "ema": {"decay": 0.5},
        **top,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "default_root_dir": str(run_dir),
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    **(trainer or {})},
        "data": data or synthetic_data(),
        "model": {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}},
                  "lr_scheduler": {"class_path": "xception_pl.schedules.SampleStepDecay",
                                   "init_args": {"decay_rate": 0.5, "decay_every_samples": 12}},
                  **(model or {})},
    }
    path.write_text(yaml.safe_dump(config))
    return path


# Shared by test_training_correctness and test_nonfinite: a fused SGD, fp16 on CPU, a recorder of each batch.
fused_sgd = {"optimizer": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=True)}


def fp16_on_cpu() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))


class Recorder(L.Callback):
    """Loss per batch; weights, BN statistics and the Polyak copy before and after each batch; an inf pixel
    in the batches listed in `poison`."""

    def __init__(self, poison: set[int] = frozenset()) -> None:
        self.poison, self.losses, self.states = poison, [], {}

    def snapshot(self, trainer, pl_module) -> dict[str, dict[str, torch.Tensor]]:
        ema = trainer.callbacks and next((c for c in trainer.callbacks if hasattr(c, "_average_model")), None)
        tensors = {"network": {k: v.clone() for k, v in pl_module.network.state_dict().items()}}
        if ema is not None and ema._average_model is not None:
            tensors["ema"] = {k: v.clone() for k, v in ema._average_model.module.network.state_dict().items()}
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        return {**tensors, "lr": lr}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states[f"before {batch_idx}"] = self.snapshot(trainer, pl_module)
        if batch_idx in self.poison:
            batch["image"][0, 0, 0, 0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states[f"after {batch_idx}"] = self.snapshot(trainer, pl_module)
        self.losses.append(float(outputs["loss"]))


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]

