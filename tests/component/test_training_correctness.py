"""The paths a GPU user takes first, taken on CPU: fp16 through a GradScaler, fp32 logits under bf16, the final
checkpoint's raw weights, checkpoints that rebuild their model, the user's callbacks and loggers, and config edits
on resume. (A skipped non-finite batch: tests/component/test_nonfinite.py.)"""

import copy
import functools
import importlib
import math

import lightning as L
import pytest
import timm.optim
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from tests.crash import TinyNetwork
from tests.helpers import (ROOT, Recorder, changed, fp16_on_cpu, fused_sgd, run_config, scalars, tiny_data, tiny_module,
                           tiny_trainer)
from xception_pl.cli import XceptionCLI, main
from xception_pl.guard import skips_on_device
from xception_pl.metrics import MeanAveragePrecisionAtK
from xception_pl.model import Xception
from xception_pl.module import XceptionModule
from xception_pl.optim import RMSpropTF
from xception_pl.per_class import PerClassMetrics
from xception_pl.pretrained import FreezeBackbone
from xception_pl.schedules import SampleCounts


def test_fp16_mixed_precision_updates_the_weights_and_the_loss_falls(tmp_path):
    data = tiny_data(train_size=8, num_classes=2, image_size=32)  # 2 batches an epoch, seen again and again
    module, recorder = tiny_module(data, network=TinyNetwork, **fused_sgd), Recorder()
    trainer = tiny_trainer(tmp_path, ema=None, max_epochs=6, limit_val_batches=0, plugins=[fp16_on_cpu()], callbacks=[recorder])
    trainer.fit(module, data)
    weights = [k for k in recorder.states["before 0"]["network"] if "running" not in k and "num_batches" not in k]
    moved = changed({k: recorder.states["before 0"]["network"][k] for k in weights},
                    {k: recorder.states["after 0"]["network"][k] for k in weights})
    assert len(moved) == len(weights)  # every parameter tensor moves in one step (it moved none before)
    assert sum(recorder.losses[-4:]) < sum(recorder.losses[:4])


@pytest.mark.parametrize("optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=True),
    lambda params: torch.optim.AdamW(params, lr=1e-3),
    lambda params: timm.optim.RMSpropTF(params, lr=1e-3, alpha=0.9, eps=1.0, momentum=0.9),
    lambda params: RMSpropTF(params, lr=1e-3, momentum=0.9),
], ids=["sgd", "fused-sgd", "adamw", "timm-rmsproptf", "rmsproptf"])
def test_fp16_with_any_optimizer_lowers_an_overflowing_loss_scale_and_then_learns(tmp_path, optimizer):
    data = tiny_data(train_size=8, num_classes=2, image_size=32)
    module = tiny_module(data, network=TinyNetwork, optimizer=optimizer, lr_scheduler=None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)  # loss x 2^30 overflows fp16 in backward
    trainer = tiny_trainer(tmp_path, ema=None, max_epochs=10, limit_val_batches=0,
                           plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    before = {k: v.clone() for k, v in module.network.named_parameters()}
    trainer.fit(module, data)
    halvings = 30 - math.log2(scaler.get_scale())
    assert halvings >= 10  # halved at each overflow (it never moved before)
    assert not [k for k, v in module.network.named_parameters() if torch.equal(v, before[k])]  # all learned
    curves = scalars(tmp_path)
    assert curves["train/fp16_overflow"][-1][1] == halvings  # one overflowing step per halving
    assert curves["train/skipped_nonfinite"][-1][1] == 0  # overflows are not non-finite losses


@pytest.mark.parametrize("config", ["imagenet", "jft", "finetune", "smoke"])
def test_every_recipes_optimizer_skips_a_non_finite_step_on_the_device(config):
    """Else every step waits for the host to check the gradients (module.optimizer_step)."""
    spec = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())["model"]["optimizer"]
    module, _, name = spec["class_path"].rpartition(".")
    optimizer = getattr(importlib.import_module(module), name)([nn.Parameter(torch.zeros(2))], **spec["init_args"])
    assert skips_on_device(optimizer)


def test_bf16_autocast_and_fp32_give_the_same_map100():
    torch.manual_seed(0)
    network = Xception(num_classes=50)
    features = torch.randn(3000, 2048, 1, 1)  # what the exit flow hands the head, 3,000 images
    target = (torch.rand(3000, 50) < 0.1).float()

    def map100(head: nn.Module, autocast: bool) -> float:
        metric = MeanAveragePrecisionAtK(50, 100)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = head(features)
        metric.update(logits.float(), target)
        return float(metric.compute())

    head = network.forward_head
    assert map100(head, autocast=True) == pytest.approx(map100(head, autocast=False), abs=1e-4)
    plain = copy.deepcopy(network.head)  # the same weights in a bf16 classifier: ties move MAP@100
    plain.fc = nn.Linear(2048, 50)
    plain.fc.load_state_dict(network.head.fc.state_dict())
    assert abs(map100(plain, autocast=True) - map100(plain, autocast=False)) > 1e-4


