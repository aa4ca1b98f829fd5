"""Launching beyond sbatch: `torchrun --nproc_per_node 2` on CPU, SIGTERM in the middle of an epoch (how
Kubernetes and torchrun preempt), every rank saves at an agreed batch end, and `--ckpt_path last` resumes to
the final step of an uninterrupted run; and without a launcher, where Lightning starts rank 1 itself."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 12


def command(tmp_path: Path, *extra: str, torchrun: bool = True) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    return [sys.executable, *(launcher if torchrun else []), "-m", "xception_pl", "fit",
            "--config", "configs/smoke.yaml",
            "--data", "xception_pl.data.synthetic.SyntheticDataModule", "--data.init_args.image_size", "32",
            "--data.init_args.train_size", "64", "--data.init_args.batch_size", "2",
            "--data.init_args.num_workers", "1",  # torchrun signals the process group: workers outlive SIGTERM
            "--model.network", "tests.crash.TinyNetwork", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.max_steps", str(MAX_STEPS), "--trainer.max_epochs", "1",
            "--trainer.log_every_n_steps", "2", "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(tmp_path / "run"), *extra]


def wait_for(marker: Path, process: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), process.communicate(timeout=60)[0][-3000:]


def test_sigterm_under_torchrun_saves_on_every_rank_and_the_run_resumes_to_the_same_final_step(tmp_path):
    marker = tmp_path / "step3"
    slow = ["--trainer.callbacks+=tests.probes.SlowSteps", f"--trainer.callbacks.marker={marker}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    process = subprocess.Popen(command(tmp_path, *slow), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(marker, process)
    process.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to its workers
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0  # stopped, not finished
    assert "SIGTERM: saved" in output, output[-3000:]
    [saved] = list((tmp_path / "run").glob("hpc_ckpt_*.ckpt"))
    stopped_at = torch.load(saved, weights_only=True)["global_step"]
    assert 3 <= stopped_at < MAX_STEPS

    resumed = subprocess.run(command(tmp_path, "--ckpt_path", "last"), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == MAX_STEPS  # what an uninterrupted run of max_steps ends at
    assert f"resuming from {saved}" in resumed.stdout + resumed.stderr


def test_sigterm_to_the_main_process_of_a_fit_that_lightning_launched_reaches_every_rank(tmp_path):
    """No launcher: Lightning starts rank 1 itself. A SIGTERM to the main process alone (`kill <pid>`, a
    container stop) reaches rank 1 through Lightning's launcher (docs/code.md "Seams": `launcher.kill`), both ranks
    save at the agreed batch end and exit, and no rank is left running."""
    marker, noted = tmp_path / "step3", tmp_path / "noted"
    probes = ["--trainer.callbacks+=tests.probes.SlowSteps", f"--trainer.callbacks.marker={marker}",
              "--trainer.callbacks+=tests.probes.SignalsNoted", f"--trainer.callbacks.output={noted}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    process = subprocess.Popen(command(tmp_path, *probes, torchrun=False), cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(marker, process)
    process.send_signal(signal.SIGTERM)  # to the main process (rank 0) only, not its process group
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM and "SIGTERM: saved" in output, output[-3000:]
    ranks = [json.loads((tmp_path / f"noted.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["signal"] for rank in ranks] == [signal.SIGTERM] * 2  # rank 1 got the signal, not only the news
    [saved] = list((tmp_path / "run").glob("hpc_ckpt_*.ckpt"))
    assert 3 <= torch.load(saved, weights_only=True)["global_step"] < MAX_STEPS
    deadline = time.time() + 30
    while running(ranks[1]["pid"]) and time.time() < deadline:
        time.sleep(0.2)
    assert not running(ranks[1]["pid"]), "rank 1 is still running"


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited and waits for its new parent to reap it


def resumable_fit(tmp_path: Path, devices: int, *extra: str) -> subprocess.CompletedProcess:
    """One epoch of 64 demo images (batch 2 per rank) into tmp_path/run, on 1 process or 2 under torchrun;
    last.ckpt every 4 steps, so a kill leaves a position in the middle of the epoch."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    command = [sys.executable, *(launcher if devices > 1 else []), "-m", "xception_pl", "fit",
               "--config", "configs/smoke.yaml", "--data.init_args.root", str(tmp_path / "demo"),
               "--data.init_args.num_classes", "4", "--data.init_args.train_images_per_class", "16",
               "--data.init_args.val_images_per_class", "1", "--data.init_args.source_size", "40",
               "--data.init_args.image_size", "32", "--data.init_args.eval_resize", "36",
               "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "1",
               "--model.network", "tests.crash.TinyNetwork", "--last_checkpoint.every_n_train_steps", "4",
               "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
               "--trainer.strategy", "ddp" if devices > 1 else "auto", "--trainer.max_epochs", "1",
               "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(tmp_path / "run"), *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("before, after", [
    pytest.param(2, 1, marks=pytest.mark.slow),  # the same conversion as 1-rank-to-2, the other way
    (1, 2)], ids=["2-ranks-to-1", "1-rank-to-2"])
