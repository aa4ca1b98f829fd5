"""What survives which failure: kill -9 at any moment, a resume in the middle of an epoch, a non-finite loss,
a full disk, a restart of the best-k bookkeeping; and the same loss curve from the same seed on CPU."""

from __future__ import annotations

import errno
import io
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.crash import HOOKS, TinyNetwork, run_cli
from tests.helpers import IMAGE, scalars, tiny_data, tiny_module, tiny_trainer
from tests.test_data_helpers import shards
from xception_pl import callbacks
from xception_pl.callbacks import AtomicCheckpointIO, CheckpointWriteError
from xception_pl.data import WebDatasetDataModule, make_demo_data

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS = 6, 2  # 24 demo images in batches of 4


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(str(root), num_classes=3, images_per_class=8, val_images_per_class=4, image_size=32)
    return root


def fit_config(path: Path, run: Path, demo_root: Path, network: str = "tests.crash.TinyNetwork", **trainer) -> Path:
    """Two epochs of 6 steps on the demo data; last.ckpt every 2 steps, validation (and best-k) every 3."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": EPOCHS, "default_root_dir": str(run),
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "val_check_interval": 3, **trainer},
        "model": {"network": {"class_path": network}, "ema_decay": 0.5, "checkpoint_every_n_steps": 2,
                  "save_top_k": 2,
                  "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}},
                  "lr_scheduler": {"class_path": "xception_pl.schedules.SampleStepDecay",
                                   "init_args": {"decay_rate": 0.5, "decay_every_samples": 12}}},
        "data": {"class_path": "xception_pl.data.DemoDataModule",
                 "init_args": {"root": str(demo_root), "num_classes": 3, "train_images_per_class": 8,
                               "val_images_per_class": 4, "source_size": 32, "batch_size": 4, "num_workers": 0,
                               "image_size": IMAGE, "eval_resize": 80, "shuffle_buffer": 8}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def final_state(run: Path) -> tuple[int, list[float], int]:
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return checkpoint["global_step"], checkpoint["lr_schedulers"][0]["_last_lr"], checkpoint["epoch"]


def assert_every_checkpoint_loads(run: Path) -> None:
    for path in [*run.glob("checkpoints/*.ckpt"), *run.glob("hpc_ckpt_*.ckpt")]:
        checkpoint = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point()), path


@pytest.fixture(scope="module")
def uninterrupted(demo_root, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run = tmp / "run"
    assert run_cli(["fit", "--config", str(fit_config(tmp / "c.yaml", run, demo_root))], str(tmp / "log")) == 0, \
        (tmp / "log").read_text()[-3000:]
    return run


def kill_trial(trial: int, tmp_path: Path, demo_root: Path) -> tuple[str, int]:
    """Trial `trial`: SIGKILL at a seeded point of a seeded hook (the hooks take turns)."""
    rng = random.Random(trial)
    hook = HOOKS[trial % len(HOOKS)]
    at = rng.randint(1, {"train_step": STEPS_PER_EPOCH * EPOCHS, "validation": 12, "checkpoint_write": 9}[hook])
    run, log = tmp_path / "run", str(tmp_path / "log")
    config = str(fit_config(tmp_path / "c.yaml", run, demo_root))
    killer = ["--trainer.callbacks+=tests.crash.KillAt", "--trainer.callbacks.hook", hook,
              "--trainer.callbacks.at", str(at)]
    assert run_cli(["fit", "--config", config, *killer], log) == -signal.SIGKILL, Path(log).read_text()[-3000:]
    assert_every_checkpoint_loads(run)  # what a resume may meet: whole files only
    if hook == "checkpoint_write":
        assert list(run.glob("checkpoints/.*.ckpt.tmp-*")), "the kill did not land inside a checkpoint write"
    assert run_cli(["fit", "--config", config, "--ckpt_path", "last"], log) == 0, Path(log).read_text()[-3000:]
    before_first_checkpoint = (hook, at) in {("train_step", 1), ("train_step", 2), ("checkpoint_write", 1)}
    assert ("resuming from" in Path(log).read_text()) != before_first_checkpoint
    assert not list(run.glob("checkpoints/.*.tmp-*"))  # the half-written file of the killed run is gone
    return hook, at


@pytest.mark.parametrize("trial", range(5))
def test_kill_9_in_a_step_validation_or_checkpoint_write_then_resume_ends_like_an_uninterrupted_run(
        trial, tmp_path, demo_root, uninterrupted):
    kill_trial(trial, tmp_path, demo_root)
    assert final_state(tmp_path / "run") == final_state(uninterrupted) == (12, [0.01 * 0.5 ** 4] * 2, 1)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(5, 25))
def test_kill_9_in_more_seeded_trials(trial, tmp_path, demo_root, uninterrupted):
    kill_trial(trial, tmp_path, demo_root)
    assert final_state(tmp_path / "run") == final_state(uninterrupted)


class TinyClassifier(L.LightningModule):
    """The mid-epoch tests are about the data stream and Lightning's loops, not the network."""

    def __init__(self) -> None:
        super().__init__()
        self.network = TinyNetwork(3)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.network(batch["image"]), batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, int, int, tuple[str, ...]]] = []  # (epoch, batch_idx, global_step, keys)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch_idx, trainer.global_step, tuple(batch["key"])))


