"""Nothing hangs: a rank that is stuck, or whose peer is gone, says so, prints its Python stacks, and exits.

A rank waiting in a collective sits in C++ (gloo or NCCL), where no Python signal handler runs, until the
process group's timeout; a job would hold every GPU that long with nothing said. So one thread per process
watches, armed by `FaultWatch` for the length of a fit (a process that goes on after it, a notebook or the
tests, is left alone):

- a stop that never comes: after SIGTERM or SIGUSR1, no batch ends (nor a save starts or ends) for
  `stop_timeout_s`: exit 128 + signal;
- a stall: no batch ends for `stall_timeout_s` (a rank stuck in a step, a hung read, a collective another rank
  never joins): exit 124 (as `timeout`);
- a lost peer (`Heartbeat`): a rank that died (kill -9, out of memory, a lost node) stops counting in the
  rendezvous store; the others learn it within `peer_timeout_s`: exit 75 (EX_TEMPFAIL: resume with
  `--ckpt_path last`);
- SIGUSR2: every thread's stack, with the phase and step, and the run goes on.

Each exit prints the phase and step the rank was in and every thread's stack (faulthandler) first. Python's
C-level signal handler writes the signal number to the wakeup fd whatever the main thread does; this thread
reads it there.
"""

from __future__ import annotations

import faulthandler
import os
import select
import signal
import sys
import threading
import time
from datetime import timedelta

import lightning as L
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STALLED_EXIT, PEER_LOST_EXIT = 124, 75


class Watchdog:
    """One per process (a pipe and a thread), armed by each fit."""

    _process: Watchdog | None = None

    @classmethod
    def arm(cls, rank: int, stop_timeout_s: float, stall_timeout_s: float | None = None,
            heartbeat: Heartbeat | None = None) -> Watchdog:
        """From the main thread (the wakeup fd is set there), at the start of a fit."""
        if cls._process is None:
            cls._process = cls()
        watchdog = cls._process
        watchdog.rank, watchdog.stop_timeout_s, watchdog.stall_timeout_s = rank, stop_timeout_s, stall_timeout_s
        watchdog.heartbeat, watchdog.signum = heartbeat, None
        watchdog.mark("setup")
        watchdog.previous_fd = signal.set_wakeup_fd(watchdog.write, warn_on_full_buffer=False)
        watchdog.active = True
        return watchdog

    def __init__(self) -> None:
        self.rank, self.stop_timeout_s, self.stall_timeout_s, self.heartbeat = 0, 120.0, None, None
        self.signum, self.active, self.phase, self.step = None, False, "setup", None
        self.progress, self.previous_fd = time.monotonic(), -1
        read, self.write = os.pipe()
        os.set_blocking(self.write, False)
        threading.Thread(target=self.watch, args=(read,), name="watchdog", daemon=True).start()

    def disarm(self) -> None:
        """At the end of the fit: signals go back to whoever listened before."""
        if self.active:
            self.active = False
            signal.set_wakeup_fd(self.previous_fd)
            if self.heartbeat is not None:
                self.heartbeat.stop()

    def mark(self, phase: str, step: int | None = None) -> None:
        """Progress, from the training loop (host only, no device read)."""
        self.phase, self.progress = phase, time.monotonic()
        if step is not None:
            self.step = step

    def watch(self, read: int) -> None:
        while True:
            if select.select([read], [], [], 1.0)[0]:
                for signum in os.read(read, 64):
                    self.received(signum)
            if self.active:
                self.check()

    def received(self, signum: int) -> None:
        if not self.active:
            return
        if signum == signal.SIGUSR2:
            self.say("SIGUSR2: the stacks asked for (the run goes on)")
        elif signum in STOP_SIGNALS and self.signum is None:
            self.signum, self.progress = signum, time.monotonic()

    def check(self) -> None:
        quiet = time.monotonic() - self.progress
        if self.signum is not None and quiet > self.stop_timeout_s:
            self.exit(128 + self.signum, f"{signal.Signals(self.signum).name} received, but no progress for "
                      f"{self.stop_timeout_s:.0f} s (a collective another rank never joined?); exiting without "
                      "a checkpoint (the last one stays)")
        if self.stall_timeout_s and quiet > self.stall_timeout_s:
            self.exit(STALLED_EXIT, f"no batch ended for {self.stall_timeout_s:.0f} s (faults.stall_timeout_s); "
                      "exiting (the last checkpoint stays; resume with --ckpt_path last)")
        lost = self.heartbeat.lost() if self.heartbeat is not None else None
        if lost is not None:
            self.exit(PEER_LOST_EXIT, f"{lost}; exiting so the job does not wait for the collective timeout "
                      "(the last checkpoint stays; resume with --ckpt_path last)")

    def say(self, what: str) -> None:
        step = "" if self.step is None else f", step {self.step}"
        print(f"rank {self.rank}: {what}. It was in phase '{self.phase}'{step}. Python stacks of this rank:",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

    def exit(self, code: int, why: str) -> None:
        self.say(why)
        os._exit(code)


class Heartbeat:
    """Every rank adds to its counter in the rendezvous store every few seconds; rank 0 reads every rank's, the
    others rank 0's and rank 0's verdict. A counter that has not moved for `timeout_s`, or a store that stops
    answering (rank 0 holds it under Lightning's launcher and srun; torchrun's agent under torchrun), is a lost
    peer. One thread; reads of O(ranks) keys per beat on rank 0, two on the others."""

    PREFIX = "xception_pl/heartbeat"

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float) -> None:
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, timeout_s
        self.every_s = min(5.0, timeout_s / 4)
        self.seen: dict[int, tuple[int, float]] = {}  # rank -> (its count, when it last moved)
        self.verdict: str | None = None
        self.answered, self.running = time.monotonic(), True
        threading.Thread(target=self.run, name="heartbeat", daemon=True).start()

    def stop(self) -> None:
        self.running = False

    def lost(self) -> str | None:
        if self.verdict is None and time.monotonic() - self.answered > self.timeout_s:
            return (f"the rendezvous store has not answered for {self.timeout_s:.0f} s: rank 0, which holds it, or "
                    "its node is gone")
        return self.verdict

    def run(self) -> None:
        # A store error counts as silence, not at once: the store's host may end its process a moment before the
        # others end their fit, and a rank must not fail a run that is finishing.
        while self.running and self.verdict is None:
            try:
                self.beat()
                self.answered = time.monotonic()
            except Exception:  # noqa: BLE001 (a refused, reset or timed-out connection: all silence)
                pass
            time.sleep(self.every_s)

    def beat(self) -> None:
        self.store.add(f"{self.PREFIX}/{self.rank}", 1)
        now = time.monotonic()
        for peer in range(1, self.world_size) if self.rank == 0 else [0]:
            count = self.store.add(f"{self.PREFIX}/{peer}", 0)
            if self.seen.get(peer, (None,))[0] != count:
                self.seen[peer] = (count, now)
            elif now - self.seen[peer][1] > self.timeout_s:
                self.verdict = f"rank {peer} has not been heard from for {self.timeout_s:.0f} s (dead or its node lost)"
                if self.rank == 0:
                    self.store.add(f"{self.PREFIX}/lost", peer + 1)  # the others learn which
                return
        if self.rank != 0 and (peer := self.store.add(f"{self.PREFIX}/lost", 0)):
            self.verdict = f"rank 0 reports rank {peer - 1} lost (not heard from for {self.timeout_s:.0f} s)"


