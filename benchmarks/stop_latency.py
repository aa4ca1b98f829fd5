"""Seconds from SIGTERM to a durable stop checkpoint on every rank, on CPU (docs/reliability.md).

`PYTHONPATH=. python benchmarks/stop_latency.py --ranks 2 4`: for each rank count, `torchrun --nproc_per_node N`
trains Xception (the real one: its checkpoint, with SGD momentum and the Polyak average, is what a stop writes)
at 71 px on synthetic data, logging every 1000 steps so that the stop waits for the ranks' ~5 s agreement, not a
logging step. After step 3 the whole process group gets SIGTERM (as torchrun and Kubernetes send it); the time
until hpc_ckpt_1.ckpt exists (written to a temporary file, fsynced, renamed: durable when it appears) and until
torchrun exits is measured. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.helpers import free_port  # noqa: E402


def measure(ranks: int, work: Path) -> tuple[float, float, int]:
    marker, run = work / f"started-{ranks}", work / f"run-{ranks}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(free_port()), "-m", "xception_pl", "fit", "--config", "configs/smoke.yaml",
               "--data", "xception_pl.data.synthetic.SyntheticDataModule", "--data.init_args.image_size", "71",
               "--data.init_args.train_size", "4096", "--data.init_args.batch_size", "2",
               "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.devices", str(ranks),
               "--trainer.strategy", "ddp", "--trainer.max_steps", "1000", "--trainer.log_every_n_steps", "1000",
               "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(run),
               "--trainer.callbacks+=tests.probes.TouchAt", f"--trainer.callbacks.marker={marker}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    while not marker.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{ranks} ranks: the fit ended before step 3 (exit {process.returncode})")
        time.sleep(0.05)
    sent = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    checkpoint = run / "hpc_ckpt_1.ckpt"
    while not checkpoint.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{ranks} ranks: exited ({process.returncode}) without a stop checkpoint")
        time.sleep(0.01)
    durable = time.monotonic() - sent
    process.wait(timeout=300)
    return durable, time.monotonic() - sent, checkpoint.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [(ranks, *measure(ranks, Path(work))) for ranks in args.ranks]
    print("| ranks | SIGTERM -> checkpoint durable (s) | SIGTERM -> job exited (s) | checkpoint (MB) |")
    print("|---:|---:|---:|---:|")
    for ranks, durable, exited, size in rows:
        print(f"| {ranks} | {durable:.1f} | {exited:.1f} | {size / 1e6:.0f} |")


if __name__ == "__main__":
    main()
