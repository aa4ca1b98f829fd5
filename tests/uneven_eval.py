"""A Trainer built in Python, as a user writes one, over real shards: `fit` (sanity check on, validation after
the training steps), then `validate` and `test` of the last checkpoint; on N ranks (Lightning's own DDP
launcher, gloo) or, with --ckpt, only the evaluations on one process. Rank 0 writes each stage's metrics as
JSON to --out. tests/system/test_ddp.py runs it with fewer evaluation shards than ranks.

    python -m tests.uneven_eval --train DIR --val DIR --test DIR --devices 2 --root RUN --out metrics.json
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import lightning as L
import torch

from tests.crash import TinyNetwork
from xception_pl import trainer_parts
from xception_pl.data import WebDatasetDataModule
from xception_pl.ema import PolyakAveraging
from xception_pl.module import XceptionModule


def metrics(results: dict[str, torch.Tensor] | list[dict[str, float]]) -> dict[str, float]:
    if isinstance(results, list):
        results = results[0]
    return {k: float(v) for k, v in results.items() if k.startswith(("val/", "test/", "data/"))}


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("train", "val", "test", "root", "out"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--ckpt", help="evaluate this checkpoint only (no fit)")
    args = parser.parse_args()

    L.seed_everything(0)
    data = WebDatasetDataModule(train=args.train, val=args.val, test=args.test, batch_size=2, num_workers=1,
                                image_size=32, eval_resize=36)
    module = XceptionModule(num_classes=data.num_classes, train_size=data.train_size, batch_size=2,
                            network=TinyNetwork,
                            optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, fused=True))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_epochs=1, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        **trainer_parts(args.root, ema=PolyakAveraging(0.5), progress_bar=False))
    out: dict[str, dict[str, float]] = {}
    ckpt = args.ckpt
    if ckpt is None:
        trainer.fit(module, data)  # sanity check (2 batches), one epoch, validation at its end
        out["fit"] = metrics(trainer.callback_metrics)
        ckpt = str(Path(args.root) / "checkpoints" / "last.ckpt")
    out["validate"] = metrics(trainer.validate(module, data, ckpt_path=ckpt, verbose=False))
    out["test"] = metrics(trainer.test(module, data, ckpt_path=ckpt, verbose=False))
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
