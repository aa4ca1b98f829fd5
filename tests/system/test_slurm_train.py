"""The sbatch scripts end to end on the private two-node SLURM cluster (tests/slurm/), on CPU.

DDP over gloo across node1 and node2, SIGUSR1 -> hpc checkpoint -> requeue -> resume, and wrong
launches that must fail at once with the fix instead of hanging. Each job trains Xception at 71 px,
batch 4, on small demo shards in tmp_path; tests/slurm_probe.py reports each rank's node and weights.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import IMAGE, scalars
from tests.slurm import JobResult, SlurmCluster
from xception_pl import slurm
from xception_pl.data import make_demo_data

ROOT = Path(__file__).resolve().parents[2]
BATCH = 4
DEMO = dict(num_classes=4, train_images_per_class=8, val_images_per_class=4, source_size=80)  # 4 steps/epoch on 2 ranks
JOB_ENV = {"PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}  # 2 ranks share 2 cores


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    for multilabel in (False, True):  # built here once, not by two ranks at once
        make_demo_data(str(root), multilabel=multilabel, **DEMO)
    return root


def cpu_config(job_dir: Path, demo_root: Path, multilabel: bool, max_steps: int, num_workers: int = 1) -> Path:
    """What turns the GPU recipes into a short CPU run; given after configs/<recipe>.yaml on the command line
    (an overlay on the recipe, so not tests.helpers.run_config, whose defaults would replace the recipe's)."""
    config = {
        "trainer": {"accelerator": "cpu", "precision": "32-true", "max_steps": max_steps, "limit_val_batches": 1,
                    "val_check_interval": 1.0, "check_val_every_n_epoch": 1, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False},
        # The network: what these tests check is SLURM's and DDP's (tasks, ranks, requeue, identical replicas), and
        # Xception's 250 MB checkpoints made each job take a minute; the recipes' Xception trains in test_cli.
        "model": {"channels_last": False, "network": {"class_path": "tests.crash.TinyNetwork"}},
        "ema": {"decay": 0.5},
        "data": {"class_path": "xception_pl.data.DemoDataModule",
                 "init_args": {"root": str(demo_root), "multilabel": multilabel, "num_classes": DEMO["num_classes"],
                               "train_images_per_class": DEMO["train_images_per_class"],
                               "val_images_per_class": DEMO["val_images_per_class"], "source_size": DEMO["source_size"],
                               "batch_size": BATCH, "num_workers": num_workers, "image_size": IMAGE,
                               "eval_resize": 80}},
    }
    path = job_dir / "cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def submit(cluster: SlurmCluster, job_dir: Path, script: str | Path, *cli_args: str, **sbatch_opts: object) -> str:
    """sbatch from job_dir, as a user does from the repository root: configs/ beside it, the script's own
    --output pattern (slurm-%x-%j.out) and run directory (runs/<job name>). The probe is appended to the
    callbacks on the command line (a config's list would replace the recipe's callbacks)."""
    (job_dir / "configs").symlink_to(ROOT / "configs")
    return cluster.sbatch(script, *cli_args, "--trainer.callbacks+=tests.slurm_probe.RankProbe", env=JOB_ENV,
                          chdir=str(job_dir), output=None, cpus_per_task=1, **sbatch_opts)


def job_output(result: JobResult) -> str:
    return result.std_out.read_text(errors="replace")


def probes(run: Path, restart: int) -> list[dict]:
    return [json.loads((run / "probe" / f"rank{r}-restart{restart}.json").read_text()) for r in (0, 1)]


def final_step_and_samples(run: Path) -> tuple[int, int]:
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return checkpoint["global_step"], checkpoint["lr_schedulers"][0]["samples_seen"]


def logged_train_steps(events_file: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sorted({e.step for e in EventFileLoader(str(events_file)).Load()
                   if any(v.tag == "train/loss" for v in e.summary.value)})


# ------------------------------------------------------------------------------------------ DDP across nodes
@pytest.mark.timeout(300)
@pytest.mark.parametrize("script, multilabel", [("train_jft.sh", True), ("train_imagenet.sh", False)])
def test_script_trains_ddp_across_two_nodes_with_identical_weights(slurm_cluster, demo_root, tmp_path, script,
                                                                   multilabel):
    steps = 6
    job = submit(slurm_cluster, tmp_path, ROOT / "slurm" / script,
                 "--config", str(cpu_config(tmp_path, demo_root, multilabel, steps)),
                 nodes=2, ntasks_per_node=1, gres="gpu:1")
    result = slurm_cluster.wait(job, timeout=270)
    output = job_output(result)
    assert result.state == "COMPLETED", output

    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in output
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    run = tmp_path / "runs" / script.removeprefix("train_").removesuffix(".sh")  # runs/$SLURM_JOB_NAME
    rank0, rank1 = probes(run, restart=0)
    assert (rank0["node"], rank1["node"]) == ("node1", "node2")
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == steps
    assert rank0["params_sha256"] == rank1["params_sha256"]  # DDP kept the replicas identical

    # rank 0 alone writes: one event file in the run directory, one last.ckpt, one config
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert not list(run.glob("version_*")) and (run / "config.yaml").is_file()
    assert [s for s, _ in scalars(run)["train/loss"]] == list(range(steps))
    assert final_step_and_samples(run) == (steps, steps * BATCH * 2)  # samples count both ranks
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert (hparams["multilabel"], hparams["num_classes"]) == (multilabel, DEMO["num_classes"])

    env = (run / "slurm" / f"job-{job}-restart0.env").read_text()
    assert f"SLURM_JOB_ID={job}\n" in env and "SLURM_NTASKS=2\n" in env
    assert (run / "slurm" / f"job-{job}-restart0.sh").read_text() == (ROOT / "slurm" / script).read_text()


# ------------------------------------------------------------------------------------------ requeue
@pytest.mark.timeout(360)
def test_sigusr1_saves_requeues_and_the_job_finishes_where_an_uninterrupted_run_would(slurm_cluster, demo_root,
                                                                                      tmp_path):
    steps = 10
    job = submit(slurm_cluster, tmp_path, ROOT / "slurm" / "train_imagenet.sh",
                 "--config", str(cpu_config(tmp_path, demo_root, multilabel=False, max_steps=steps, num_workers=1)),
                 nodes=2, ntasks_per_node=1, gres="gpu:1", job_name="requeued")
    run = tmp_path / "runs" / "requeued"
    for rank in (0, 1):  # a signal sent before the handlers exist would be lost
        slurm_cluster.wait_for_file(run / "probe" / f"started-rank{rank}-restart0", timeout=200, job_id=job)
    slurm_cluster.signal(job, "USR1")  # what --signal=SIGUSR1@90 sends: to the srun tasks
    result = slurm_cluster.wait(job, timeout=300)
    output = job_output(result)
    assert result.state == "COMPLETED", output
    assert result.restarts == 1, output

    before, after = output.split("resuming from", 1)
    # Once, by rank 0 at a batch end all ranks agreed on; Lightning's in-handler save is not installed.
    assert before.count("SIGUSR1: saved runs/requeued/hpc_ckpt_1.ckpt; exiting") == 1, output
    assert f"requeued SLURM job {job}; it resumes from runs/requeued/hpc_ckpt_1.ckpt" in before
    assert "Handling auto-requeue signal" not in output
    resumed_step = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 1 <= resumed_step < steps
    assert after.startswith(" runs/requeued/hpc_ckpt_1.ckpt\n"), after
    assert (run / "probe" / "started-rank0-restart1").read_text() == str(resumed_step + 1)

    rank0, rank1 = probes(run, restart=1)
    assert rank0["global_step"] == rank1["global_step"] == steps
    assert rank0["params_sha256"] == rank1["params_sha256"]
    assert final_step_and_samples(run) == (steps, steps * BATCH * 2)  # as uninterrupted: schedule intact
    # events.out.tfevents.<creation time>.<host>.<pid>.<n>: the requeued run's file is the newest (the first
    # run may have two: the SIGUSR1 handler closes the logger, and steps before the kill open another)
    *_, resumed_events = sorted(run.glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3]))
    assert logged_train_steps(resumed_events) == list(range(resumed_step, steps))  # continued, not from 0
    assert [s for s, _ in scalars(run)["train/loss"]] == list(range(steps))  # the whole curve, once
    assert "SLURM_RESTART_COUNT=1\n" in (run / "slurm" / f"job-{job}-restart1.env").read_text()