def test_a_mid_epoch_resume_on_another_world_size_keeps_the_epochs_length(tmp_path, before, after):
    from xception_pl.data import make_demo_data

    make_demo_data(str(tmp_path / "demo"), num_classes=4, train_images_per_class=16, val_images_per_class=1,
                   source_size=40)  # once, before the ranks start
    batches_before = 64 // (2 * before)  # batches per rank in the epoch
    kill = ["--trainer.callbacks+=tests.crash.KillAt", "--trainer.callbacks.hook=train_step",
            f"--trainer.callbacks.at={batches_before // 2 + 1}"]  # past the last.ckpt of the epoch's middle
    assert resumable_fit(tmp_path, before, *kill).returncode != 0
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert saved == batches_before // 2
    resumed = resumable_fit(tmp_path, after, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    samples = saved * 2 * before + (final["global_step"] - saved) * 2 * after
    assert abs(samples - 64) < 2 * after  # one epoch: on 2 ranks the rest was skipped, on 1 it was 1.25 epochs
    assert final["DemoDataModule"]["epoch"] == 1 and final["DemoDataModule"]["batch"] == 0  # the epoch ended


def test_a_stop_request_to_a_job_hung_in_a_collective_ends_every_rank_with_its_stacks(tmp_path):
    """Rank 1 stops dead after step 3; rank 0 waits for it in the next gradient all-reduce, in C++, where no
    Python signal handler runs. SIGTERM to both (as torchrun and SLURM send it): each rank says it is stuck,
    prints its Python stacks and exits 143 within the watchdog's timeout (5 s here)."""
    marker = tmp_path / "hung"
    hang = ["--trainer.callbacks+=tests.probes.HangAt", f"--trainer.callbacks.marker={marker}",
            "--faults.stop_timeout_s", "5"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    process = subprocess.Popen(command(tmp_path, *hang, torchrun=False), cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(marker, process)
    time.sleep(1)  # rank 0 is in the all-reduce by now
    sent = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    try:
        output = process.communicate(timeout=60)[0]
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    assert process.returncode == 128 + signal.SIGTERM and time.monotonic() - sent < 30, output[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: SIGTERM received, but no progress for 5 s" in output, output[-3000:]
        assert "It was in phase 'training'" in output
    assert output.count("most recent call first") >= 2  # every thread's stack, on both ranks
    assert "time.sleep" in output or "HangAt" in output or "probes.py" in output  # rank 1's own stack


def test_a_stop_saves_within_seconds_when_the_next_logging_step_is_more_than_30_s_away(tmp_path):
    """Under torchrun, which follows SIGTERM with SIGKILL after 30 s: SIGTERM after step 3 of 1 s steps, logging
    every 40 steps. The ranks agree on the stop every ~5 s in between (RequeueOnSignal.stop_check_s) and save
    long before the SIGKILL; the DataLoader workers, signalled too, are still serving."""
    marker = tmp_path / "step3"
    slow = ["--trainer.callbacks+=tests.probes.SlowSteps", f"--trainer.callbacks.marker={marker}",
            "--trainer.callbacks.seconds=1.0", "--trainer.log_every_n_steps=40", "--trainer.max_steps=60",
            "--data.init_args.train_size=256"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    process = subprocess.Popen(command(tmp_path, *slow), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(marker, process)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert "SIGTERM: saved" in output and "forcefully exiting via 9" not in output, output[-3000:]
    assert time.monotonic() - sent < 25
    [saved] = list((tmp_path / "run").glob("hpc_ckpt_*.ckpt"))
    assert 3 <= torch.load(saved, weights_only=True)["global_step"] < 40  # not at the next logging step


# ------------------------------------------------------------------------------------------ nothing hangs
def start(tmp_path: Path, *extra: str, torchrun: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.Popen(command(tmp_path, *extra, torchrun=torchrun), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float) -> str:
    """The job's output once every process of it (the orphans too) has closed it; the group is killed after."""
    try:
        return process.communicate(timeout=timeout)[0]
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher, hook", [("torchrun", "train_step"), ("lightning", "validation")])
def test_a_rank_killed_in_a_step_or_in_validation_ends_the_job_within_seconds_and_it_resumes(tmp_path, launcher,
                                                                                               hook):
    """kill -9 of rank 1 (after step 5's backward, or in the first batch of a validation at step 8): the job
    exits non-zero, naming rank 1, within 30 s (torchrun's agent, or Lightning's launcher, ends the survivor;
    our heartbeat would after faults.peer_timeout_s); `--ckpt_path last` then trains to the end."""
    marker = tmp_path / "killed"
    validation = ["--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "8",
                  "--last_checkpoint.every_n_train_steps", "4"]
    killer = ["--trainer.callbacks+=tests.crash.KillAt", f"--trainer.callbacks.hook={hook}",
              f"--trainer.callbacks.at={5 if hook == 'train_step' else 1}", "--trainer.callbacks.rank=1",
              f"--trainer.callbacks.marker={marker}"]
    process = start(tmp_path, *validation, *killer, torchrun=launcher == "torchrun")
    output = finish(process, timeout=200)
    assert marker.exists() and process.returncode != 0, output[-3000:]
    assert time.time() - marker.stat().st_mtime < 30, output[-3000:]
    named = "rank      : 1" in output if launcher == "torchrun" else "[rank: 1] Child process" in output
    assert named, output[-3000:]

    resumed = subprocess.run(command(tmp_path, *validation, "--ckpt_path", "last", torchrun=launcher == "torchrun"),
                             cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == MAX_STEPS


@pytest.mark.timeout(180)
def test_a_rank_whose_rank_0_died_learns_it_from_the_heartbeat_and_exits(tmp_path):
    """Lightning's launcher: rank 0 (the main process, which holds the rendezvous store) is killed while rank 1
    sleeps in a step, in Python, where no collective would ever tell it. Rank 1 exits 75 within
    faults.peer_timeout_s (5 s here) + a beat, naming rank 0, with its stacks; no launcher is left to do it."""
    marker = tmp_path / "hung"
    process = start(tmp_path, "--trainer.callbacks+=tests.probes.HangAt", f"--trainer.callbacks.marker={marker}",
                    "--faults.peer_timeout_s", "5", torchrun=False)
    wait_for(marker, process)
    killed = time.monotonic()
    process.kill()  # rank 0
    output = finish(process, timeout=120)  # the pipe closes when rank 1 (and its data worker) are gone
    assert time.monotonic() - killed < 5 + 5 + 10, output[-3000:]
    # the store's connection either fails or goes silent: either way the line names rank 0
    assert "rank 1: the rendezvous store" in output and "rank 0" in output, output[-3000:]
    assert "exiting so the job does not wait for the collective timeout" in output
    assert "probes.py" in output  # rank 1's own stack: where it was


@pytest.mark.timeout(180)
def test_a_stalled_rank_ends_every_rank_with_its_stacks_and_sigusr2_shows_them_without_stopping(tmp_path):
    """Rank 1 sleeps in a step; rank 0 waits for it in a collective. SIGUSR2 to the job: both ranks print their
    stacks and go on; then no batch has ended for faults.stall_timeout_s (10 s here): each rank says so, with the
    step and phase it was in and its stacks, and exits 124."""
    marker = tmp_path / "hung"
    process = start(tmp_path, "--trainer.callbacks+=tests.probes.HangAt", f"--trainer.callbacks.marker={marker}",
                    "--faults.stall_timeout_s", "10", torchrun=False)
    wait_for(marker, process)
    time.sleep(1)
    os.killpg(process.pid, signal.SIGUSR2)
    time.sleep(3)
    assert process.poll() is None  # SIGUSR2 stops nothing
    output = finish(process, timeout=120)
    assert process.returncode == 124, output[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: SIGUSR2: the stacks asked for (the run goes on)" in output, output[-3000:]
        assert f"rank {rank}: no batch ended for 10 s (faults.stall_timeout_s)" in output, output[-3000:]
    assert "It was in phase 'training', step 3" in output
    assert output.count("probes.py") >= 2  # rank 1's stack, on demand and at the exit
