"""What survives which failure: kill -9 at any moment, a resume in the middle of an epoch, a full disk, a restart
of the best-k bookkeeping; and the same loss curve from the same seed on CPU. (A non-finite loss:
tests/component/test_nonfinite.py.)"""

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
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.crash import HOOKS, TinyNetwork, run_cli
from tests.helpers import IMAGE, run_config, scalars, tiny_data, tiny_module, tiny_trainer
from tests.data_helpers import shards
from xception_pl import checkpointing
from xception_pl.checkpointing import AtomicCheckpointIO, BestCheckpoints, newest_checkpoint
from xception_pl.cli import main
from xception_pl.data import WebDatasetDataModule, make_demo_data
from xception_pl.module import XceptionModule

ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH, EPOCHS = 6, 2  # 24 demo images in batches of 4


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(str(root), num_classes=3, train_images_per_class=8, val_images_per_class=4, source_size=32)
    return root


def fit_config(path: Path, run: Path, demo_root: Path, network: str = "tests.crash.TinyNetwork",
               checkpoint_every_n_steps: int | None = 2, workers: int = 0, **trainer) -> Path:
    """Two epochs of 6 steps on the demo data; last.ckpt every 2 steps, validation (and best-k) every 3. With
    TinyNetwork, every kind of randomness a run has: crops, Mixup, dropout, and the Polyak average. 0 data
    workers and 1 draw the same stream."""
    tiny = network == "tests.crash.TinyNetwork"
    return run_config(
        path, run, seed_everything=0,
        trainer={"max_epochs": EPOCHS, "num_sanity_val_steps": 0, "val_check_interval": 3, **trainer},
        model={"network": {"class_path": network, **({"init_args": {"dropout": 0.2}} if tiny else {})}},
        checkpoint={"save_top_k": 2}, last_checkpoint={"every_n_train_steps": checkpoint_every_n_steps},
        data={"class_path": "xception_pl.data.DemoDataModule",
              "init_args": {"root": str(demo_root), "num_classes": 3, "train_images_per_class": 8,
                            "val_images_per_class": 4, "source_size": 32, "batch_size": 4, "num_workers": workers,
                            "image_size": IMAGE, "eval_resize": 80, "shuffle_buffer": 8,
                            "mixing": [{"class_path": "xception_pl.data.mixing.Mixup"}] if tiny else []}})


def final_state(run: Path) -> tuple[int, list[float]]:
    """Global step and lr of the run's newest checkpoint. (Not its epoch field: a run killed after its final
    checkpoint and resumed saves once more, at the end of fit, where Lightning counts the epoch as done.)"""
    checkpoint = torch.load(newest_checkpoint(run), weights_only=True)
    return checkpoint["global_step"], checkpoint["lr_schedulers"][0]["_last_lr"]


def training_state(run: Path) -> dict:
    """What training made, from the run's newest checkpoint: weights and BatchNorm statistics, the optimizer's
    state, the Polyak average, the step and the lr."""
    checkpoint = torch.load(newest_checkpoint(run), weights_only=True)
    average = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("PolyakAveraging"))
    return {"weights": checkpoint["state_dict"], "optimizer": checkpoint["optimizer_states"][0]["state"],
            "average": average, "step": checkpoint["global_step"], "lr": checkpoint["lr_schedulers"][0]["_last_lr"]}


