"""Predictions as JSON lines with class names, and the inputs that could not be read.

    python -m xception_pl predict --config CONFIG --ckpt_path CKPT --data.init_args.predict photos/ \\
        --trainer.callbacks+=xception_pl.predictions.NamedPredictionWriter --trainer.callbacks.output preds.jsonl

One line per image: {"key": its file (or shard key), "classes": top-k ids, "names": their class
names, "probs": probabilities}; one line per unreadable file: {"key", "error"}; the count of those
is printed at the end.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import lightning as L
import torch

from xception_pl.callbacks import PredictionWriter


def checkpoint_class_names(path: str | None) -> list[str] | None:
    """The class names a checkpoint stores (its training manifest's), if any."""
    if path is None:
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return checkpoint.get("class_names") or checkpoint.get("hyper_parameters", {}).get("class_names")


class NamedPredictionWriter(PredictionWriter):
    """xception_pl.callbacks.PredictionWriter plus class names and a record of unreadable inputs."""

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the checkpoint is restored: its names first, else the data module's training manifest.
        names = checkpoint_class_names(trainer.ckpt_path)
        self.names = names or getattr(trainer.datamodule, "class_names", None)
        self.failed = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        failed = batch.get("failed", [])
        self.failed += len(failed)
        with open(self.output, "a") as f:
            for key, classes, probs in zip(prediction.get("key") or [None] * len(prediction["classes"]),
                                           prediction["classes"].tolist(), prediction["probs"].tolist()):
                record: dict[str, Any] = {"key": key, "classes": classes}
                if self.names is not None:
                    record["names"] = [self.names[c] for c in classes]
                f.write(json.dumps({**record, "probs": [round(p, 6) for p in probs]}) + "\n")
            for key, error in failed:
                f.write(json.dumps({"key": key, "error": error}) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.failed:
            print(f"{self.failed} inputs could not be read and have no prediction; their errors are in "
                  f"{self.output}", file=sys.stderr)
