"""Runs on an object store: shards read from it, checkpoints, config and TensorBoard event files written to it,
resumed from it, against a real S3-compatible server (moto_server) on 127.0.0.1 and our writer's shards."""

from __future__ import annotations

import io
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import boto3
import lightning as L
import pytest
import s3fs
import torch

from tests import services
from tests.crash import TinyNetwork, run_cli
from tests.data_helpers import shards
from tests.helpers import free_port, run_config, run_module, tiny_trainer
from tests.system.test_reliability import assert_bit_identical, training_state
from xception_pl.checkpointing import BestCheckpoints
from xception_pl.cli import main
from xception_pl.data import WebDatasetDataModule
from xception_pl.module import XceptionModule

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store holding our writer's shards at s3://data/{train,val} (24 and 6 images of 3 classes), a bucket
    `runs` for run directories, and the environment pointing clients at it (this process's too)."""
    tmp = tmp_path_factory.mktemp("store")
    with services.s3_store(tmp) as env, pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        for bucket in ("data", "runs"):
            fs.mkdir(bucket)
        for name, per_class, shard_size in (("train", 8, 4), ("val", 2, 3)):
            fs.put(str(shards(tmp, name, classes=3, per_class=per_class, shard_size=shard_size)), f"data/{name}",
                   recursive=True)
        yield SimpleNamespace(env=env, fs=fs, tmp=tmp, s3=boto3.client("s3"))


def config(path: Path, run: str, train: str = "s3://data/train", **top) -> Path:
    """One epoch of 6 steps of TinyNetwork on the store's shards (one data worker), last.ckpt every 2 steps."""
    return run_config(
        path, run, model={"network": {"class_path": "tests.crash.TinyNetwork", **top.pop("network", {})}},
        data={"class_path": "xception_pl.data.WebDatasetDataModule",
              "init_args": {"train": train, "val": "s3://data/val", "batch_size": 4, "num_workers": 1,
                            "image_size": 32, "eval_resize": 36, "shuffle_buffer": 8}},
        last_checkpoint={"every_n_train_steps": 2}, **top)


def load(fs: s3fs.S3FileSystem, url: str) -> dict:
    return torch.load(io.BytesIO(fs.cat_file(url)), map_location="cpu", weights_only=True)


def scalars_served(logdir: str, env: dict[str, str], tag: str, log: Path, points: int) -> list[int]:
    """The steps of `tag` as `tensorboard --logdir <logdir>` serves them over HTTP, once it has `points` of them."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag={tag}"
    command = [str(services.BIN / "tensorboard"), "--logdir", logdir, "--host", "127.0.0.1", "--port", str(port),
               "--load_fast", "false", "--reload_interval", "1"]
    with services.server(command, f"http://127.0.0.1:{port}/data/runs", log):
        deadline, steps = time.monotonic() + 60, []
        while len(steps) < points and time.monotonic() < deadline:
            try:
                steps = [step for _, step, _ in json.loads(urllib.request.urlopen(url, timeout=5).read())]
            except OSError:
                pass  # the run is not loaded yet
            time.sleep(0.5)
    return steps


def test_a_run_on_s3_reads_its_shards_writes_everything_there_and_resumes(store, tmp_path):
    """Shards, manifest, checkpoints (last and best), config, TensorBoard: all on the store; `--ckpt_path last`
    finds the newest checkpoint there; `tensorboard --logdir s3://...` shows both fits' steps."""
    run, log = "s3://runs/a", str(tmp_path / "log")
    path = str(config(tmp_path / "c.yaml", run))
    assert run_cli(["fit", "--config", path], log, store.env) == 0, Path(log).read_text()[-3000:]
    names = {key.removeprefix("runs/a/") for key in store.fs.find("runs/a")}
    assert {"config.yaml", "hparams.yaml", "checkpoints/last.ckpt"} <= names, names
    assert any(n.startswith("checkpoints/epoch=0-step=") for n in names) and any(n.startswith("events.") for n in names)
    assert load(store.fs, f"{run}/checkpoints/last.ckpt")["global_step"] == 6

    assert run_cli(["fit", "--config", path, "--trainer.max_epochs", "2", "--ckpt_path", "last"], log, store.env) == 0
    said = Path(log).read_text()
    assert f"resuming from {run}/checkpoints/last.ckpt" in said, said[-3000:]
    assert load(store.fs, f"{run}/checkpoints/last.ckpt")["global_step"] == 12
    assert run_cli(["fit", "--config", path], log, store.env) == 1  # a fresh fit over a run's checkpoints
    assert f"error: {run} already holds checkpoints of an earlier run (last.ckpt)" in Path(log).read_text()

    steps = scalars_served(run, store.env, "train/loss", tmp_path / "tensorboard.log", points=12)
    assert steps == list(range(12)), steps  # one point per step, from the event files of both fits


def test_a_kill_during_a_checkpoint_upload_leaves_no_partial_object_and_the_resume_is_exact(store, tmp_path):
    """A checkpoint of ~24 MB goes up in 5 MiB parts; killed halfway through one, the store holds an unfinished
    multipart upload but no object under its name, and the resumed run ends bit-identical to an uninterrupted
    run on local disk (same shards, downloaded)."""
    big = {"network": {"init_args": {"padding": 3_000_000}},  # 12 MB of buffer, twice with the Polyak average
           "trainer": {"plugins": [{"class_path": "xception_pl.checkpointing.AtomicCheckpointIO",
                                    "init_args": {"part_size": 5 * 2**20}}], "val_check_interval": 3}}
    store.fs.get("data/train", str(tmp_path / "train"), recursive=True)
    local = config(tmp_path / "local.yaml", str(tmp_path / "local"), train=str(tmp_path / "train"), **big)
    assert run_cli(["fit", "--config", str(local)], str(tmp_path / "local.log"), store.env) == 0

    run, log = "s3://runs/killed", str(tmp_path / "log")
    path = str(config(tmp_path / "c.yaml", run, **big))
    killer = ["--trainer.callbacks+=tests.crash.KillAt", "--trainer.callbacks.hook", "checkpoint_write",
              "--trainer.callbacks.at", "2"]  # step 2's last.ckpt, then step 3's best-k checkpoint: killed
    assert run_cli(["fit", "--config", path, *killer], log, store.env) == -9, Path(log).read_text()[-3000:]
    store.fs.invalidate_cache()
    assert store.fs.ls("runs/killed/checkpoints", detail=False) == ["runs/killed/checkpoints/last.ckpt"]
    uploads = store.s3.list_multipart_uploads(Bucket="runs").get("Uploads", [])
    assert [u["Key"].startswith("killed/checkpoints/epoch=0-step=3-") for u in uploads] == [True], uploads
    assert load(store.fs, f"{run}/checkpoints/last.ckpt")["global_step"] == 2

    assert run_cli(["fit", "--config", path, "--ckpt_path", "last"], log, store.env) == 0, Path(log).read_text()[-3000:]
    store.fs.get("runs/killed/checkpoints", str(tmp_path / "killed" / "checkpoints"), recursive=True)
    assert_bit_identical(training_state(tmp_path / "killed"), training_state(tmp_path / "local"))


class NewestBest(BestCheckpoints):
    """Best-k by step: every validation's checkpoint beats the one before, so rotation always removes one."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.monitor, self.filename = "step", "step={step}"


def test_best_k_rotation_on_s3_keeps_the_checkpoint_the_run_resumed_from(store):
    """Lightning removes any remote checkpoint that falls out of the best k, the one the run resumed from
    included (Lightning#21813); in a Trainer built in Python, ours keeps that one and still rotates the others."""
    run = "s3://runs/rotation"
    data = WebDatasetDataModule(train="s3://data/train", val="s3://data/val", batch_size=4, num_workers=0,
                                image_size=32, eval_resize=36, shuffle_buffer=8)

    def fit(max_steps: int, ckpt_path: str | None = None) -> None:
        trainer = tiny_trainer(run, max_steps=max_steps, max_epochs=-1, val_check_interval=2,
                               callbacks=[NewestBest(save_top_k=1)])
        module = XceptionModule(network=TinyNetwork, num_classes=3, multilabel=False, train_size=data.train_size,
                                batch_size=4)
        trainer.fit(module, data, ckpt_path=ckpt_path)

    fit(max_steps=4)
    listed = lambda: sorted(k.rsplit("/", 1)[1] for k in store.fs.ls("runs/rotation/checkpoints", refresh=True))
    assert listed() == ["last.ckpt", "step=4.ckpt"]
    fit(max_steps=8, ckpt_path=f"{run}/checkpoints/step=4.ckpt")
    assert listed() == ["last.ckpt", "step=4.ckpt", "step=8.ckpt"]  # step=6 rotated out; step=4 kept


@pytest.mark.parametrize("override, message", [
    (["--data.init_args.train", "s3://nobucket/train"],
     "train='s3://nobucket/train': s3://nobucket/train/manifest.json: the bucket does not exist"),
    (["--data.init_args.train", "s3://data/nothing"], "s3://data/nothing/manifest.json: nothing there"),
    (["--data.init_args.train", "s3://data/train/train-{000000..000009}.tar"], "4 of 10 shards do not exist"),
    (["--trainer.default_root_dir", "s3://nobucket/run"],
     "trainer.default_root_dir s3://nobucket/run: the bucket does not exist"),
], ids=["bucket", "object", "shards", "run-bucket"])
def test_a_missing_bucket_or_object_stops_before_training_in_one_line(store, tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config(tmp_path / "c.yaml", "s3://runs/never")), *override])
    assert message in str(stop.value.code), stop.value.code
    assert not store.fs.exists("runs/never")


def test_missing_credentials_stop_before_training_in_one_line(store, tmp_path):
    env = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    result = run_module("fit", "--config", str(config(tmp_path / "c.yaml", "s3://runs/never")), env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: train='s3://data/train': s3://data/train/manifest.json: no credentials for the store: set "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), result.stderr[-2000:]
