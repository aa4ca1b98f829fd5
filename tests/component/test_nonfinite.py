"""A non-finite training loss: by default the run stops and names the step, the batch and the fix, keeping the
last good checkpoint; with nonfinite_loss="skip" the batch is skipped and leaves no trace (weights, BatchNorm
statistics, the Polyak copy, the lr, the schedule), under gradient accumulation and fp16 too."""

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.crash import TinyNetwork
from tests.helpers import Recorder, changed, fp16_on_cpu, fused_sgd, tiny_data, tiny_module, tiny_trainer
from xception_pl.checkpointing import LastCheckpoint


def test_a_non_finite_loss_stops_with_the_step_and_the_fix(tmp_path):
    data = tiny_data(image_size=32)
    module = tiny_module(data, network=TinyNetwork)
    module.network.fc.bias.data[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"at global step 0 \(batch 0 of its epoch\); that step and any after "
                                                 r"it were skipped, so the weights and the last checkpoint are intact\. "
                                                 r"Lower the lr"):
        tiny_trainer(tmp_path, limit_val_batches=0).fit(module, data)


def test_nonfinite_loss_stops_with_the_step_and_batch(tmp_path):
    data = tiny_data()
    module = tiny_module(data)
    module.network.head.fc.bias.data[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at global step 0 \(batch 0 of its epoch\)"):
        tiny_trainer(tmp_path).fit(module, data)


def test_nonfinite_loss_can_skip_the_batch(tmp_path):
    data = tiny_data()
    module = tiny_module(data, nonfinite_loss="skip")
    poisoned, weights = {1, 2}, {}

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            weights[f"before {batch_idx}"] = pl_module.network.head.fc.weight.detach().clone()
            if batch_idx in poisoned:
                batch["image"][0, 0, 0, 0] = float("inf")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights[f"after {batch_idx}"] = pl_module.network.head.fc.weight.detach().clone()

    trainer = tiny_trainer(tmp_path, ema=None, callbacks=[Poison()], limit_val_batches=0)
    trainer.fit(module, data)
    assert trainer.callback_metrics["train/skipped_nonfinite"] == len(poisoned)
    # skipped batches leave the weights untouched (no step, no momentum); the others move them
    assert torch.equal(weights["before 1"], weights["after 2"])
    assert not torch.equal(weights["before 0"], weights["after 0"])
    assert not torch.equal(weights["before 3"], weights["after 3"])
    assert all(torch.isfinite(p).all() for p in module.parameters())


class PoisonFrom(L.Callback):
    """NaN images from global step `at` on; keeps the bytes of last.ckpt as they were just before."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.last_before: bytes | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            self.last_before = (Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt").read_bytes()
            batch["image"].fill_(float("nan"))


def test_a_stop_on_a_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path):
    data, poison = tiny_data(), PoisonFrom(at=3)
    module = tiny_module(data, network=TinyNetwork)
    every_step = {"last_checkpoint": LastCheckpoint(every_n_train_steps=1)}  # last.ckpt every step; EMA on
    with pytest.raises(FloatingPointError, match="non-finite training loss at global step 3"):
        tiny_trainer(tmp_path, callbacks=[poison], parts=every_step, limit_val_batches=0).fit(module, data)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.read_bytes() == poison.last_before  # untouched by the failed step
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 3
    for weights in ("state_dict", "current_model_state"):  # the EMA weights and the raw ones
        assert all(torch.isfinite(t).all() for t in checkpoint[weights].values() if t.is_floating_point())


def test_with_accumulation_every_micro_batch_loss_is_checked(tmp_path):
    data = tiny_data(image_size=32)
    module, recorder = tiny_module(data, network=TinyNetwork, nonfinite_loss="skip", **fused_sgd), Recorder(poison={0})
    trainer = tiny_trainer(tmp_path, ema=None, accumulate_grad_batches=2, limit_val_batches=0, plugins=[fp16_on_cpu()],
                           callbacks=[recorder])
    trainer.fit(module, data)
    # micro-batch 0 (not the last of its step) was bad: the whole first step changed nothing
    assert not changed(recorder.states["before 0"]["network"], recorder.states["after 1"]["network"])
    assert changed(recorder.states["before 2"]["network"], recorder.states["after 3"]["network"])
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 1


@pytest.mark.parametrize("optimizer", [
    pytest.param(lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=True), id="fused-sgd"),
    pytest.param(lambda params: __import__("xception_pl.optim").optim.RMSpropTF(params, lr=0.01, momentum=0.9, eps=1.0),
                 id="rmsprop-tf"),
])
def test_a_skipped_batch_leaves_no_trace(tmp_path, optimizer):
    data = tiny_data(image_size=32)
    module, recorder = tiny_module(data, network=TinyNetwork, nonfinite_loss="skip", optimizer=optimizer), Recorder({1})
    trainer = tiny_trainer(tmp_path, ema=0.5, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, data)
    before, after = recorder.states["before 1"], recorder.states["after 1"]
    # weights, BatchNorm statistics (and their counter), the Polyak copy, the lr: untouched by batch 1
    assert not changed(before["network"], after["network"]) and not changed(before["ema"], after["ema"])
    assert before["lr"] == after["lr"]
    assert changed(recorder.states["before 2"]["network"], recorder.states["after 2"]["network"])  # goes on
    ema = next(c for c in trainer.callbacks if hasattr(c, "_average_model"))._average_model.module
    for model in (module, ema):
        assert all(torch.isfinite(t).all() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 1
    # the schedule counted the 3 good steps only (global batch 4): exact once read
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.samples_seen - scheduler.state_dict()["samples_skipped"] == 3 * 4



class PoisonAndSkip(L.Callback):
    """An inf pixel in the batches of global steps `poison`; every batch reports one sample its workers skipped."""

    def __init__(self, poison: set[int]) -> None:
        self.poison = poison

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        batch["skipped"] = torch.ones(1, dtype=torch.long)
        if trainer.global_step in self.poison:
            batch["image"][0, 0, 0, 0] = float("inf")


def test_the_skip_counts_go_on_after_a_resume(tmp_path):
    from tests.helpers import scalars

    data = tiny_data(image_size=32)  # 4 batches an epoch
    module = lambda: tiny_module(data, network=TinyNetwork, nonfinite_loss="skip")  # noqa: E731
    tiny_trainer(tmp_path, ema=None, max_steps=2, limit_val_batches=0, callbacks=[PoisonAndSkip({1})]).fit(module(), data)
    resumed = tiny_trainer(tmp_path, ema=None, max_epochs=2, limit_val_batches=0, callbacks=[PoisonAndSkip(set())])
    resumed.fit(module(), data, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    curves = scalars(tmp_path)
    assert [v for step, v in curves["train/skipped_nonfinite"] if step >= 2] == [1.0] * 4  # step 1's, kept
    # By step: the two fits' event files may load in either order (written in the same second, their names end in
    # a per-process writer count, "…9" after "…10").
    assert [v for step, v in sorted(curves["data/skipped"])] == [2.0, 6.0]  # so far in the run: 2 batches, 4 more
