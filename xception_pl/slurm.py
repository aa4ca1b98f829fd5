"""SLURM: launch checks that fail fast with the fix, the run record, and SIGUSR1 kept out of data workers.

Lightning's SLURMEnvironment wires ranks from SLURM_PROCID etc. What this module adds: a job that
forgot `srun`, or whose tasks per node differ from its GPUs per node, fails at once with the fix
instead of hanging at "Initializing distributed ... 1/N"; SIGUSR1 saves `hpc_ckpt_N.ckpt` and requeues
at a batch end all ranks agree on (RequeueOnSignal); the sbatch script and SLURM variables of every
(re)start are kept in the run directory; forked children (DataLoader workers) ignore SIGUSR1.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from torch.distributed import ReduceOp

from xception_pl.callbacks import logs_this_step
from xception_pl import storage
from xception_pl.checkpointing import next_hpc_checkpoint, write_atomically
from xception_pl import watchdog

log = logging.getLogger(__name__)

# SLURM_STEP_ID of steps that srun did not start: the batch script (SLURM_BATCH_SCRIPT), the extern
# step and salloc's interactive step (0xfffffffb, 0xfffffffc, 0xfffffffa). SLURM 22.05 sets no
# SLURM_STEP_ID at all in the batch shell; srun's steps count from 0.
NOT_SRUN_STEPS = {"batch", "extern", "interactive", "4294967291", "4294967292", "4294967290"}
INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # Lightning then starts its processes itself, no srun
RECORDED_PREFIXES = ("SLURM_", "SLURMD_", "SBATCH_", "SRUN_", "NCCL_", "GLOO_", "MASTER_", "CUDA_VISIBLE_DEVICES")
# Ours: ranks agree on a stop signal at least this often (torchrun and SLURM follow SIGTERM with SIGKILL after 30 s,
# and the checkpoint must be written before); a check is one small all-reduce and host read.
STOP_CHECK_S = 5.0
SRUN_FIX = "srun python -m xception_pl fit ... (as slurm/train_imagenet.sh and slurm/train_jft.sh do)"

_lightning_validate_settings = SLURMEnvironment.validate_settings


def check_launch() -> None:
    """Fail fast, with the fix, on a SLURM launch that would hang or mismatch devices. Outside SLURM: nothing."""
    error = launch_error(os.environ)
    if error is not None:
        raise SystemExit(error)
    if started_by_srun(os.environ):
        # Lightning compares devices/num_nodes with SLURM's counts only inside trainer.fit, as a ValueError
        # traceback per rank; ours says the same in one line with the fix.
        SLURMEnvironment.validate_settings = validate_settings  # type: ignore[method-assign]
        ignore_stop_signals_in_forked_children()


def launch_error(env: Mapping[str, str]) -> str | None:
    """What is wrong with this process's SLURM launch, with the fix; None when nothing is (or outside SLURM)."""
    if "SLURM_JOB_ID" not in env or env.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        return None
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    if ntasks > 1 and not started_by_srun(env):
        return (f"error: this SLURM job has {ntasks} tasks but this process was not started by srun, so it would "
                f"wait forever for the other {ntasks - 1} at 'Initializing distributed: GLOBAL_RANK: 0, MEMBER: "
                f"1/{ntasks}'. Prepend srun to the command in the batch script: {SRUN_FIX}")
    gpus, tasks = gpus_per_node(env), tasks_per_node(env)
    if gpus is not None and tasks is not None and gpus != tasks:
        return (f"error: this SLURM job has {gpus} GPUs per node (--gres=gpu:{gpus}) but {tasks} tasks per node "
                f"(--ntasks-per-node={tasks}); Lightning runs one task per GPU. Submit with "
                f"--ntasks-per-node={gpus} --gres=gpu:{gpus} (the scripts in slurm/ then pass --trainer.devices "
                "$SLURM_NTASKS_PER_NODE).")
    return None


def started_by_srun(env: Mapping[str, str]) -> bool:
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    return step is not None and step not in NOT_SRUN_STEPS


