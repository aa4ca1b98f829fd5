"""A stop request never hangs: a rank that makes no progress after SIGTERM says so, prints its stacks, exits.

A rank stuck in a collective that another rank never joins sits in C++ (gloo or NCCL wait, 30 minutes by
default), where no Python signal handler runs: the graceful stop (slurm.RequeueOnSignal) would never come,
and the job would hold its GPUs until the scheduler's SIGKILL, with nothing said. Python's own C-level
handler still writes the signal number to the wakeup fd; a thread reading it sees the signal, and if no
batch ends (nor a save starts or ends) for `timeout_s` after it, prints every thread's Python stack
(faulthandler) and the phase the rank was in, then exits 128 + signal. A healthy run waiting for its agreed
batch end keeps ending batches, so the watchdog never fires there. It watches only while a fit runs
(`arm` to `disarm`): a process that goes on after its fit (a notebook, the tests) is left alone.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

STOP_TIMEOUT_S = 120.0  # ours: no progress for this long after a stop signal = stuck
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopWatchdog:
    """One per process (a pipe and a thread), armed by each fit."""

    _process: StopWatchdog | None = None

    @classmethod
    def arm(cls, rank: int, timeout_s: float = STOP_TIMEOUT_S) -> StopWatchdog:
        """From the main thread (the wakeup fd is set there), at the start of a fit."""
        if cls._process is None:
            cls._process = cls()
        watchdog = cls._process
        watchdog.rank, watchdog.timeout_s, watchdog.signum = rank, timeout_s, None
        watchdog.mark("setup")
        watchdog.previous_fd = signal.set_wakeup_fd(watchdog.write, warn_on_full_buffer=False)
        watchdog.active = True
        return watchdog

    def __init__(self) -> None:
        self.rank, self.timeout_s, self.signum, self.active = 0, STOP_TIMEOUT_S, None, False
        self.phase, self.progress, self.previous_fd = "setup", time.monotonic(), -1
        read, self.write = os.pipe()
        os.set_blocking(self.write, False)
        threading.Thread(target=self.watch, args=(read,), name="stop-watchdog", daemon=True).start()

    def disarm(self) -> None:
        """At the end of the fit: signals go back to whoever listened before."""
        if self.active:
            self.active = False
            signal.set_wakeup_fd(self.previous_fd)

    def mark(self, phase: str) -> None:
        """Progress, from the training loop (host only, no device read)."""
        self.phase, self.progress = phase, time.monotonic()

    def watch(self, read: int) -> None:
        while True:
            received = os.read(read, 1)
            if not (received and received[0] in STOP_SIGNALS and self.active):
                continue
            self.signum, self.progress = received[0], time.monotonic()
            while self.active and time.monotonic() - self.progress < self.timeout_s:
                time.sleep(min(1.0, self.timeout_s / 10))
            if self.active:
                self.stuck()

    def stuck(self) -> None:
        name = signal.Signals(self.signum).name
        print(f"rank {self.rank}: {name} received, but no progress for {self.timeout_s:.0f} s in phase "
              f"'{self.phase}' (a collective another rank never joined?); exiting without a checkpoint (the last "
              "one stays). Python stacks of this rank:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(128 + self.signum)
