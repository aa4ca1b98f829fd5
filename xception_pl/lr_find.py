"""`python -m xception_pl lr_find --config FILE`: the learning-rate range test (Smith, WACV 2017) on a run's config.

Lightning's `Tuner.lr_find` raises the lr from --min_lr to --max_lr over --num_training optimizer steps of the
config's own network, optimizer (its momentum, weight decay and parameter groups), data and precision, and
suggests the lr where the loss falls fastest. It writes the curve as a PNG (--output) and prints the suggestion
as one line; the run directory is not touched (the sweep's scratch checkpoint goes to a temporary directory, and
no logger or checkpoint callback is attached).

One device sweeps the run's global batch: the per-device batch, accumulated over the run's devices x nodes x
accumulate_grad_batches, so the suggestion is for the batch the run trains with. The sweep replaces the config's
schedule by its own for its steps (which the module lets it do: module.apply_configured_optimizer only sets the
lrs of a schedule of ours, the trap of Lightning issue #16787), and a diverged step is skipped, not fatal.

Any other argument is the config's, as for fit: `--config configs/imagenet.yaml --data.init_args.batch_size 64`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.tuner import Tuner

from xception_pl.checkpointing import atomic_path


def arguments(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m xception_pl lr_find", allow_abbrev=False,
                                     description="The lr range test on a run's config; other arguments are the "
                                                 "config's (--config FILE, --data.init_args.batch_size 64, ...).")
    parser.add_argument("--min_lr", type=float, default=1e-6, help="the first lr of the sweep")
    parser.add_argument("--max_lr", type=float, default=10.0, help="the last lr of the sweep")
    parser.add_argument("--num_training", type=int, default=100, help="optimizer steps of the sweep")
    parser.add_argument("--mode", choices=("exponential", "linear"), default="exponential", help="lr spacing")
    parser.add_argument("--output", default="lr_find.png", help="the curve's PNG")
    return parser.parse_known_args(args)


def main(args: list[str]) -> None:
    options, config = arguments(args)
    if not 0 < options.min_lr < options.max_lr or options.num_training < 3:
        raise SystemExit("error: lr_find needs 0 < --min_lr < --max_lr and --num_training >= 3")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
    except ImportError:
        raise SystemExit("error: lr_find's curve needs matplotlib: pip install 'xception_pl[report]'") from None
    from xception_pl.cli import XceptionCLI

    cli = XceptionCLI(args=config, run=False)  # built as `fit` would build it; nothing runs, nothing is written
    run = cli.trainer
    steps_of = run.world_size * run.accumulate_grad_batches  # micro-batches of one of the run's steps
    init = cli.config_init["trainer"]
    same = {key: init[key] for key in ("accelerator", "precision", "benchmark", "deterministic", "gradient_clip_val",
                                       "gradient_clip_algorithm") if init.get(key) is not None}
    cli.model.hparams.nonfinite_loss = "skip"  # the sweep's last lrs may diverge: the curve shows it
    with tempfile.TemporaryDirectory(prefix="xception_pl-lr_find-") as scratch:
        trainer = L.Trainer(**same, devices=1, num_nodes=1, accumulate_grad_batches=steps_of, default_root_dir=scratch,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[])
        finder = Tuner(trainer).lr_find(cli.model, datamodule=cli.datamodule, min_lr=options.min_lr,
                                        max_lr=options.max_lr, num_training=options.num_training, mode=options.mode,
                                        update_attr=False)
    suggestion = finder.suggestion()
    figure = finder.plot(suggest=suggestion is not None)
    figure.axes[0].set_title(f"lr range test: global batch {cli.model.global_batch_size}")
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    steps = len(finder.results["lr"])
    lr = "none (too few finite losses: raise --num_training or --max_lr)" if suggestion is None else f"{suggestion:.3g}"
    print(f"lr_find: suggested lr {lr} for model.optimizer.init_args.lr at the global batch of "
          f"{cli.model.global_batch_size} ({steps} steps from {options.min_lr:g} to {options.max_lr:g}; "
          f"the curve: {output})", flush=True)
