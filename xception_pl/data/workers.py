"""DataLoader worker setup shared by every loader of the data package."""

from __future__ import annotations

import signal

# Ours: how long a worker outlives SIGTERM. torchrun (after 30 s by default) and SLURM (KillWait, 30 s by
# default) follow their SIGTERM with SIGKILL; by then the training process has saved and stopped its workers.
SIGTERM_GRACE_S = 30


def ignore_stop_signals_in_worker(worker_id: int = 0) -> None:
    """A DataLoader worker_init_fn: stop signals are for the training process, which saves at a batch end
    that all ranks agree on, then stops its workers.

    SIGUSR1 (the SLURM requeue signal) is ignored: SLURM signals every process of the step, and a worker
    would run a copy of the training process's handler, or die of it. SIGTERM (torchrun signals each
    rank's whole process group, SLURM every process of the step) ends a worker only SIGTERM_GRACE_S
    later: one that died at once would crash the fit before it saved (the DataLoader raises when a worker
    is killed). Not ignored outright: multiprocessing stops daemon workers still alive at interpreter exit
    with SIGTERM and waits for them; such a worker ends within the grace. (Lightning stops its loaders'
    workers before that, on a SIGTERM stop too: torchrun's SIGTERM to exit takes ~4 s in the torchrun test.)
    Not told apart by sender: a Python handler does not see it, and a thread taking SIGTERM with
    sigwaitinfo misses it where torch's threads, started before this runs, leave it unblocked."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, end_after_grace)


def end_after_grace(signum: int, frame: object) -> None:
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # SIGALRM's default action ends the process
    earlier = signal.alarm(SIGTERM_GRACE_S)
    if earlier:  # a second SIGTERM does not extend the grace of the first
        signal.alarm(earlier)
