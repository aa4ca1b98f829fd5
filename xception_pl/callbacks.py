"""Callbacks and the checkpoint writer the CLI adds to every run."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ThroughputMonitor
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, fsyncs it, then renames it.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in
    the system temp dir, so the final move may be a copy that a kill leaves half-written;
    a rename within one directory is atomic, so a reader sees the old file or the new one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the atomic unit there
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)


class ImagesPerSecond(ThroughputMonitor):
    """Lightning's throughput monitor counting images: logs train/device/samples_per_sec (per device)
    and train/samples_per_sec (all devices)."""

    def __init__(self, window_size: int = 10) -> None:
        warnings.filterwarnings("ignore", message=".*flops_per_batch.*")  # images/s is what we report
        super().__init__(batch_size_fn=lambda batch: len(batch["image"]), window_size=window_size, separator="/")


class PredictionWriter(BasePredictionWriter):
    """Writes predict_step outputs as JSON lines: {"key", "classes", "probs"} per image, one file per rank."""

    def __init__(self, output: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict":
            if trainer.world_size > 1:
                self.output = self.output.with_name(f"{self.output.stem}-rank{trainer.global_rank}{self.output.suffix}")
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        keys = prediction.get("key") or [None] * len(prediction["classes"])
        with open(self.output, "a") as f:
            for key, classes, probs in zip(keys, prediction["classes"].tolist(), prediction["probs"].tolist()):
                f.write(json.dumps({"key": key, "classes": classes, "probs": [round(p, 6) for p in probs]}) + "\n")
