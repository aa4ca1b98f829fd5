"""DataLoader worker setup shared by every loader of the data package."""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import signal


class StopSignalsInWorker:
    """A DataLoader worker_init_fn: stop signals are for the training process, which saves at a batch end
    that all ranks agree on, then stops its workers.

    SIGUSR1 (the SLURM requeue signal) is ignored: SLURM signals every process of the step, and a worker
    would run a copy of the training process's handler, or die of it. SIGTERM (torchrun signals each
    rank's whole process group, SLURM every process of the step) is ignored too while the training process
    lives: the agreed batch end may be many steps away and the checkpoint large, and a worker that died
    meanwhile would crash the fit before it saved (the DataLoader raises when a worker dies; a fixed grace
    cannot know how long the save takes). A worker still ends with its training process: torch's worker loop
    exits when its parent is gone (a killed job), and the scheduler's SIGKILL ends it with the rest. Except at
    the training process's own exit: multiprocessing stops the workers still alive then with SIGTERM and waits
    for them, so the training process sets `exiting` first (a multiprocessing finalizer of positive priority,
    which runs before that, also when the training process is itself a multiprocessing child, where atexit
    hooks never run) and a worker that sees it ends at once. (A Python handler does not see who sent a
    signal.)

    Build it in the training process, with the loader's start method: `exiting` travels to the workers
    with the worker_init_fn."""

    def __init__(self, multiprocessing_context: str | None = None) -> None:
        self.exiting = multiprocessing.get_context(multiprocessing_context).Event()
        multiprocessing.util.Finalize(None, self.exiting.set, exitpriority=10)

    def __call__(self, worker_id: int = 0) -> None:
        signal.set_wakeup_fd(-1)  # a forked worker inherits the training process's (its stop watchdog's) pipe
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # asks the training process for its stacks (watchdog.py)
        signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sigterm(self, signum: int, frame: object) -> None:
        if self.exiting.is_set():
            os._exit(0)
