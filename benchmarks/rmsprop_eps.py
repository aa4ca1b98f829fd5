"""configs/jft.yaml's RMSprop epsilon, measured: MAP@100 against training samples on a generated multi-label set.

TensorFlow's RMSprop puts eps inside the square root: update = lr * g / sqrt(E[g^2] + eps). With eps 1.0
(Inception V3's, which came with lr 0.045) and E[g^2] << 1 that is momentum SGD at lr (the JFT config's
0.001); with eps 1e-7 it is RMSprop proper. The paper gives no epsilon for Xception on JFT (sec. 4.2).

Each variant is the JFT recipe (configs/jft.yaml, through the CLI) on the multi-label demo data, on the
CPU, fp32, Polyak averaging off (the raw weights' progress), validated every --every steps. Prints a
Markdown table last and writes every curve as JSON (--out).

    PYTHONPATH=. python benchmarks/rmsprop_eps.py --steps 240 --every 40 --out rmsprop_eps.json
"""

from __future__ import annotations

import argparse  # a benchmark script, not part of the CLI
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from tests.helpers import scalars
from xception_pl.cli import main

VARIANTS = {  # (lr, eps): the config's; RMSprop proper at the same lr; the config's eps at a 10x lr
    "eps 1.0, lr 0.001 (config)": ("0.001", "1.0"),
    "eps 1e-7, lr 0.001": ("0.001", "1e-7"),
    "eps 1.0, lr 0.01": ("0.01", "1.0"),
}


def run(lr: str, eps: str, args: argparse.Namespace, root: Path) -> list[tuple[int, float]]:
    main(["fit", "--config", "configs/jft.yaml", "--seed_everything", "0",
          "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
          "--trainer.precision", "32-true", "--trainer.benchmark", "false", "--trainer.max_steps", str(args.steps),
          "--trainer.val_check_interval", str(args.every), "--trainer.log_every_n_steps", str(args.every),
          "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
          "--trainer.default_root_dir", str(root), "--images.enabled", "false",
          "--ema.decay", "null", "--model.channels_last", "false", "--last_checkpoint.every_n_train_steps", "null",
          "--model.optimizer.init_args.lr", lr, "--model.optimizer.init_args.eps", eps,
          "--data", "xception_pl.data.DemoDataModule", "--data.init_args.root", args.data,
          "--data.init_args.multilabel", "true", "--data.init_args.num_classes", str(args.classes),
          "--data.init_args.train_images_per_class", str(args.per_class),
          "--data.init_args.val_images_per_class", str(args.per_class // 4),
          "--data.init_args.source_size", "80", "--data.init_args.image_size", "71",
          "--data.init_args.eval_resize", "75", "--data.init_args.batch_size", str(args.batch),
          "--data.init_args.num_workers", "1"])
    return [(step + 1, value) for step, value in scalars(root)["val/map100"]]  # filed under step - 1


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--every", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=60, help="training images per class (a quarter for val)")
    parser.add_argument("--data", default="~/.cache/xception_pl/demo")
    parser.add_argument("--out", default="rmsprop_eps.json")
    args = parser.parse_args()
    curves, seconds = {}, {}
    for name, (lr, eps) in VARIANTS.items():
        with tempfile.TemporaryDirectory() as root:
            started = time.perf_counter()
            curves[name] = run(lr, eps, args, Path(root))
            seconds[name] = time.perf_counter() - started
    report = {"date": time.strftime("%Y-%m-%d"), "device": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args),
              "curves": curves, "seconds": seconds}
    Path(args.out).write_text(json.dumps(report, indent=1))
    steps = [step for step, _ in next(iter(curves.values()))]
    print(f"\nval/map100 ({args.classes} classes, 1-3 labels per image, {args.per_class // 4 * args.classes} val "
          f"images) by training samples (batch {args.batch}):\n")
    print("| variant | " + " | ".join(f"{s * args.batch:,}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name, curve in curves.items():
        print(f"| {name} | " + " | ".join(f"{value:.3f}" for _, value in curve) + " |")


if __name__ == "__main__":
    main_()