def gpus_per_node(env: Mapping[str, str]) -> int | None:
    """GPUs this job holds per node: --gres=gpu:G sets SLURM_GPUS_ON_NODE, --gpus-per-node=[type:]G its own."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if name in env and (match := re.search(r"(\d+)$", env[name])):
            return int(match.group(1))
    return None


def tasks_per_node(env: Mapping[str, str]) -> int | None:
    """--ntasks-per-node, else the first node's count of SLURM_TASKS_PER_NODE (e.g. "8(x4)")."""
    for name in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name in env and (match := re.match(r"(\d+)", env[name])):
            return int(match.group(1))
    return None


def validate_settings(self: SLURMEnvironment, num_devices: int, num_nodes: int) -> None:
    """Lightning's devices/nodes check against SLURM's task counts, as one line with the fix instead of a
    traceback per rank from inside trainer.fit."""
    try:
        _lightning_validate_settings(self, num_devices, num_nodes)
    except ValueError as error:
        raise SystemExit(f"error: {error} The scripts in slurm/ pass --trainer.devices $SLURM_NTASKS_PER_NODE "
                         "and --trainer.num_nodes $SLURM_JOB_NUM_NODES; do not override them.") from None


_at_fork_registered = False


def ignore_stop_signals_in_forked_children() -> None:
    """Under srun, forked children (DataLoader workers by default) ignore SIGUSR1 from birth, before their
    worker_init_fn (`StopSignalsInWorker`) runs. Not SIGTERM: it would outlive exec in a subprocess."""
    global _at_fork_registered
    if not _at_fork_registered:
        os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
        _at_fork_registered = True


