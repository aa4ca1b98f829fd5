"""Launching beyond sbatch: `torchrun --nproc_per_node 2` on CPU, SIGTERM in the middle of an epoch (how
Kubernetes and torchrun preempt), every rank saves at an agreed batch end, and `--ckpt_path last` resumes to
the final step of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 12


def command(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "xception_pl", "fit", "--config", "configs/smoke.yaml",
            "--data", "xception_pl.data.synthetic.SyntheticDataModule", "--data.init_args.image_size", "32",
            "--data.init_args.train_size", "64", "--data.init_args.batch_size", "2",
            "--data.init_args.num_workers", "0",  # torchrun signals the process group: workers die of SIGTERM
            "--model.network", "tests.crash.TinyNetwork", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.max_steps", str(MAX_STEPS), "--trainer.max_epochs", "1",
            "--trainer.log_every_n_steps", "2", "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(tmp_path / "run"), *extra]


def test_sigterm_under_torchrun_saves_on_every_rank_and_the_run_resumes_to_the_same_final_step(tmp_path):
    marker = tmp_path / "step3"
    slow = ["--trainer.callbacks+=tests.probes.SlowSteps", f"--trainer.callbacks.marker={marker}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    process = subprocess.Popen(command(tmp_path, *slow), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), process.communicate(timeout=60)[0][-3000:]
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
