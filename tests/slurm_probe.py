"""Test-only callback for jobs of tests/system/test_slurm_train.py, passed to the CLI by class_path.

Each rank writes <root>/probe/started-rank<R>-restart<N> after its first training step (the test
signals the job only then) and, at the end of training, rank<R>-restart<N>.json: where it ran and
a SHA-256 of its parameters, so the test can check that DDP kept the ranks' weights identical.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L


class RankProbe(L.Callback):
    def __init__(self) -> None:
        self.started = False

    def name(self, trainer: L.Trainer) -> str:
        return f"rank{trainer.global_rank}-restart{os.environ.get('SLURM_RESTART_COUNT', '0')}"

    def folder(self, trainer: L.Trainer) -> Path:
        folder = Path(trainer.default_root_dir) / "probe"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if not self.started:
            self.started = True
            (self.folder(trainer) / f"started-{self.name(trainer)}").write_text(str(trainer.global_step))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, parameter in sorted(pl_module.named_parameters()):
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
        report = {
            "global_rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
            "node": os.environ.get("SLURMD_NODENAME"), "procid": os.environ.get("SLURM_PROCID"),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "params_sha256": digest.hexdigest(),
        }
        path = self.folder(trainer) / f"{self.name(trainer)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        tmp.rename(path)