class RequeueOnSignal(L.Callback):
    """A graceful stop: on SIGUSR1 (sbatch --signal=SIGUSR1@90) or SIGTERM (preemption under torchrun or
    Kubernetes, scancel), at a batch end all ranks agree on, every rank together: write
    <root>/hpc_ckpt_N.ckpt and exit (Lightning flushes the loggers on the way out). Under srun, SIGUSR1 also
    requeues the job: rank 0 runs `scontrol requeue` at exit (it kills the job's processes at once, so it
    comes last), and the job resumes from that checkpoint (`--ckpt_path last`). Exit status 0 after a
    requeue, 128 + 15 after SIGTERM (the run did not finish; a scheduler that restarts failed jobs starts it
    again, and `--ckpt_path last` resumes it).

    The handlers only note the signal. With one process the note is read at every batch end (no device
    read); with several, the ranks agree on it with one small all-reduce on logging steps and, in between,
    on one step in every ~STOP_CHECK_S seconds, so the stop (and its save) comes within seconds however far
    the next logging step is: torchrun and SLURM send SIGKILL 30 s after SIGTERM. The other steps make no
    collective. Lightning's own handling stays out of the way: its SIGUSR1
    handler saves from inside the signal handler, wherever each rank was interrupted, and can deadlock DDP
    (seen on the test cluster; installed here before Lightning's, in `setup`, so Lightning keeps out of
    SIGUSR1), and its SIGTERM handling broadcasts a flag from rank 0 with a host read on every step (replaced
    in `on_train_start`, after Lightning installs it). Exiting, rather than `trainer.should_stop`, runs nothing
    after the checkpoint: no validation of a partial epoch, no newer last.ckpt.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.requeue = False  # SIGUSR1 under srun (not an interactive allocation)
        self.trainer: L.Trainer | None = None
        self.stop_check_s = STOP_CHECK_S
        self.next_check, self.last_check = 0, None  # the next global step to agree at; (time, step) of the last
        self.checked_step: int | None = None  # the global step of the last agreement (HostSyncCounter reads it)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        env = os.environ
        self.requeue = started_by_srun(env) and env.get("SLURM_JOB_NAME") not in INTERACTIVE_JOB_NAMES
        self.trainer, self.signal = trainer, None
        signal.signal(signal.SIGUSR1, self.note_signal)  # a stop that never comes is said (watchdog.py)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Steps are timed from here; the first agreement is after the first step, which sets the pace.
        self.last_check, self.next_check = (time.monotonic(), trainer.global_step), trainer.global_step + 1
        signal.signal(signal.SIGTERM, self.note_signal)
        # Lightning's per-step broadcast of its own SIGTERM flag (a collective and a host read on every step);
        # the flag is never set now that the handler above replaced Lightning's. See docs/code.md "Seams".
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None

    def note_signal(self, signum: int, frame: object) -> None:
        if self.signal is None and signum == signal.SIGTERM and self.trainer is not None:
            launcher = self.trainer.strategy.launcher  # Lightning's own multi-process launcher: pass it on
            if launcher is not None and hasattr(launcher, "kill"):
                launcher.kill(signum)
        self.signal = self.signal or signum

    def agreed_signal(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
        """The stop signal all ranks agree on, at a step they all check: logging steps, and in between one step
        in every ~STOP_CHECK_S seconds (rank 0 times the steps and sets the next check for all)."""
        if trainer.world_size == 1:
            return self.signal
        step = trainer.global_step
        if not ((trainer.log_every_n_steps and logs_this_step(trainer)) or step >= self.next_check):
            return None
        now, every = time.monotonic(), 1
        if self.last_check is not None and step > self.last_check[1]:
            every = max(1, int(self.stop_check_s * (step - self.last_check[1]) / (now - self.last_check[0])))
        # Agreed with the largest signal number noted on any rank: SIGTERM (15) wins over SIGUSR1 (10).
        noted = torch.tensor([float(self.signal or 0), float(every if trainer.is_global_zero else 0)],
                             device=pl_module.device)
        signum, every = trainer.strategy.reduce(noted, reduce_op=ReduceOp.MAX).tolist()
        self.last_check, self.next_check, self.checked_step = (now, step), step + int(every), step
        return int(signum) or None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        signum = self.agreed_signal(trainer, pl_module)
        if signum is None:
            return
        watchdog.mark("saving the stop checkpoint", trainer.global_step)
        path = next_hpc_checkpoint(trainer.default_root_dir)
        trainer.save_checkpoint(path)  # rank 0 writes, then all ranks meet in a barrier
        # Lightning hands this step's logged values (train/loss ...) to the loggers after this hook; we exit
        # before, so push them now, else TensorBoard would miss the step.
        trainer._logger_connector.update_train_step_metrics()
        watchdog.mark("exiting after the stop checkpoint")
        name = signal.Signals(signum).name
        requeue = self.requeue and signum == signal.SIGUSR1
        if trainer.is_global_zero:
            then = "the job is requeued at exit" if requeue else "resume with --ckpt_path last"
            print(f"{name}: saved {path}; exiting, {then}", flush=True)
            if requeue:
                atexit.register(requeue_job, path)
        raise SystemExit(0 if requeue else 128 + signum)


def requeue_job(checkpoint: Path) -> None:
    env = os.environ
    array = "SLURM_ARRAY_JOB_ID" in env  # a task of a job array is requeued as <array job>_<task>
    job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if array else env["SLURM_JOB_ID"]
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
    except (subprocess.SubprocessError, OSError) as error:
        detail = getattr(error, "stderr", None) or error
        log.error("SIGUSR1: saved %s, but `scontrol requeue %s` failed (%s): resubmit the same script with the "
                  "same --job-name to resume from it", checkpoint, job, detail)
    else:
        print(f"requeued SLURM job {job}; it resumes from {checkpoint}", flush=True)


def record_run(root: str | Path) -> None:
    """Keep the sbatch script and the SLURM environment of this job in <root>/slurm/, per job id and restart
    (root: a directory or an object store's URL)."""
    env = os.environ
    job = env.get("SLURM_JOB_ID")
    if job is None:
        return
    folder = f"{str(root).rstrip('/')}/slurm"
    if not storage.is_url(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
    stem = f"{folder}/job-{job}-restart{env.get('SLURM_RESTART_COUNT', '0')}"
    variables = "".join(f"{k}={v}\n" for k, v in sorted(env.items()) if k.startswith(RECORDED_PREFIXES))
    write_atomically(f"{stem}.env", variables.encode())
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.error("scontrol is not on PATH: SLURM requeue cannot work here (on SIGUSR1 we save "
                  "hpc_ckpt_N.ckpt, then run `scontrol requeue`) and the batch script is not recorded. Put "
                  "SLURM's bin directory on PATH in the job.")
        return
    try:
        script = subprocess.run([scontrol, "write", "batch_script", job, "-"], capture_output=True, check=True,
                                timeout=60).stdout
    except (subprocess.SubprocessError, OSError) as error:
        log.warning("could not record the batch script of job %s with `scontrol write batch_script`: %s", job, error)
    else:
        write_atomically(f"{stem}.sh", script)
    log.info("SLURM job %s: script and environment recorded in %s", job, folder)
