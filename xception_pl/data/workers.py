"""DataLoader worker setup shared by every loader of the data package."""

from __future__ import annotations

import signal


def ignore_stop_signals_in_worker(worker_id: int = 0) -> None:
    """A DataLoader worker_init_fn: SIGUSR1 is for the training process (it saves and requeues); SLURM signals
    every process of the step, and a worker would run a copy of that handler, or die of it. (Not SIGTERM:
    multiprocessing stops its daemon workers with SIGTERM at exit and waits for them.)"""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
