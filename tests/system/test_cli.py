"""The command line end to end: LightningCLI, configs, TensorBoard files, checkpoints, resume. (Bad configs and
command lines: tests/component/test_bad_inputs.py.)"""

import math

import pytest
import torch
import yaml

from tests.helpers import run_config, run_module, scalars, synthetic_data
from xception_pl.cli import main


def test_fit_writes_checkpoints_config_and_tensorboard_scalars(tmp_path):
    run = tmp_path / "run"
    main(["fit", "--config", str(run_config(tmp_path / "c.yaml", run))])
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"last.ckpt"}
    assert any(p.name.startswith("epoch=0-step=4-acc1=") for p in (run / "checkpoints").iterdir())
    assert (run / "config.yaml").is_file()
    assert yaml.safe_load((run / "hparams.yaml").read_text())["num_classes"] == 6  # linked from the data
    logged = scalars(run)
    for tag in ("train/loss", "train/lr", "val/loss", "val/acc1", "val/acc5", "train/global_batch_size"):
        assert tag in logged, tag
    # lr halves every 12 samples = 3 steps of 4 (sec. 4.2's staircase, in samples)
    assert [round(v, 6) for _, v in logged["train/lr"]] == [0.01, 0.01, 0.01, 0.005]
    assert logged["train/global_batch_size"] == [(0, 4.0)]


def test_a_config_names_a_timm_network_a_torch_schedule_and_the_runs_parts(tmp_path):
    """The parts a user plugs in, by name: timm's resnet10t through TimmNetwork, torch's CosineAnnealingLR counted
    in samples through TorchShape, and the run's own groups (best k, last.ckpt, Polyak averaging)."""
    run = tmp_path / "run"
    cosine = {"class_path": "xception_pl.schedules.TorchShape",
              "init_args": {"shape": {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                                      "init_args": {"T_max": 16, "eta_min": 0.0}}}}  # 16 samples: 4 steps of 4
    config = run_config(tmp_path / "c.yaml", run, checkpoint={"save_top_k": 0}, ema={"decay": None},
                        last_checkpoint={"every_n_train_steps": 1},
                        data={**synthetic_data(image_size=32)},
                        model={"network": {"class_path": "xception_pl.backbone.TimmNetwork",
                                           "init_args": {"model_name": "resnet10t"}}, "lr_scheduler": cosine})
    main(["fit", "--config", str(config)])
    lrs = [v for _, v in scalars(run)["train/lr"]]
    assert lrs == pytest.approx([0.01 * (1 + math.cos(math.pi * 4 * step / 16)) / 2 for step in range(4)])
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.ckpt"}  # no best k, none averaged
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert "current_model_state" not in checkpoint and any(k.startswith("network.body.") for k in checkpoint["state_dict"])


def test_resume_from_last_continues_step_count_and_lr(tmp_path):
    once = tmp_path / "uninterrupted"
    main(["fit", "--config", str(run_config(tmp_path / "a.yaml", once)), "--trainer.max_epochs", "2"])
    twice = tmp_path / "resumed"
    config = str(run_config(tmp_path / "b.yaml", twice))
    main(["fit", "--config", config])
    with pytest.raises(SystemExit, match="already holds checkpoints of an earlier run"):
        main(["fit", "--config", config, "--trainer.max_epochs", "2"])
    main(["fit", "--config", config, "--trainer.max_epochs", "2", "--ckpt_path", "last"])

    def final(run):
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
        return checkpoint["global_step"], checkpoint["lr_schedulers"][0]["samples_seen"], \
            checkpoint["lr_schedulers"][0]["_last_lr"]

    assert final(once) == final(twice) == (8, 32, [0.01 * 0.5 ** 2] * 2)  # two param groups
    steps = [s for s, _ in scalars(twice)["train/lr"]]
    assert steps == list(range(8))  # the step count continued, it did not restart


def test_print_config_shows_the_linked_recipe(tmp_path):
    result = run_module("fit", "--config", "configs/imagenet.yaml", "--print_config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["model"]["optimizer"]["init_args"]["lr"] == 0.045
    assert config["model"]["lr_scheduler"]["init_args"]["decay_rate"] == 0.94
    assert config["model"]["network"]["init_args"]["drop_rate"] == 0.5


def test_an_override_reaches_interpolated_values(tmp_path):
    """parser_mode omegaconf+: ${...} resolves after command-line overrides are merged."""
    config = run_config(tmp_path / "c.yaml", tmp_path / "run",  # relative: works under any subcommand
                        last_checkpoint={"every_n_train_steps": "${..trainer.log_every_n_steps}"})
    result = run_module("fit", "--config", str(config), "--trainer.log_every_n_steps", "7", "--print_config")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["last_checkpoint"]["every_n_train_steps"] == 7