class FaultWatch(L.Callback):
    """The `faults` group: how long a fit may be stuck before it ends itself (ours, all of them).

    Args:
        collective_timeout_s: the process group's timeout, set at the start of the fit (torch's defaults: 30
            minutes for gloo, 10 for NCCL): the backstop, longer than the stall timeout so that the stacks come
            first. A checkpoint write by rank 0 while the others wait must fit in it.
        stall_timeout_s: no batch ends for this long (training, validation, a save) = stuck; None: off; only in
            a fit of several processes. Long enough for a first step that compiles and the first shards of a slow
            store.
        peer_timeout_s: a rank not heard from for this long is lost; None: off (one process: always off).
        stop_timeout_s: after SIGTERM or SIGUSR1, no progress for this long = the graceful stop cannot happen.
    """

    def __init__(self, collective_timeout_s: float = 900.0, stall_timeout_s: float | None = 600.0,
                 peer_timeout_s: float | None = 60.0, stop_timeout_s: float = 120.0) -> None:
        for name, value in [("collective_timeout_s", collective_timeout_s), ("stall_timeout_s", stall_timeout_s),
                            ("peer_timeout_s", peer_timeout_s), ("stop_timeout_s", stop_timeout_s)]:
            if value is not None and value <= 0:
                raise ValueError(f"faults.{name}={value} must be > 0 (or null where it may be off)")
        if stall_timeout_s is not None and stall_timeout_s >= collective_timeout_s:
            raise ValueError(f"faults.stall_timeout_s={stall_timeout_s} must be below faults.collective_timeout_s="
                             f"{collective_timeout_s}, else a stuck collective aborts before the stacks are printed")
        self.collective_timeout_s, self.stall_timeout_s = collective_timeout_s, stall_timeout_s
        self.peer_timeout_s, self.stop_timeout_s = peer_timeout_s, stop_timeout_s
        self.watchdog: Watchdog | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        heartbeat = None
        if dist.is_available() and dist.is_initialized():
            dist.set_timeout(timedelta(seconds=self.collective_timeout_s))
            if self.peer_timeout_s and trainer.world_size > 1:
                # The default group's store: per launch and per torchrun restart (docs/code.md "Seams").
                store = dist.distributed_c10d._get_default_store()
                heartbeat = Heartbeat(store, trainer.global_rank, trainer.world_size, self.peer_timeout_s)
        signal.signal(signal.SIGUSR2, lambda signum, frame: None)  # the C handler writes it to the wakeup fd
        # One process has no one waiting on it, and may sit in a debugger: the stall watch is for several.
        stall_timeout_s = self.stall_timeout_s if trainer.world_size > 1 else None
        self.watchdog = Watchdog.arm(trainer.global_rank, self.stop_timeout_s, stall_timeout_s, heartbeat)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.watchdog is not None:
            self.watchdog.disarm()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.watchdog is not None:  # the fit is over: a process that goes on is not watched
            self.watchdog.disarm()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        mark("training", trainer.global_step)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        mark("validation", trainer.global_step)

    def on_save_checkpoint(self, trainer: L.Trainer, *args: object) -> None:
        mark("saving a checkpoint", trainer.global_step)


def mark(phase: str, step: int | None = None) -> None:
    """Progress of this process's fit, for its watchdog (nothing when none is armed)."""
    watchdog = Watchdog._process
    if watchdog is not None and watchdog.active:
        watchdog.mark(phase, step)