@pytest.mark.timeout(360)
def test_a_rank_killed_mid_step_ends_the_job_at_once_and_a_resubmission_resumes(slurm_cluster, demo_root, tmp_path):
    """kill -9 of rank 1 (node2) after step 6's backward: `srun --kill-on-bad-exit=1` (the scripts' launch) ends
    rank 0 within seconds instead of the collective timeout; the job fails naming the task; the same script
    submitted again resumes from last.ckpt (step 4) and finishes."""
    steps, marker = 10, tmp_path / "killed"
    config = str(cpu_config(tmp_path, demo_root, multilabel=False, max_steps=steps))
    every = ["--last_checkpoint.every_n_train_steps", "2"]
    job = submit(slurm_cluster, tmp_path, ROOT / "slurm" / "train_imagenet.sh", "--config", config, *every,
                 "--trainer.callbacks+=tests.crash.KillAt", "--trainer.callbacks.hook=train_step",
                 "--trainer.callbacks.at=7", "--trainer.callbacks.rank=1", f"--trainer.callbacks.marker={marker}",
                 nodes=2, ntasks_per_node=1, gres="gpu:1", job_name="killed")
    result = slurm_cluster.wait(job, timeout=300)
    output = job_output(result)
    assert result.state == "FAILED" and marker.exists(), output
    assert "task 1: Killed" in output, output  # srun names the task
    ended = datetime.fromisoformat(result.info["EndTime"]).timestamp()  # scontrol's local time, in whole seconds
    assert ended - marker.stat().st_mtime < 30, (result.info["EndTime"], output)  # not the collective timeout
    (tmp_path / "configs").unlink()
    job = submit(slurm_cluster, tmp_path, ROOT / "slurm" / "train_imagenet.sh", "--config", config, *every,
                 nodes=2, ntasks_per_node=1, gres="gpu:1", job_name="killed")
    result = slurm_cluster.wait(job, timeout=300)
    output = job_output(result)
    assert result.state == "COMPLETED" and "resuming from" in output, output
    assert final_step_and_samples(tmp_path / "runs" / "killed") == (steps, steps * BATCH * 2)


