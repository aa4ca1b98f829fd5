"""A stop request never hangs: a rank that makes no progress after SIGTERM says so, prints its stacks, exits.

A rank stuck in a collective that another rank never joins sits in C++ (gloo or NCCL wait, 30 minutes by
default), where no Python signal handler runs: the graceful stop (slurm.RequeueOnSignal) would never come,
and the job would hold its GPUs until the scheduler's SIGKILL, with nothing said. Python's own C-level
handler still writes the signal number to the wakeup fd; a thread reading it sees the signal, and if no
batch ends (nor a save starts or ends) for `timeout_s` after it, prints every thread's Python stack
(faulthandler) and the phase the rank was in, then exits 128 + signal. A healthy run waiting for its agreed
batch end keeps ending batches, so the watchdog never fires there.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

STOP_TIMEOUT_S = 120.0  # ours: no progress for this long after a stop signal = stuck


class StopWatchdog:
    def __init__(self, rank: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.rank, self.timeout_s = rank, timeout_s
        self.phase = "setup"
        self.progress = time.monotonic()
        self.signum: int | None = None
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)  # main thread only; handlers must be Python's
        threading.Thread(target=self.watch, args=(read,), name="stop-watchdog", daemon=True).start()

    def mark(self, phase: str) -> None:
        """Progress, from the training loop (host only, no device read)."""
        self.phase, self.progress = phase, time.monotonic()

    def watch(self, read: int) -> None:
        while self.signum is None:
            received = os.read(read, 1)
            if received and received[0] in (signal.SIGTERM, signal.SIGUSR1):
                self.signum, self.progress = received[0], time.monotonic()
        while time.monotonic() - self.progress < self.timeout_s:
            time.sleep(min(1.0, self.timeout_s / 10))
        name = signal.Signals(self.signum).name
        print(f"rank {self.rank}: {name} received, but no progress for {self.timeout_s:.0f} s in phase "
              f"'{self.phase}' (a collective another rank never joined?); exiting without a checkpoint (the last "
              "one stays). Python stacks of this rank:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(128 + self.signum)