def assert_bit_identical(got, expected, where: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype and torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_bit_identical(got[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_bit_identical(a, b, f"{where}/{i}")
    else:
        assert got == expected, where


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


def kill_trial(trial: int, tmp_path: Path, demo_root: Path) -> int:
    """Trial `trial`: 1 to 3 interruptions, each at a seeded point of a seeded hook (SIGKILL in a step, in
    validation or inside a checkpoint write; SIGTERM in a step), each run resumed with `--ckpt_path last`;
    then a resume to the end. Returns the number of interruptions that landed."""
    rng = random.Random(trial)
    run, log = tmp_path / "run", str(tmp_path / "log")
    # A data worker in every other trial: the stream, and the randomness of the step, are the same without
    config = str(fit_config(tmp_path / "c.yaml", run, demo_root, workers=1 - trial % 2))
    landed = 0
    for interruption in range(1 + trial % 3):
        hook = HOOKS[(trial + interruption) % len(HOOKS)]
        at = rng.randint(1, {"train_step": 8, "validation": 8, "checkpoint_write": 5, "sigterm": 8}[hook])
        killer = ["--trainer.callbacks+=tests.crash.KillAt", "--trainer.callbacks.hook", hook,
                  "--trainer.callbacks.at", str(at)]
        resume = ["--ckpt_path", "last"] if interruption else []
        code = run_cli(["fit", "--config", config, *resume, *killer], log)
        if code == 0:  # the point lay beyond this run's end
            return landed
        assert code == (128 + signal.SIGTERM if hook == "sigterm" else -signal.SIGKILL), Path(log).read_text()[-3000:]
        landed += 1
        assert_every_checkpoint_loads(run)  # what a resume may meet: whole files only
        if hook == "checkpoint_write":
            assert list(run.glob("checkpoints/.*.ckpt.tmp-*")), "the kill did not land inside a checkpoint write"
    assert run_cli(["fit", "--config", config, "--ckpt_path", "last"], log) == 0, Path(log).read_text()[-3000:]
    assert not list(run.glob("checkpoints/.*.tmp-*"))  # the half-written files of the killed runs are gone
    return landed


@pytest.mark.parametrize("trial", range(5))
def test_a_run_interrupted_and_resumed_ends_bit_identical_to_an_uninterrupted_one(
        trial, tmp_path, demo_root, uninterrupted):
    """Weights, BatchNorm statistics, optimizer state, Polyak average, step and lr, compared bit for bit (100
    trials with --runslow)."""
    assert kill_trial(trial, tmp_path, demo_root) >= 1
    assert_bit_identical(training_state(tmp_path / "run"), training_state(uninterrupted))
    assert final_state(uninterrupted) == (12, [0.01 * 0.5 ** 4] * 2)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(5, 105))
def test_a_hundred_interrupted_runs_end_bit_identical_to_an_uninterrupted_one(trial, tmp_path, demo_root,
                                                                             uninterrupted):
    test_a_run_interrupted_and_resumed_ends_bit_identical_to_an_uninterrupted_one(trial, tmp_path, demo_root,
                                                                                  uninterrupted)


def start_fit(config: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "xception_pl", "fit", "--config", str(config), *args],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def wait_for(path: Path, process: subprocess.Popen) -> None:
    while not path.exists() and process.poll() is None:
        time.sleep(0.05)


def xception_config(path: Path, run: Path, demo_root: Path) -> Path:
    """Checkpoints (250 MB each) after each validation only, every 3 steps: a trial takes 1-2 minutes."""
    return fit_config(path, run, demo_root, network="xception_pl.Xception", checkpoint_every_n_steps=None)


@pytest.fixture(scope="module")
def xception_uninterrupted(demo_root, tmp_path_factory) -> tuple[Path, float]:
    """A real `python -m xception_pl fit` of Xception, and its seconds from writing config.yaml to its end."""
    tmp = tmp_path_factory.mktemp("xception")
    run = tmp / "run"
    process = start_fit(xception_config(tmp / "c.yaml", run, demo_root), tmp / "log")
    wait_for(run / "config.yaml", process)
    start = time.monotonic()
    assert process.wait(timeout=900) == 0, (tmp / "log").read_text()[-3000:]
    return run, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_kill_9_at_a_random_moment_of_a_real_xception_run_then_resume(
        trial, tmp_path, demo_root, xception_uninterrupted):
    """SIGKILL from outside at a seeded moment of training: in a step, data loading, validation, a 250 MB
    checkpoint write, a TensorBoard write; `fit --ckpt_path last` then ends as the uninterrupted run."""
    reference, duration = xception_uninterrupted
    run, log = tmp_path / "run", tmp_path / "log"
    config = xception_config(tmp_path / "c.yaml", run, demo_root)
    process = start_fit(config, log)
    wait_for(run / "config.yaml", process)
    time.sleep(random.Random(trial).uniform(0, duration))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert_every_checkpoint_loads(run)
    assert start_fit(config, log, "--ckpt_path", "last").wait(timeout=900) == 0, log.read_text()[-3000:]
    assert final_state(run) == final_state(reference)
    assert not list(run.glob("checkpoints/.*.tmp-*"))


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
                              shuffle_buffer=SHUFFLE_BUFFER, seed=1, multiprocessing_context="fork",
                              persistent_workers=False)  # persistent ones, collected in a later test, cost 5 s each
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


@pytest.fixture(scope="module")
def two_worker_run(epoch_data, tmp_path_factory) -> list:
    return fit_batches(tmp_path_factory.mktemp("two-workers"), epoch_data[0], num_workers=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_resumed_mid_epoch_trains_exactly_the_batches_of_an_uninterrupted_run(
        tmp_path, epoch_data, two_worker_run, workers):
    data, full = epoch_data[0], (two_worker_run if workers else epoch_data[1])
    before = fit_batches(tmp_path / "run", data, max_steps=5, num_workers=workers)  # 5 of the epoch's 12 steps
    (tmp_path / "step5.ckpt").write_bytes((tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes())
    # 0 workers and 1 are the same stream (one slot); with 2, the resumed pass starts at worker 1's slot
    after = fit_batches(tmp_path / "run", data, ckpt_path=tmp_path / "step5.ckpt", num_workers=workers or 1)
    # (epoch, batch_idx, step, keys) as uninterrupted: the epoch ends at step 12, not 12 + 5, with the same samples
    assert before + after == full
    assert [b[3] for b in after[:7]] != [b[3] for b in full[:7]]  # Lightning alone would restart the epoch


def test_a_mid_epoch_resume_with_other_workers_ends_the_epoch_on_time_with_a_fresh_draw(
        tmp_path, epoch_data, two_worker_run):
    data, full = epoch_data[0], two_worker_run
    fit_batches(tmp_path / "run", data, max_steps=5, num_workers=2)
    after = fit_batches(tmp_path / "run", data, ckpt_path=tmp_path / "run" / "checkpoints" / "last.ckpt",
                        num_workers=1)
    assert [b[:3] for b in after] == [b[:3] for b in full[5:]]
    assert [b[3] for b in after if b[0] == 0] != [b[3] for b in full[5:12]]  # not exact: another slot count
    one_slot = epoch_data[1]  # the next epoch is exact again: a one-worker run's
    assert [b for b in after if b[0] == 1] == [b for b in one_slot if b[0] == 1]


def test_a_run_resumed_from_the_end_of_an_epoch_trains_the_next_epoch_as_uninterrupted(tmp_path, epoch_data):
    data, full = epoch_data
    before = fit_batches(tmp_path / "run", data, max_steps=12)  # last.ckpt written after the epoch's last step
    after = fit_batches(tmp_path / "run", data, ckpt_path=tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert before + after == full  # before the fix, the resumed epoch 1 replayed epoch 0's stream


def test_same_seed_and_config_give_the_same_loss_curve_to_the_last_digit(tmp_path, demo_root):
    curves = []
    for name in ("first", "second"):
        config = fit_config(tmp_path / f"{name}.yaml", tmp_path / name, demo_root, network="xception_pl.Xception",
                            max_steps=3)  # (data workers draw the same streams: tests/component/test_data_pipeline.py)
        main(["fit", "--config", str(config), "--last_checkpoint.every_n_train_steps", "null", "--checkpoint.save_top_k", "0"])
        logged = scalars(tmp_path / name)
        curves.append({tag: logged[tag] for tag in ("train/loss", "train/lr", "val/loss", "val/acc1")})
    assert len({loss for _, loss in curves[0]["train/loss"]}) == 3
    assert curves[0] == curves[1]  # float32 values as TensorBoard stores them, compared exactly


def failing_open(fail_at: int, error: int, when: str):
    """`open` for xception_pl.checkpointing whose `fail_at`-th checkpoint file fails with `error`, when opened or
    after its first 100 bytes are written, as a full disk or a write-protected directory does."""
    calls = []

    class Failing(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 100:
                raise OSError(error, f"injected {errno.errorcode[error]}")
            return super().write(data)

    def fake_open(path, mode="r", *args, **kwargs):
        calls.append(path)
        if len(calls) != fail_at:
            return open(path, mode, *args, **kwargs)
        if when == "open":
            raise OSError(error, f"injected {errno.errorcode[error]}", str(path))
        return io.BufferedWriter(Failing(path, "w"))

    return fake_open


@pytest.mark.parametrize("error, when, fix", [
    (errno.ENOSPC, "write", "free space on the file system"),
    (errno.EDQUOT, "write", "raise the quota"),
    (errno.EACCES, "open", "writable by this user"),
    (errno.EROFS, "open", "not read-only"),
])
def test_a_failed_checkpoint_write_stops_training_keeps_the_previous_file_and_names_the_fix(
        tmp_path, demo_root, monkeypatch, error, when, fix):
    run = tmp_path / "run"
    # writes: last.ckpt at step 2, then the best-k file after the validation at step 3 fails
    monkeypatch.setattr(checkpointing, "open", failing_open(2, error, when), raising=False)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(fit_config(tmp_path / "c.yaml", run, demo_root))])
    message = str(stop.value)
    assert message.startswith("error: could not write checkpoint") and fix in message and "--ckpt_path last" in message
    assert str(run / "checkpoints" / "epoch=0-step=3-acc1=") in message  # the file it was writing
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no half file left
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert max(step for step, _ in scalars(run)["train/loss"]) == 2  # stopped: step 3 was the last one


class ScriptedScore(XceptionModule):
    """val/acc1 by epoch from a script, so that which checkpoints are best is known in advance."""

    SCORES = (0.2, 0.6, 0.4, 0.8, 0.1, 0.7)

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):  # where the module logs its validation metrics
        self.log("val/acc1", self.SCORES[self.current_epoch])


def test_best_k_bookkeeping_survives_a_restart(tmp_path):
    data = tiny_data(train_size=4)  # one step per epoch

    def fit(epochs: int, ckpt_path: str | None = None, probe: L.Callback | None = None) -> ModelCheckpoint:
        module = ScriptedScore(num_classes=6, train_size=4, batch_size=4, network=TinyNetwork)
        trainer = tiny_trainer(tmp_path, ema=None, max_epochs=epochs, callbacks=[probe] if probe else [],
                               parts={"checkpoint": BestCheckpoints(save_top_k=2)})
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return trainer.checkpoint_callback

    def best_files() -> set[str]:
        return {p.name for p in (tmp_path / "checkpoints").glob("epoch=*.ckpt")}

    first = fit(3)
    assert best_files() == {"epoch=1-step=2-acc1=0.6000.ckpt", "epoch=2-step=3-acc1=0.4000.ckpt"}
    assert {Path(p).name for p in first.best_k_models} == best_files()

    restored = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            best = trainer.checkpoint_callback.best_k_models
            restored.update({Path(path).name: round(float(score), 4) for path, score in best.items()})

    last = tmp_path / "checkpoints" / "last.ckpt"
    fit(5, ckpt_path=str(last), probe=Probe())
    assert restored == {"epoch=1-step=2-acc1=0.6000.ckpt": 0.6, "epoch=2-step=3-acc1=0.4000.ckpt": 0.4}
    assert torch.load(last, weights_only=True)["global_step"] == 5  # written after 0.1 too, not only after a best

    third = fit(6, ckpt_path=str(last))
    # 0.8 then 0.7 displaced both files of the first run: exactly k remain, those the bookkeeping lists
    assert best_files() == {"epoch=3-step=4-acc1=0.8000.ckpt", "epoch=5-step=6-acc1=0.7000.ckpt"}
    assert {Path(p).name for p in third.best_k_models} == best_files()


def test_checkpoints_are_read_with_weights_only_when_resuming(tmp_path, monkeypatch):
    data = tiny_data(train_size=4)
    tiny_trainer(tmp_path, limit_val_batches=0).fit(tiny_module(data, network=TinyNetwork), data)
    loads = []
    load = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # would turn torch's default off
    tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(
        tiny_module(data, network=TinyNetwork), data, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert loads == [True]  # hparams, EMA state, best-k scores, data position: all plain tensors and primitives
