"""DataLoader workers and stop signals. torchrun signals each rank's whole process group and SLURM every
process of the step: a worker outlives SIGTERM long enough for the training process to save, then ends;
at the training process's own exit it ends at once."""

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


def test_a_worker_serves_batches_for_the_grace_after_sigterm_then_ends(monkeypatch):
    monkeypatch.setattr(workers, "SIGTERM_GRACE_S", 2)  # the forked worker inherits it
    loader = DataLoader(WorkerPids(), batch_size=None, num_workers=1, multiprocessing_context="fork",
                        worker_init_fn=workers.StopSignalsInWorker())
    batches = iter(loader)
    pid = next(batches)
    os.kill(pid, signal.SIGTERM)
    sent, served = time.monotonic(), []
    with pytest.raises(RuntimeError, match="worker .* killed by signal"):  # torch's own report of a dead worker
        while time.monotonic() - sent < 30:
            served.append(next(batches))
            time.sleep(0.05)
    assert time.monotonic() - sent >= 1.9 and len(served) > 10 and set(served) == {pid}
    del batches


def test_a_second_sigterm_does_not_extend_the_grace(monkeypatch):
    monkeypatch.setattr(workers, "SIGTERM_GRACE_S", 2)
    pid = os.fork()
    if pid == 0:  # the worker: the handler as its worker_init_fn installs it, then two SIGTERMs a second apart
        workers.StopSignalsInWorker()()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        os._exit(0)
    started = time.monotonic()
    status = os.waitpid(pid, 0)[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM
    assert 1.9 <= time.monotonic() - started < 2.9


def test_workers_still_alive_at_the_training_processs_exit_end_at_once():
    """multiprocessing stops them with SIGTERM at interpreter exit and waits: not the grace's 30 s."""
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
    assert time.monotonic() - started < workers.SIGTERM_GRACE_S / 2