SHUFFLE_BUFFER = 8


def fit_batches(root: Path, data: Path, ckpt_path: Path | None = None, max_steps: int = -1, num_workers: int = 0):
    """Two epochs of 12 batches (48 samples), last.ckpt after every step; the batches it trained on."""
    dm = WebDatasetDataModule(train=str(data), batch_size=4, num_workers=num_workers, image_size=16,
                              shuffle_buffer=SHUFFLE_BUFFER, seed=1, multiprocessing_context="fork")
    recorder = BatchRecorder()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, max_steps=max_steps, default_root_dir=root, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        callbacks=[recorder, ModelCheckpoint(every_n_train_steps=1, save_last=True, save_top_k=0)])
    trainer.fit(TinyClassifier(), dm, ckpt_path=ckpt_path)
    return recorder.batches


@pytest.fixture(scope="module")
def epoch_data(tmp_path_factory) -> tuple[Path, list]:
    tmp = tmp_path_factory.mktemp("epochs")
    data = shards(tmp, classes=3, per_class=16, shard_size=3)
    return data, fit_batches(tmp / "uninterrupted", data)


def keys(batches) -> list[str]:
    return [key for batch in batches for key in batch[3]]


def test_a_run_resumed_mid_epoch_ends_the_epoch_on_time_without_replaying_it(tmp_path, epoch_data):
    data, full = epoch_data
    before = fit_batches(tmp_path / "run", data, max_steps=5)  # stopped after 5 of the epoch's 12 steps
    (tmp_path / "step5.ckpt").write_bytes((tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes())
    after = fit_batches(tmp_path / "run", data, ckpt_path=tmp_path / "step5.ckpt", num_workers=1)

    # (epoch, batch_idx, step) as uninterrupted: the epoch ends at step 12, not 12 + 5
    assert [b[:3] for b in before + after] == [b[:3] for b in full]
    rest = [b for b in after if b[0] == 0]
    # Lightning alone restarts the loader: the epoch's first batches would come again
    assert all(resumed[3] != first[3] for resumed, first in zip(rest, full))
    # what the rest of the epoch shares with its first part: chance (shards are drawn with replacement),
    # as for an uninterrupted run, give or take a shuffle buffer
    seen = set(keys(before))
    assert len(seen & set(keys(rest))) <= len(seen & set(keys(full[5:12]))) + SHUFFLE_BUFFER
    # later epochs are the uninterrupted run's, and a second resume from that checkpoint draws the same
    assert [b for b in after if b[0] == 1] == [b for b in full if b[0] == 1]
    assert fit_batches(tmp_path / "again", data, ckpt_path=tmp_path / "step5.ckpt", max_steps=8) == after[:3]


def test_a_run_resumed_from_the_end_of_an_epoch_trains_the_next_epoch_as_uninterrupted(tmp_path, epoch_data):
    data, full = epoch_data
    before = fit_batches(tmp_path / "run", data, max_steps=12)  # last.ckpt written after the epoch's last step
    after = fit_batches(tmp_path / "run", data, ckpt_path=tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert before + after == full  # before the fix, the resumed epoch 1 replayed epoch 0's stream