def test_the_final_checkpoint_keeps_the_raw_weights_and_a_resume_continues_from_them(tmp_path):
    data = tiny_data(image_size=32)
    raw = {}

    class Last(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            raw["end"] = pl_module.network.fc.weight.detach().clone()

        def on_train_start(self, trainer, pl_module):
            raw["start"] = pl_module.network.fc.weight.detach().clone()

    # max_steps ends the run in the middle of an epoch, away from any validation (as the JFT recipe always does)
    tiny_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[Last()]).fit(tiny_module(data, network=TinyNetwork), data)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    torch.testing.assert_close(checkpoint["current_model_state"]["network.fc.weight"], raw["end"], rtol=0, atol=0)
    assert not torch.equal(checkpoint["state_dict"]["network.fc.weight"], raw["end"])  # the average
    trained = raw["end"]
    tiny_trainer(tmp_path, max_steps=4, max_epochs=2, limit_val_batches=0, callbacks=[Last()]).fit(
        tiny_module(data, network=TinyNetwork), data, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(raw["start"], trained, rtol=0, atol=0)
    assert not torch.equal(raw["end"], trained)  # and trained on from there


@pytest.mark.parametrize("network", [
    {"class_path": "xception_pl.Xception", "init_args": {"fc_layers": [16], "drop_rate": 0.2}},
    {"class_path": "xception_pl.inception.InceptionV3", "init_args": {"drop_rate": 0.3}},
], ids=["xception-fc", "inception-v3"])
def test_a_checkpoint_rebuilds_its_network_optimizer_and_schedule_without_arguments(tmp_path, network):
    run = tmp_path / "run"
    config = run_config(tmp_path / "c.yaml", run, model={"network": network})
    main(["fit", "--config", str(config), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
          "--data.init_args.image_size", "75"])  # Inception V3's smallest input
    module = XceptionModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert type(module.network).__name__ == network["class_path"].rsplit(".", 1)[1]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert {k.removeprefix("network.") for k in saved["state_dict"]} == set(module.network.state_dict())
    optimizer = module.optimizer(module.parameters())
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["lr"] == 0.01
    assert module.lr_scheduler(optimizer, SampleCounts(4)).decay_rate == 0.5


def test_a_module_built_in_python_loads_its_own_network_or_refuses(tmp_path):
    data = tiny_data(num_classes=3)
    network = functools.partial(Xception, bn_eps=1e-5, pool_padding="symmetric")  # timm's port, not our default
    module = tiny_module(data, network=network, optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, data)
    loaded = XceptionModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert {m.eps for m in loaded.network.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-5}
    images = torch.randn(2, 3, 71, 71)
    torch.testing.assert_close(loaded.eval()(images), module.eval()(images))  # the trained network, as trained
    assert loaded.optimizer(loaded.parameters()).defaults["lr"] == 0.01

    lambda_built = tiny_module(data, network=lambda num_classes: network(num_classes))
    tiny_trainer(tmp_path / "lambda", max_steps=1, limit_val_batches=0).fit(lambda_built, data)
    path = tmp_path / "lambda" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="cannot describe: pass the same network again"):
        XceptionModule.load_from_checkpoint(path)
    again = XceptionModule.load_from_checkpoint(path, network=network)
    torch.testing.assert_close(again.eval()(images), lambda_built.eval()(images))