# ------------------------------------------------------------------------------------------ wrong launches
NO_SRUN = """#!/bin/bash
#SBATCH --output=slurm-%x-%j.out
${PYTHON:-python} -m xception_pl fit --config configs/imagenet.yaml --trainer.num_nodes 2 --trainer.devices 1 "$@"
"""


@pytest.mark.timeout(200)
@pytest.mark.parametrize("case, script, cli_args, sbatch_opts, message", [
    ("no srun", NO_SRUN, [], dict(nodes=2, ntasks_per_node=1),
     "this SLURM job has 2 tasks but this process was not started by srun"),
    ("tasks != GPUs", "train_imagenet.sh", [], dict(nodes=1, ntasks_per_node=1, gres="gpu:2"),
     "2 GPUs per node (--gres=gpu:2) but 1 tasks per node (--ntasks-per-node=1); Lightning runs one task per GPU. "
     "Submit with --ntasks-per-node=2 --gres=gpu:2"),
    ("devices != tasks", "train_imagenet.sh", ["--trainer.devices", "1"],
     dict(nodes=1, ntasks_per_node=2, gres="gpu:2"),
     "error: You set `devices=1` in Lightning, but the number of tasks per node configured in SLURM "
     "`--ntasks-per-node=2` does not match. HINT: Set `devices=2`."),
])
def test_wrong_launch_fails_fast_with_the_fix(slurm_cluster, demo_root, tmp_path, case, script, cli_args, sbatch_opts,
                                               message):
    script = ROOT / "slurm" / script if script.endswith(".sh") else script
    config = cpu_config(tmp_path, demo_root, multilabel=False, max_steps=2)
    job = submit(slurm_cluster, tmp_path, script, "--config", str(config), *cli_args, **sbatch_opts)
    result = slurm_cluster.wait(job, timeout=180)
    output = job_output(result)
    assert result.state == "FAILED", output
    assert message in output
    assert "Traceback" not in output  # one line with the fix, not a stack per rank
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


# ------------------------------------------------------------------------------------------ unit: the checks
SRUN_STEP = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8",
             "SLURM_STEP_ID": "0", "SLURM_PROCID": "3"}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("env, problem", [
    ({}, None),  # not a SLURM job
    (SRUN_STEP, None),
    ({**SRUN_STEP, "SLURM_STEP_ID": "4294967291"}, "not started by srun"),  # the batch step of newer SLURM
    ({k: v for k, v in SRUN_STEP.items() if k != "SLURM_STEP_ID"}, "not started by srun"),  # 22.05's batch shell
    ({**SRUN_STEP, "SLURM_JOB_NAME": "interactive", "SLURM_STEP_ID": "4294967290"}, None),  # Lightning spawns
    ({**SRUN_STEP, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_STEP_ID": "4294967291",
      "SLURM_GPUS_ON_NODE": "1"}, None),  # one task needs no srun
    ({**SRUN_STEP, "SLURM_GPUS_ON_NODE": "4"}, "4 GPUs per node (--gres=gpu:4) but 8 tasks per node"),
    ({**SRUN_STEP, "SLURM_GPUS_ON_NODE": None, "SLURM_GPUS_PER_NODE": "h100:4", "SLURM_NTASKS_PER_NODE": None,
      "SLURM_TASKS_PER_NODE": "8(x2)"}, "4 GPUs per node"),
])
def test_launch_error_names_the_fix(env, problem):
    env = {k: v for k, v in env.items() if v is not None}
    error = slurm.launch_error(env)
    assert (error is None) if problem is None else (problem in error)


@pytest.mark.timeout(30)
def test_record_run_without_scontrol_keeps_the_environment_and_says_requeue_cannot_work(tmp_path, monkeypatch,
                                                                                         caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with caplog.at_level(logging.ERROR, logger="xception_pl.slurm"):
        slurm.record_run(tmp_path / "run")
    assert "SLURM_JOB_ID=42\n" in (tmp_path / "run" / "slurm" / "job-42-restart3.env").read_text()
    assert "SLURM requeue cannot work" in caplog.text
    assert not list((tmp_path / "run" / "slurm").glob(".*tmp*"))  # written atomically, nothing left over


@pytest.mark.timeout(60)
def test_forked_children_of_a_training_task_ignore_sigusr1():
    """SLURM signals every process of the step; a forked DataLoader worker must neither die of SIGUSR1
    nor run the training process's handler."""
    code = textwrap.dedent("""
        import os, signal
        from xception_pl import slurm
        signal.signal(signal.SIGUSR1, lambda *args: None)  # the training process's handler
        slurm.ignore_stop_signals_in_forked_children()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN else 1)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), signal.getsignal(signal.SIGUSR1) != signal.SIG_IGN)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert result.stdout.split() == ["0", "True"], result.stderr
