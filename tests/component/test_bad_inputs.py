"""Every bad input the project handles, and what the user gets: the user-facing list, one table per entry point.

A mistake in the config, on the command line, in a path or a file given to load stops the run before training
with one line that names the fix (`error: ...` from `python -m xception_pl`, or the exception of the API that
was called). Cases marked "raises" stop with an exception whose last line is the message (a traceback above it):
they are found inside trainer.fit, after the model and data are built. A bad sample inside the shards is
skipped and counted instead (tests/component/test_bad_samples.py); a non-finite loss: tests/component/test_nonfinite.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.helpers import run_config, run_module, synthetic_data
from tests.data_helpers import shards
from xception_pl import Xception, slurm
from xception_pl.cli import main
from xception_pl.data import WebDatasetDataModule

# ---------------------------------------------------------------------------------------------------------
# The command line and its config: `python -m xception_pl fit|validate ...`


class Payload:
    """Pickles to a call of os.system: what a malicious checkpoint would run on a weights_only=False load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A good config (synthetic data, a tiny network) and the bad files the table points at."""
    tmp = tmp_path_factory.mktemp("inputs")
    run_config(tmp / "good.yaml", tmp / "run", data=synthetic_data(train_size=8, val_size=4, image_size=32),
               trainer={"num_sanity_val_steps": 0, "log_every_n_steps": None},  # None: Lightning's default
               ema={"decay": None}, model={"network": {"class_path": "tests.crash.TinyNetwork"},
                      "lr_scheduler": {"class_path": "xception_pl.schedules.SampleStepDecay",
                                       "init_args": {"decay_rate": 0.5, "decay_every_samples": 8}}})
    typo = yaml.safe_load((tmp / "good.yaml").read_text())
    typo["trainer"]["max_epoch"] = typo["trainer"].pop("max_epochs")
    (tmp / "typo.yaml").write_text(yaml.safe_dump(typo))
    typo["trainer"]["max_epochs"] = typo["trainer"].pop("max_epoch")
    typo["model"]["save_top_k"] = 1  # where it was before the recipe was only the model's
    (tmp / "moved.yaml").write_text(yaml.safe_dump(typo))
    (tmp / "broken.yaml").write_text("trainer: [accelerator: cpu\nmodel: {}\n")
    (tmp / "earlier" / "checkpoints").mkdir(parents=True)
    (tmp / "earlier" / "checkpoints" / "last.ckpt").write_bytes(b"")
    torch.save({"state_dict": {}, "hyper_parameters": {}, "callbacks": Payload(tmp / "payload-ran")}, tmp / "evil.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, tmp / "whole.ckpt")
    (tmp / "truncated.ckpt").write_bytes((tmp / "whole.ckpt").read_bytes()[:700])
    (tmp / "text.ckpt").write_text("not a checkpoint")
    (tmp / "empty.ckpt").write_bytes(b"")
    main(["fit", "--config", str(tmp / "good.yaml"), "--trainer.default_root_dir", str(tmp / "six"),
          "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])  # a real checkpoint, of 6 classes
    return tmp


CLI = [  # (arguments, what the user reads, "exits" with that one line | "raises" it from inside trainer.fit)
    (["fit", "--config", "{tmp}/missing.yaml"], "missing.yaml", "exits"),
    (["fit", "--config", "{tmp}/broken.yaml"], "Problems parsing config", "exits"),
    (["fit", "--config", "{tmp}/typo.yaml"], "does not accept option 'trainer.max_epoch'", "exits"),
    (["fit", "--config", "{tmp}/moved.yaml"], "model.save_top_k is now checkpoint.save_top_k", "exits"),
    (["fit", "--config", "{good}", "--model.ema_decay=0.9"], "model.ema_decay is now ema.decay", "exits"),
    (["fitt", "--config", "{good}"], "invalid choice: 'fitt' (choose from 'fit', 'validate', 'test', 'predict')",
     "exits"),
    (["fit", "--config", "{good}", "--trainer.max_epochs", "two"], 'Parser key "trainer.max_epochs"', "exits"),
    (["fit", "--config", "{good}", "--model.nonfinite_loss", "ignore"],
     "Expected a typing.Literal['stop', 'skip']. Got value: ignore", "exits"),
    (["fit", "--config", "{good}", "--model.optimizer.class_path", "torch.optim.NoSuchOptimizer"],
     "NoSuchOptimizer", "exits"),
    (["fit", "--config", "{good}", "--data.class_path", "xception_pl.data.NoSuchData"],
     "has no attribute 'NoSuchData'", "exits"),
    (["fit", "--config", "{good}", "--ema.decay", "1.5"],
     "ema.decay=1.5 must be in (0, 1), or null to turn Polyak averaging off", "exits"),
    (["fit", "--config", "{good}", "--faults.stall_timeout_s", "1200"],
     "faults.stall_timeout_s=1200.0 must be below faults.collective_timeout_s=900.0, else a stuck collective aborts "
     "before the stacks are printed", "exits"),
    (["fit", "--config", "{good}", "--faults.peer_timeout_s", "0"], "faults.peer_timeout_s=0.0 must be > 0", "exits"),
    (["fit", "--config", "{good}", "--data.init_args.num_classes", "1"], "num_classes=1: need at least 2 classes",
     "exits"),
    (["fit", "--config", "{good}", "--data.class_path", "tests.crash.FactlessData"],
     "FactlessData has no `multilabel`: a data module for XceptionModule declares xception_pl.facts.DataFacts",
     "exits"),
    (["fit", "--config", "{good}", "--data.init_args.multilabel", "true", "--model.class_weights", "{tmp}/w.json"],
     "cannot read class weights file", "exits"),
    (["fit", "--config", "{good}", "--data.class_path", "xception_pl.data.WebDatasetDataModule",
      "--data.init_args.train", "{tmp}/shards/train-{{000000..000009}}.tar"],
     "matches no shard file. Give a shard directory with a manifest.json", "exits"),
    (["fit", "--config", "{good}", "--trainer.default_root_dir", "{tmp}/earlier"],
     "already holds checkpoints of an earlier run (last.ckpt). Resume it with --ckpt_path last", "exits"),
    (["fit", "--config", "{good}", "--ckpt_path", "{tmp}/missing.ckpt"], "missing.ckpt does not exist", "exits"),
    (["fit", "--config", "{good}", "--ckpt_path", "{tmp}/truncated.ckpt"], "is not a readable torch checkpoint",
     "exits"),
    (["fit", "--config", "{good}", "--ckpt_path", "{tmp}/text.ckpt"], "is not a readable torch checkpoint", "exits"),
    (["fit", "--config", "{good}", "--ckpt_path", "{tmp}/empty.ckpt"], "is not a readable torch checkpoint",
     "exits"),
    (["fit", "--config", "{good}", "--ckpt_path", "{tmp}/evil.ckpt"],
     "holds objects other than tensors and plain containers, so it is not loaded", "exits"),
    (["validate", "--config", "{good}", "--ckpt_path", "{tmp}/missing.ckpt"], "missing.ckpt does not exist",
     "exits"),
    (["fit", "--config", "{good}", "--model.optimizer.init_args.lr", "-0.1"],
     "Invalid learning rate: -0.1. Fix model.optimizer.init_args in the config", "raises"),
    (["fit", "--config", "{good}", "--model.optimizer.init_args.momentum", "-1"],
     "Invalid momentum value: -1.0. Fix model.optimizer.init_args", "raises"),
    (["fit", "--config", "{good}", "--model.lr_scheduler.init_args.decay_rate", "0"],
     "decay_rate=0.0 must be in (0, 1]", "raises"),
    (["validate", "--config", "{good}", "--data.init_args.num_classes", "7", "--ckpt_path",
      "{tmp}/six/checkpoints/last.ckpt"],
     "trained with num_classes=6 but the data gives num_classes=7: point --ckpt_path at a checkpoint of this dataset",
     "raises"),
]


def cli_id(args: list[str]) -> str:
    return " ".join(a for a in args if a not in ("--config", "{good}")).replace("{tmp}/", "")


@pytest.mark.parametrize("args, message, outcome", CLI, ids=[cli_id(a) for a, _, _ in CLI])
def test_command_line(args, message, outcome, inputs, capsys):
    args = [a.format(tmp=inputs, good=inputs / "good.yaml") for a in args]
    if outcome == "exits":
        with pytest.raises(SystemExit) as stop:
            main(args)
        said = capsys.readouterr().err if isinstance(stop.value.code, int) else str(stop.value.code)
        assert stop.value.code != 0
    else:
        with pytest.raises(Exception) as raised:
            main(args)
        said = str(raised.value)
    assert message in said
    assert not (inputs / "run" / "checkpoints").exists()  # nothing trained
    assert not (inputs / "payload-ran").exists()  # the malicious checkpoint ran no code


# The same stops as the shell sees them: `python -m xception_pl` exits non-zero, the message on stderr


@pytest.mark.parametrize("override, message", [
    (["--model.optimizer.class_path", "torch.optim.NoSuchOptimizer"], "NoSuchOptimizer"),
    (["--model.optimizer.init_args.lr", "-0.1"], "Invalid learning rate: -0.1"),
    (["--ema.decay", "1.5"], "ema.decay=1.5 must be in (0, 1)"),
    (["--data.init_args.num_classes", "1"], "num_classes=1: need at least 2 classes"),
])
def test_bad_configs_stop_before_training_with_a_message(tmp_path, override, message):
    result = run_module("fit", "--config", str(run_config(tmp_path / "c.yaml", tmp_path / "run")), *override)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_config_file_is_named(tmp_path):
    result = run_module("fit", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode != 0 and "nope.yaml" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Shard paths and data set facts: WebDatasetDataModule(...) and its setup, before any worker starts


def cpu_trainer(world_size: int = 1) -> SimpleNamespace:
    return SimpleNamespace(global_rank=0, world_size=world_size,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


def remove_a_listed_shard(data: Path) -> Path:
    (data / json.loads((data / "manifest.json").read_text())["shards"][0]["name"]).unlink()
    return data


def without_manifest(data: Path) -> Path:
    (data / "manifest.json").unlink()
    return data


DATA = [  # (arguments given the 12-sample, 3-class, 6-shard set at {data}, message, when: "init" | "setup")
    (dict(), "no data given: pass train=...", "init"),
    (dict(train="{tmp}/raw"), "no manifest.json in this directory. Write shards with `python -m xception_pl shards",
     "init"),
    (dict(train="{tmp}/nowhere/train-{{000000..000009}}.tar"), "matches no shard file", "init"),
    (dict(train="{data}/train-{{000000..000007}}.tar"), "2 of 8 shards do not exist", "init"),
    (dict(train="{missing_shard}"), "1 shards listed in manifest.json are missing", "init"),
    (dict(train="pipe:cat {data}/train-{{000000..000005}}.tar", num_classes=3, multilabel=False),
     "is remote, so its sample count is unknown: pass train_size=<samples>", "init"),
    (dict(train="{bare}/bare-{{000000..000005}}.tar", num_classes=3, multilabel=False),
     "pass train_size=<samples>", "init"),
    (dict(train="{bare}/bare-{{000000..000005}}.tar", train_size=12, num_classes=3),
     "multilabel is unknown: no manifest.json beside the shards; pass multilabel=...", "init"),
    (dict(train="{data}", num_classes=5), "num_classes=5 (an argument or another split's manifest) disagrees", "init"),
    (dict(train="{data}", val="{other}"), "disagrees with num_classes=2 in the manifest.json of val", "init"),
    (dict(train="{data}", batch_size=0), "need batch_size >= 1", "init"),
    (dict(train="{data}", batch_size=8, trainer=cpu_trainer(world_size=2)), "less than one global batch", "setup"),
    (dict(train="{data}", decode_device="cuda", trainer=cpu_trainer()),
     "decode_device='cuda' needs a CUDA trainer; set decode_device=cpu", "setup"),
]


@pytest.mark.parametrize("kwargs, message, when", DATA, ids=[m[:40] for _, m, _ in DATA])
def test_shard_paths_and_data_facts(kwargs, message, when, tmp_path):
    data = shards(tmp_path, classes=3, per_class=4, shard_size=2)
    (tmp_path / "raw").mkdir()
    places = {"tmp": tmp_path, "data": data, "missing_shard": tmp_path / "missing",
              "bare": tmp_path / "bare", "other": tmp_path / "other"}
    if "{missing_shard}" in str(kwargs):
        remove_a_listed_shard(shards(tmp_path, "missing", classes=3, per_class=4, shard_size=2))
    if "{bare}" in str(kwargs):
        without_manifest(shards(tmp_path, "bare", classes=3, per_class=4, shard_size=2))
    if "{other}" in str(kwargs):
        shards(tmp_path, "other", classes=2, per_class=2)
    kwargs = {k: v.format(**places) if isinstance(v, str) else v for k, v in kwargs.items()}
    trainer = kwargs.pop("trainer", None)
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        dm = WebDatasetDataModule(**{"num_workers": 0, **kwargs})
        assert when == "setup", "the constructor should have refused this"
        dm.trainer = trainer
        dm.setup("fit" if "train" in kwargs else "validate")
    assert message in str(raised.value)


def test_shards_that_all_fail_to_open_stop_the_run_instead_of_spinning(tmp_path):
    dm = WebDatasetDataModule(train=f"pipe:cat {tmp_path}/missing-{{0..3}}.tar", train_size=8, num_classes=2,
                              multilabel=False, batch_size=4, num_workers=0)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="100 shard read errors in a row and no readable sample; check the shard"):
        next(iter(dm.train_dataloader()))


def test_pattern_matching_no_shards_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no shard file"):
        WebDatasetDataModule(train=f"{tmp_path}/train-{{000000..000009}}.tar", train_size=10, num_classes=2,
                             multilabel=False)


def test_some_missing_shards_are_listed(tmp_path):
    data = shards(tmp_path, classes=2, per_class=2, shard_size=2)
    with pytest.raises(FileNotFoundError, match="1 of 3 shards do not exist"):
        WebDatasetDataModule(train=f"{data}/train-{{000000..000002}}.tar")


def test_directory_without_manifest_names_the_writer(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(FileNotFoundError, match="python -m xception_pl shards"):
        WebDatasetDataModule(train=str(tmp_path / "raw"))


def test_pattern_without_manifest_needs_a_size(tmp_path):
    data = shards(tmp_path, classes=2, per_class=2, shard_size=2)
    (data / "manifest.json").unlink()
    with pytest.raises(ValueError, match="pass train_size"):
        WebDatasetDataModule(train=f"{data}/train-{{000000..000001}}.tar", num_classes=2, multilabel=False)
    with pytest.raises(ValueError, match="pass multilabel"):
        WebDatasetDataModule(train=f"{data}/train-{{000000..000001}}.tar", train_size=4, num_classes=2)
    with pytest.raises(ValueError, match="pass train_size"):
        WebDatasetDataModule(train=f"pipe:cat {data}/train-{{000000..000001}}.tar", num_classes=2, multilabel=False)


def test_train_set_smaller_than_a_global_batch_is_refused(tmp_path):
    dm = WebDatasetDataModule(train=str(shards(tmp_path, classes=2, per_class=2)), batch_size=4, num_workers=0)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(ValueError, match="less than one global batch"):
        dm.setup("fit")


def test_manifests_that_disagree_are_refused(tmp_path):
    a = shards(tmp_path, "a", classes=2, per_class=2)
    b = shards(tmp_path, "b", classes=3, per_class=2)
    with pytest.raises(ValueError, match="num_classes"):
        WebDatasetDataModule(train=str(a), val=str(b))
    with pytest.raises(ValueError, match="num_classes=5"):
        WebDatasetDataModule(train=str(a), num_classes=5)


# ---------------------------------------------------------------------------------------------------------
# Samples inside the shards are skipped and counted, not fatal: tests/component/test_bad_samples.py


# ---------------------------------------------------------------------------------------------------------
# Training values that go wrong at run time (a non-finite loss): tests/component/test_nonfinite.py.
# Checkpoint writes that fail (disk full, quota, permissions, read-only): tests/system/test_reliability.py
# (test_a_failed_checkpoint_write_stops_training_keeps_the_previous_file_and_names_the_fix).

# ---------------------------------------------------------------------------------------------------------
# Weight files: Xception.from_timm(path)


def weight_file(tmp: Path, kind: str) -> Path:
    path = tmp / f"{kind}.pth"
    if kind == "pickled_module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "truncated":
        torch.save({"fc.weight": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    elif kind == "text":
        path.write_text("weights")
    elif kind == "wrong_keys":
        torch.save({"fc.weight": torch.zeros(3, 2048), "head.bias": torch.zeros(3)}, path)
    return path


WEIGHTS = [
    ("missing", FileNotFoundError, "does not exist: pass the path of a timm legacy_xception state dict"),
    ("pickled_module", ValueError, "holds pickled objects, not only tensors, so it is not loaded"),
    ("truncated", ValueError, "is not a readable torch file (RuntimeError: truncated, corrupt or another format)"),
    ("text", ValueError, "is not a readable torch file"),
    ("wrong_keys", ValueError, "not a timm legacy_xception state dict for this model; check num_classes / fc_layers"),
]


@pytest.mark.parametrize("kind, error, message", WEIGHTS, ids=[k for k, _, _ in WEIGHTS])
def test_weight_files(kind, error, message, tmp_path):
    with pytest.raises(error) as raised:
        Xception.from_timm(weight_file(tmp_path, kind), num_classes=3)
    assert message in str(raised.value)


# ---------------------------------------------------------------------------------------------------------
# SLURM launches: xception_pl.slurm.check_launch(), which the CLI runs first


SLURM = [
    ({"SLURM_NTASKS": "8", "SLURM_STEP_ID": "batch"},
     "this SLURM job has 8 tasks but this process was not started by srun"),
    ({"SLURM_NTASKS": "4"}, "Prepend srun to the command in the batch script: srun python -m xception_pl fit"),
    ({"SLURM_STEP_ID": "0", "SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NTASKS": "2"},
     "4 GPUs per node (--gres=gpu:4) but 2 tasks per node (--ntasks-per-node=2)"),
    ({"SLURM_STEP_ID": "0", "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_NTASKS": "2"},
     "Submit with --ntasks-per-node=8 --gres=gpu:8"),
]


@pytest.mark.parametrize("env, message", SLURM, ids=[m[:40] for _, m in SLURM])
def test_slurm_launch(env, message, monkeypatch):
    for name in [n for n in os.environ if n.startswith(("SLURM_", "SBATCH_"))]:
        monkeypatch.delenv(name)
    for name, value in {"SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "train", **env}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        slurm.check_launch()
    assert message in str(stop.value)