def test_a_users_callbacks_win_over_ours(tmp_path, caplog):
    caplog.set_level("INFO")
    run = tmp_path / "run"
    config = run_config(tmp_path / "c.yaml", run, trainer={"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "mine"), "monitor": "train/loss"}}]})
    cli = XceptionCLI(args=["--config", str(config), "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging"],
                      run=False)
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    assert kinds.count("ModelCheckpoint") == 1 and "EMAWeightAveraging" in kinds and "PolyakAveraging" not in kinds
    mine = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint")
    assert mine.dirpath == str(tmp_path / "mine")
    assert "LastCheckpoint" in kinds and "ImagesPerSecond" in kinds  # ours fill in what they did not set
    assert "BestCheckpoints: using ModelCheckpoint from the trainer's callbacks, not ours" in caplog.text
    assert "PolyakAveraging: using EMAWeightAveraging from the trainer's callbacks, not ours" in caplog.text


@pytest.mark.parametrize("save_last", [False, True], ids=["best-k", "best-k-and-last"])
def test_a_trainer_built_in_python_keeps_each_kind_of_the_users_callbacks(tmp_path, save_last):
    data = tiny_data(train_size=8, num_classes=3)  # Xception: FreezeBackbone needs its head
    mine = [ModelCheckpoint(dirpath=tmp_path / "mine", monitor="val/acc1", mode="max", save_last=save_last),
            ThroughputMonitor(batch_size_fn=lambda batch: len(batch["image"])), EMAWeightAveraging(),
            PerClassMetrics(output=str(tmp_path / "per_class.json")), FreezeBackbone(samples=4)]
    trainer = tiny_trainer(tmp_path / "run", callbacks=list(mine), parts={"freeze_backbone": FreezeBackbone(4)})
    trainer.fit(tiny_module(data), data)
    assert all(any(c is m for c in trainer.callbacks) for m in mine)  # every instance of the user's survived
    kinds = [type(c).__name__ for c in trainer.callbacks]
    assert not {"ImagesPerSecond", "PolyakAveraging", "BestCheckpoints"} & set(kinds) and kinds.count("FreezeBackbone") == 1
    assert kinds.count("PerClassMetrics") == 1 and kinds.count("ModelCheckpoint") == 1
    assert ("LastCheckpoint" in kinds) != save_last  # ours writes last.ckpt unless theirs does
    written = {p.name for p in (tmp_path / "mine").iterdir()}
    assert "epoch=0-step=2.ckpt" in written and ("last.ckpt" in written) == save_last
    assert (tmp_path / "per_class.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists() != save_last


def test_fit_ends_cleanly_with_a_logger_other_than_tensorboard(tmp_path):
    data = tiny_data(image_size=32)
    trainer = tiny_trainer(tmp_path, max_steps=2, logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(tiny_module(data, network=TinyNetwork), data)
    assert (tmp_path / "csv" / "version_0" / "hparams.yaml").is_file()


def test_the_hparams_summary_reaches_tensorboard_when_it_is_not_the_first_logger(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    data = tiny_data(image_size=32)
    loggers = [CSVLogger(tmp_path, name="csv"), L.pytorch.loggers.TensorBoardLogger(tmp_path, name="tb", version="",
                                                                                 default_hp_metric=False)]
    tiny_trainer(tmp_path, logger=loggers).fit(tiny_module(data, network=TinyNetwork), data)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    summary = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = HParamsPluginData.FromString(summary).experiment  # the HPARAMS tab, beside the final val/*
    assert {m.name.tag for m in experiment.metric_infos} == {"val/loss", "val/acc1", "val/acc5"}
    assert (tmp_path / "csv" / "version_0" / "hparams.yaml").is_file()


def test_on_resume_the_configs_optimizer_and_schedule_win_and_the_change_is_said(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    main(["fit", "--config", str(run_config(tmp_path / "c.yaml", run)), "--trainer.max_steps", "2"])
    main(["fit", "--config", str(run_config(tmp_path / "c.yaml", run)), "--ckpt_path", "last",
          "--trainer.max_steps", "3", "--trainer.max_epochs", "2", "--model.optimizer.init_args.momentum", "0.5",
          "--model.optimizer.init_args.lr", "0.02", "--model.lr_scheduler.init_args.decay_rate", "0.25"])
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert all(g["momentum"] == 0.5 for g in groups)
    # 3 steps x 4 samples = 12 samples: one decay at 12 (decay_every_samples), at the config's new rate and lr
    assert groups[0]["lr"] == pytest.approx(0.02 * 0.25)
    said = capsys.readouterr().err + caplog.text
    assert "momentum=0.5 (checkpoint: 0.9)" in said and "decay_rate=0.25 (checkpoint: 0.5)" in said


def test_validate_with_a_checkpoint_file_takes_its_arguments_only_where_the_config_has_defaults(tmp_path, capsys):
    """`validate --ckpt_path FILE` rebuilds the trained model: the checkpoint's model arguments fill in what the
    config and command line leave at their defaults; what they set wins, and the difference is said once."""
    run = tmp_path / "run"
    main(["fit", "--config", str(run_config(tmp_path / "c.yaml", run)), "--trainer.max_steps", "1",
          "--model.label_smoothing", "0.1", "--model.predict_top_k", "3"])
    checkpoint = str(run / "checkpoints" / "last.ckpt")
    config = run_config(tmp_path / "v.yaml", tmp_path / "v")  # label_smoothing and predict_top_k at their defaults
    capsys.readouterr()
    cli = XceptionCLI(args=["validate", "--config", str(config), "--ckpt_path", checkpoint,
                            "--model.predict_top_k", "2"])
    assert cli.model.hparams.label_smoothing == 0.1  # the checkpoint's: the config left it at its default
    assert cli.model.hparams.predict_top_k == 2  # the command line's
    said = capsys.readouterr().out
    assert said.count("--ckpt_path") == 1
    assert f"--ckpt_path {checkpoint}: the config's model.predict_top_k replace the checkpoint's" in said


def test_batchnorm_state_follows_the_model_when_it_is_moved():
    from xception_pl.guard import BatchNormState

    model = nn.Sequential(nn.BatchNorm1d(3))
    state = BatchNormState(model)  # built before the move, as the module builds it before Lightning moves it
    model.double()  # replaces the buffer tensors, as .to("cuda") does
    state.save()
    before = model[0].running_mean.clone()
    model(torch.randn(8, 3, dtype=torch.float64) + 5)  # a training forward moves the statistics
    state.restore_where(torch.ones(1))
    assert model[0].running_mean.dtype == torch.float64 and torch.equal(model[0].running_mean, before)


def test_every_val_point_in_tensorboard_is_at_a_step_where_validation_ran(tmp_path):
    from tests.helpers import scalars

    data, validated = tiny_data(image_size=32), set()

    class Steps(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            validated.add(trainer.global_step)

    tiny_trainer(tmp_path, max_epochs=2, callbacks=[Steps()]).fit(tiny_module(data, network=TinyNetwork), data)
    curves = {tag: [step for step, _ in points] for tag, points in scalars(tmp_path).items() if tag.startswith("val/")}
    assert curves and validated == {4, 8}
    # Lightning files a validation after global step g under step g - 1; no other point, in particular none at
    # step 0 holding the final value (what log_hyperparams(params, metrics) used to write)
    assert all(steps == [3, 7] for steps in curves.values()), curves
    assert (tmp_path / "hparams.yaml").is_file()


@pytest.mark.parametrize("stop, validated", [
    ({"max_steps": 5, "max_epochs": 2}, [3, 5]),  # JFT's case: the interval (3 batches) does not divide the run
    ({"max_epochs": 1}, [3, 4]),  # 4 batches an epoch
    ({"max_steps": 3}, [3]),  # the last step validated by its interval: once
], ids=["max_steps", "max_epochs", "on_the_interval"])
def test_a_fit_ends_with_a_validation_of_its_last_step(tmp_path, stop, validated):
    data, steps = tiny_data(image_size=32), []

    class Steps(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            steps.append(trainer.global_step)

    trainer = tiny_trainer(tmp_path, val_check_interval=3, check_val_every_n_epoch=None, callbacks=[Steps()], **stop)
    trainer.fit(tiny_module(data, network=TinyNetwork), data)
    assert steps == validated
    assert [p for p in (tmp_path / "checkpoints").glob(f"epoch=*-step={validated[-1]}-*")]  # the last one competed


def test_the_jft_recipe_runs_unchanged_on_a_small_multilabel_set(tmp_path):
    # val_check_interval 20000 counts optimizer steps across epochs (check_val_every_n_epoch: null), so a data
    # set with fewer batches per epoch is no error
    main(["fit", "--config", "configs/jft.yaml", "--data", "xception_pl.data.synthetic.SyntheticDataModule",
          "--data.init_args.multilabel", "true", "--data.init_args.train_size", "8", "--data.init_args.batch_size", "4",
          "--data.init_args.image_size", "32", "--model.network", "tests.crash.TinyNetwork",
          "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
          "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp_path / "run")])
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_the_polyak_horizon_counts_samples_not_steps():
    from xception_pl.ema import PolyakAveraging

    def weight_of_the_start(global_batch: int, samples: int) -> float:
        """What is left of the initial average after `samples`, updating once per global batch."""
        ema, left = PolyakAveraging(decay=0.99, reference_batch=4), 1.0
        while ema.samples < samples:
            left *= ema.step_decay(global_batch)
            ema.samples += global_batch
        return left

    one, two = weight_of_the_start(4, 400), weight_of_the_start(8, 400)  # 1 device, then 2
    assert one == pytest.approx(two, rel=0.05)  # the same horizon in samples (warm-up steps differ slightly)
    assert weight_of_the_start(4, 800) < 0.8 * one  # it does decay
    ema = PolyakAveraging(decay=0.99, reference_batch=4)
    ema.samples = 10**6  # past the warm-up: exactly decay ** (global batch / reference batch) per step
    assert ema.step_decay(8) == pytest.approx(0.99**2, rel=1e-12) and ema.step_decay(4) == pytest.approx(0.99)
