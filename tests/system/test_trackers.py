"""MLflow and W&B beside TensorBoard, through the CLI: one tracker run per training run across a kill and a
resume, no step logged twice, the config and the best checkpoint as artifacts. Against a real `mlflow server`
(SQLite) on 127.0.0.1 and W&B offline, whose run files are read back. And the extras: without them the rest
works, and asking for one names it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient
from wandb.proto import wandb_internal_pb2

from tests import services
from tests.crash import run_cli
from tests.helpers import ROOT, free_port, run_config, scalars, synthetic_data
from xception_pl.cli import main

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    with services.mlflow_server(tmp) as uri:
        yield uri


def config(path: Path, run: Path, loggers: list[dict]) -> Path:
    """Two epochs of 6 steps of TinyNetwork (24 synthetic images), last.ckpt every 2 steps, validation every 3;
    TensorBoard in the run directory beside the given loggers."""
    tensorboard = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(run), "name": "", "version": "", "default_hp_metric": False}}
    return run_config(path, run, model={"network": {"class_path": "tests.crash.TinyNetwork"}},
                      data=synthetic_data(train_size=24),
                      trainer={"max_epochs": 2, "val_check_interval": 3, "num_sanity_val_steps": 0,
                               "logger": [tensorboard, *loggers]},
                      last_checkpoint={"every_n_train_steps": 2})


def wandb_records(run_dir: Path) -> list:
    """The records of a W&B offline run's .wandb file (W&B's LevelDB-style log: 32 KiB blocks of chunks with a
    7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST), as W&B's protobuf Records."""
    [path] = run_dir.glob("*.wandb")
    data, position, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(run_dir: Path) -> tuple[str, list[int], dict]:
    """(run id, the trainer steps of its train/loss points, its config) of a W&B offline run directory."""
    run_id, steps, values = None, [], {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "train/loss" in items:
                steps.append(items["trainer/global_step"])
        elif kind == "config":
            values.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in record.config.update})
    return run_id, steps, values


def test_a_killed_and_resumed_run_is_one_tracker_run_without_repeated_steps(tracking_uri, tmp_path):
    """Killed in its second validation (step 6; last.ckpt at step 4, steps 4 and 5 already logged), then resumed
    with --ckpt_path last: MLflow holds one run whose every metric has each step once, in order, the config and
    the best checkpoint; W&B offline wrote both attempts under one run id, the second from the checkpoint's step;
    TensorBoard beside them has every step."""
    run, log = tmp_path / "run", str(tmp_path / "log")
    loggers = [{"class_path": "lightning.pytorch.loggers.MLFlowLogger",
                "init_args": {"tracking_uri": tracking_uri, "experiment_name": "resumed"}},
               {"class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"offline": True, "project": "resumed", "save_dir": str(tmp_path)}}]
    path = str(config(tmp_path / "c.yaml", run, loggers))
    env = {"WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}
    killer = ["--trainer.callbacks+=tests.crash.KillAt", "--trainer.callbacks.hook", "validation",
              "--trainer.callbacks.at", "3"]  # validation batches: 2 at step 3, then the first at step 6
    assert run_cli(["fit", "--config", path, *killer], log, env) == -9, Path(log).read_text()[-3000:]
    assert run_cli(["fit", "--config", path, "--ckpt_path", "last"], log, env) == 0, Path(log).read_text()[-3000:]

    client = MlflowClient(tracking_uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "resumed"]
    [tracked] = client.search_runs([experiment.experiment_id], run_view_type=3)  # 3: active and deleted
    for key in set(tracked.data.metrics) - {"epoch"}:  # Lightning adds "epoch" to the train and val logs of a step
        steps = [m.step for m in client.get_metric_history(tracked.info.run_id, key)]
        assert steps == sorted(set(steps)), (key, steps)
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "train/loss")] == list(range(12))
    assert tracked.data.params["optimizer/init_args/lr"] == "0.01"
    artifacts = {a.path for folder in ("config", "checkpoints")
                 for a in client.list_artifacts(tracked.info.run_id, folder)}
    best = client.get_run(tracked.info.run_id).data.tags["best_checkpoint"]
    assert artifacts == {"config/config.yaml", best} and (run / best).is_file(), (artifacts, best)

    # W&B offline: the killed attempt's directory is named with the run id, its records lost with the process
    # (wandb-core writes them at the run's end); the resumed attempt continues that run from the checkpoint's step.
    killed, resumed = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_id, steps, wandb_config = wandb_run(resumed)
    assert killed.name.endswith(f"-{run_id}") and resumed.name.endswith(f"-{run_id}")
    assert steps == list(range(4, 12)), steps
    assert wandb_config["config"]["trainer"]["max_epochs"] == 2  # the CLI's config.yaml

    assert [step for step, _ in scalars(run)["train/loss"]] == [*range(6), *range(4, 12)]  # TensorBoard keeps both


def test_an_unreachable_mlflow_server_stops_before_training_in_one_line(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    mlflow = {"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": {"tracking_uri": uri}}
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config(tmp_path / "c.yaml", tmp_path / "run", [mlflow]))])
    assert str(stop.value.code).startswith(f"error: cannot reach the MLflow tracking server at {uri}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_without_the_extras_the_rest_works_and_asking_for_one_names_it(tmp_path):
    """s3fs, mlflow and wandb made unimportable, as where they are not installed: a local fit runs; an s3://
    URL, an MLFlowLogger and a WandbLogger each stop with the extra that installs them."""
    script = textwrap.dedent(f"""
        import sys
        for name in ("s3fs", "mlflow", "wandb"):
            sys.modules[name] = None  # import raises ModuleNotFoundError, as without the package
        from xception_pl.cli import main

        def stop(*args):
            try:
                main(["fit", "--config", {str(tmp_path / "c.yaml")!r}, *args])
                print("STOP done")
            except SystemExit as exit:
                print("STOP", exit.code)

        stop("--trainer.default_root_dir", {str(tmp_path / "local")!r})
        stop("--trainer.default_root_dir", "s3://bucket/run")
        stop("--trainer.logger", "lightning.pytorch.loggers.MLFlowLogger")
        stop("--trainer.logger", "lightning.pytorch.loggers.WandbLogger")
    """)
    run_config(tmp_path / "c.yaml", tmp_path / "unused", model={"network": {"class_path": "tests.crash.TinyNetwork"}})
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    stops = [line for line in result.stdout.splitlines() if line.startswith("STOP")]
    assert len(stops) == 4, result.stdout[-2000:] + result.stderr[-3000:]
    assert stops[0] == "STOP done" and (tmp_path / "local" / "checkpoints" / "last.ckpt").is_file()
    for said, extra in zip(stops[1:], ("s3", "mlflow", "wandb")):
        assert said.startswith("STOP error: ") and said.endswith(f"pip install 'xception_pl[{extra}]'"), said
