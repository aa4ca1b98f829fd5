"""What a run prints: a line per logging step in a log file, validation totals, no host reads from the bar."""

import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import run_config, tiny_data, tiny_module, tiny_trainer
from tests.data_helpers import shards
from xception_pl.data import WebDatasetDataModule
from xception_pl.progress import ProgressBar

ROOT = Path(__file__).resolve().parents[2]


def test_log_file_gets_one_line_per_logging_step_and_per_validation(tmp_path):
    run = tmp_path / "run"
    config = run_config(tmp_path / "c.yaml", run,  # 4 steps an epoch
                        trainer=dict(enable_progress_bar=True, log_every_n_steps=2, max_epochs=2))
    with open(tmp_path / "stdout.txt", "w") as stdout:  # as in a SLURM output file: not a terminal
        result = subprocess.run([sys.executable, "-m", "xception_pl", "fit", "--config", str(config)], cwd=ROOT,
                                stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "stdout.txt").read_text().splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 2/8", "step 4/8", "step 6/8", "step 8/8"]
    assert re.fullmatch(r"step 6/8 \| epoch 2/2 \| 24 samples \| loss [\d.]+ \| lr 0\.005 \| [\d.,]+ img/s \| "
                        r"\d+:\d\d:\d\d left", steps[2]), steps[2]
    assert len([line for line in lines if line.startswith("validation at step ")]) == 2
    assert "\r" not in (tmp_path / "stdout.txt").read_text()  # no bar redraws
    assert "Tip:" not in result.stderr  # Lightning's advertising
    assert "LeafSpec" not in result.stderr
    # before the first step: what the run is about to do
    assert lines[0] == f"config: {config}"
    assert lines[1] == "data: SyntheticDataModule, 6 classes (single-label); train 16 images; val 8 images"
    assert lines[2].startswith("global batch: 4 per device x 1 devices x 1 nodes x 1 accumulation = 4; 4 steps per "
                               "epoch, 8 steps in all")
    assert lines[3] == f"run directory: {run}"
    # after fit: where everything went
    assert lines[-4].startswith("done: 8 steps (2 epochs) in ")
    assert re.fullmatch(rf"best checkpoint \(val/acc1 [\d.]+\): {run}/checkpoints/epoch=\d-step=\d-acc1=[\d.]+\.ckpt",
                        lines[-3]), lines[-3]
    assert lines[-2] == f"last checkpoint: {run}/checkpoints/last.ckpt"
    assert lines[-1] == f"watch it: tensorboard --logdir {run}/"


class ScalarReads(TorchDispatchMode):
    """Counts device-to-host reads of a tensor's value (.item(), float(), bool())."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def counting(bar_class: type) -> TQDMProgressBar:
    class Counting(bar_class):
        reads: list[tuple[bool, int]] = []  # (Lightning logs this step, reads in the bar's hook)

        def on_train_batch_end(self, trainer, *args):
            with ScalarReads() as reads:
                super().on_train_batch_end(trainer, *args)
            self.reads.append((trainer._logger_connector.should_update_logs, reads.count))

    return Counting(**({"log_file": False} if bar_class is ProgressBar else {}))


@pytest.mark.parametrize("bar_class", [ProgressBar, TQDMProgressBar])
def test_progress_bar_reads_metrics_only_on_logging_steps(tmp_path, bar_class):
    data = tiny_data(train_size=24)  # 6 steps, logged at steps 3 and 6
    bar = counting(bar_class)

    class ShowsLoss(L.Callback):  # a value on the bar, as users log them (prog_bar=True, every step)
        def on_train_batch_end(self, trainer, pl_module, outputs, *args):
            pl_module.log("shown", outputs["loss"], prog_bar=True)

    tiny_trainer(tmp_path, enable_progress_bar=True, callbacks=[ShowsLoss(), bar], log_every_n_steps=3,
                 limit_val_batches=0).fit(tiny_module(data), datamodule=data)
    assert [logs for logs, _ in bar.reads] == [False, False, True] * 2
    quiet_steps = [count for logs, count in bar.reads if not logs]
    logging_steps = [count for logs, count in bar.reads if logs]
    assert all(logging_steps)  # the counter sees the reads the bar makes
    if bar_class is ProgressBar:
        assert quiet_steps == [0, 0, 0, 0]
    else:  # Lightning's own bar reads its metrics on every step (a training value logged with prog_bar)
        assert all(quiet_steps)


@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (1, 2), (2, 1), (2, 2)])
def test_validation_total_is_the_number_of_batches_each_rank_reads(tmp_path, world_size, num_workers):
    val = shards(tmp_path, "val", classes=3, per_class=5, shard_size=2)  # 8 shards: 7 of 2 samples, 1 of 1
    data = WebDatasetDataModule(val=str(val), batch_size=3, num_workers=num_workers, image_size=32,
                                eval_resize=36, persistent_workers=False)
    for rank in range(world_size):
        data.rank, data.world_size = rank, world_size
        read = sum(1 for batch in data.val_dataloader() if batch["key"])
        assert data.eval_batches("val", rank, world_size) == read
