"""DataLoader workers and stop signals. torchrun signals each rank's whole process group and SLURM every
process of the step: a worker outlives SIGTERM for as long as the training process lives (it saves first), and
ends with it; at the training process's own exit it ends at once."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from torch.utils.data import DataLoader, IterableDataset

from tests.helpers import ROOT
from xception_pl.data import workers


class WorkerPids(IterableDataset):
    def __iter__(self):
        while True:
            yield os.getpid()


def test_a_worker_serves_batches_after_sigterm_for_as_long_as_the_training_process_lives():
    loader = DataLoader(WorkerPids(), batch_size=None, num_workers=1, multiprocessing_context="fork",
                        worker_init_fn=workers.StopSignalsInWorker())
    batches = iter(loader)
    pid = next(batches)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGTERM)  # torchrun and SLURM may signal more than once
    sent, served = time.monotonic(), []
    while time.monotonic() - sent < 3:  # the save at an agreed batch end takes what it takes
        served.append(next(batches))
        time.sleep(0.05)
    assert len(served) > 20 and set(served) == {pid}
    del batches


def test_workers_end_with_a_killed_training_process():
    code = textwrap.dedent("""
        import time
        from torch.utils.data import DataLoader
        from tests.component.test_data_workers import WorkerPids
        from xception_pl.data.workers import StopSignalsInWorker

        batches = iter(DataLoader(WorkerPids(), batch_size=None, num_workers=1, multiprocessing_context="fork",
                                  worker_init_fn=StopSignalsInWorker("fork")))
        print(next(batches), flush=True)
        time.sleep(300)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    worker = int(process.stdout.readline())
    os.kill(worker, signal.SIGTERM)  # ignored while the training process lives
    process.kill()  # kill -9, as the scheduler does after its grace
    process.wait(timeout=60)
    deadline = time.monotonic() + 30  # torch's worker loop checks its parent every 5 s
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(worker)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_workers_still_alive_at_the_training_processs_exit_end_at_once():
    """multiprocessing stops them with SIGTERM at interpreter exit and waits: they must not ignore that one."""
    code = textwrap.dedent("""
        from torch.utils.data import DataLoader
        from tests.component.test_data_workers import WorkerPids
        from xception_pl.data.workers import StopSignalsInWorker

        batches = iter(DataLoader(WorkerPids(), batch_size=None, num_workers=2, multiprocessing_context="fork",
                                  worker_init_fn=StopSignalsInWorker("fork")))
        print(next(batches), flush=True)  # the iterator is still alive when the interpreter exits
    """)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().isdigit(), result.stderr[-2000:]
    assert time.monotonic() - started < 15


def test_the_stop_watchdog_watches_only_while_a_fit_runs():
    """Armed by a fit and disarmed at its end: a process that goes on (a notebook, this test run) and later gets
    SIGTERM is not ended by a watchdog left from an earlier fit."""
    from xception_pl.watchdog import Watchdog

    previous = signal.signal(signal.SIGUSR1, lambda *args: None)  # a Python handler, as RequeueOnSignal installs
    try:
        watchdog = Watchdog.arm(rank=0, stop_timeout_s=0.5)
        watchdog.disarm()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(1.5)  # armed, it would have exited this process by now
        assert watchdog.signum is None and not watchdog.active
        assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd went back to what it was
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_workers_sigterm_does_not_reach_the_training_processs_stop_watchdog():
    """A forked worker inherits the wakeup fd; its own SIGTERM must not read as the training process's."""
    from xception_pl.watchdog import Watchdog

    previous = signal.signal(signal.SIGTERM, lambda *args: None)
    watchdog = Watchdog.arm(rank=0, stop_timeout_s=60)
    try:
        loader = DataLoader(WorkerPids(), batch_size=None, num_workers=1, multiprocessing_context="fork",
                            worker_init_fn=workers.StopSignalsInWorker())
        batches = iter(loader)
        os.kill(next(batches), signal.SIGTERM)
        time.sleep(1)
        assert watchdog.signum is None
        del batches
    finally:
        watchdog.disarm()
        signal.signal(signal.SIGTERM, previous)
