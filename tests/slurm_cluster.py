"""A private, throw-away SLURM cluster for tests: slurmctld + two slurmd on 127.0.0.1.

Verified with Debian 12 ``slurm-wlm`` 22.05.8 and ``munge`` 0.5.15, running as root.
Install them with ``.ci/install_slurm.sh``; without them the fixture *fails* (not
skips) and says so.

Using it from another test module
---------------------------------
Register the module as a pytest plugin, best once in ``tests/conftest.py``::

    pytest_plugins = ["tests.slurm_cluster"]

(or in the test module itself, as tests/system/test_slurm_cluster.py does; listing it in both
places is fine and still gives ONE session cluster). Prefer this over
``from tests.slurm_cluster import slurm_cluster``: an imported fixture is a separate
fixture definition per module, i.e. a second cluster. Then ask for ``slurm_cluster``::

    def test_ddp_on_two_nodes(slurm_cluster: SlurmCluster):
        job = slurm_cluster.sbatch(
            f"srun {sys.executable} -m xception_pl fit ...",   # script text or a path
            nodes=2, ntasks_per_node=1, gres="gpu:1", requeue=True, open_mode="append",
            signal="USR1@90", time="10",
        )
        res = slurm_cluster.wait(job, timeout=300)
        assert res.state == "COMPLETED", slurm_cluster.describe_job_output(res)

The fixture is session-scoped: one cluster for the whole run (startup ~1-3 s). For an
isolated cluster use ``with slurm_cluster_ctx() as c:`` (clusters can run side by side).

API (:class:`SlurmCluster`)
---------------------------
``env``            env for client commands *and* jobs: ``SLURM_CONF`` (private
                   ``slurm.conf``), ``PATH`` with this interpreter's bin dir first,
                   ``MASTER_ADDR=127.0.0.1`` (node names do not resolve!), ``MASTER_PORT``
                   and a marker var. Jobs get it via ``sbatch --export=ALL``; use it for
                   your own ``subprocess`` calls too (or :meth:`SlurmCluster.run`).
``sbatch(script, *args, env=None, **opts) -> job_id`` (str). ``opts`` map to long
                   options (``ntasks_per_node=1`` -> ``--ntasks-per-node=1``, ``True`` ->
                   bare flag); ``wrap="cmd"`` with ``script=None``. Defaults: ``--output``
                   ``job_dir/slurm-%j.out``, ``--chdir=job_dir``, ``--export=ALL`` and a
                   *fresh* ``MASTER_PORT`` per submission (override via ``env=``).
``wait(job_id, timeout=60, states=TERMINAL_STATES) -> JobResult`` polls
                   ``scontrol show job -o``; ``JobResult`` has ``state`` (JobState),
                   ``exit_code`` (``"rc:signal"``), ``restarts``, ``reason``, ``std_out``
                   and the full record ``info``. ``states={"RUNNING"}`` waits for start.
                   On timeout: :class:`SlurmClusterError` with record, job output, logs.
``signal(job_id, "USR1", batch=False, full=False)`` -> ``scancel --signal=USR1``.
``state(job_id)``, ``job_info(job_id)``, ``cancel``, ``jobs()``, ``node_states()``,
``wait_for_file(path, timeout)``, ``logs()`` (daemon log tails), ``run(*argv)``.
``nodes`` (``("node1", "node2")``), ``root`` (temp dir), ``job_dir``, ``conf_path``,
``gpus_per_node`` (2), ``ports``.

Cluster layout
--------------
``/tmp/xpl-slurm-XXXXXXXX/`` (short on purpose: unix socket paths max 107 bytes):
``etc/`` slurm.conf, gres.conf, empty plugstack.conf; ``munge/`` own key + socket
(munged ``--force --foreground``); ``state/``, ``spool/<node>/``, ``run/`` pid files,
``log/`` (``slurmctld.log``, ``slurmd-node1.log``, ``munged.log``, ``*.stdout``),
``jobs/`` default job dir, ``dev/<node>/fakegpu[01]``: char devices with /dev/null's
numbers so slurmd accepts ``Gres=gpu:2`` and sets ``CUDA_VISIBLE_DEVICES=0,1`` (with
plain files it only sets ``SLURM_GPUS_ON_NODE``). All ports are picked free at start;
``SlurmctldHost=localhost(127.0.0.1)``, one ``NodeName`` line per node with
``NodeAddr=127.0.0.1`` and its own ``Port=``, ``slurmd -D -N nodeX -f <conf>``.
Nothing under ``/etc`` is read or written, no systemctl; the system munge is unused.
Teardown (also after failures): ``scancel`` all jobs, SIGTERM the daemons (SIGKILL
after 15 s), SIGKILL any process still carrying this cluster's marker env var
(slurmstepd, job tasks), remove the temp dir (keep it: ``XPL_KEEP_SLURM_DIR=1``).
Daemons get ``PR_SET_PDEATHSIG`` so a killed pytest does not leave them running; job
steps of such a run are reaped by the next cluster start (:func:`reap_dead_clusters`).

What was verified here (see tests/system/test_slurm_cluster.py)
---------------------------------------------------------
* ``sbatch -N2 --ntasks-per-node=1`` + ``srun``: rank 0 on node1, rank 1 on node2,
  ``SLURM_PROCID``/``SLURMD_NODENAME``/``SLURM_NTASKS=2``; both "nodes" are this host
  (``hostname`` is the same; ``SLURM_LOCALID`` is 0 on both, so two ranks share a machine).
* Signals (``scancel --signal=USR1 <job>`` == :meth:`SlurmCluster.signal` default):
  reaches every task of every running *step* (``srun`` tasks on both nodes), NOT the
  batch shell. That is what Lightning needs: its SIGUSR1 handler lives in the ``srun``
  tasks. ``--full`` signals the steps *and* the batch shell; ``--batch`` only the batch
  shell and its children -- ``srun`` does *not* forward USR1 to its tasks then.
  ``sbatch --signal=USR1@N`` behaves like the default (steps only),
  ``--signal=B:USR1@N`` like ``--batch``. slurmctld checks time limits about every 30 s,
  so ``@N`` fires 0-30 s late: with ``--time=1 --signal=USR1@55`` it came after ~10-15 s.
* Requeue: ``scontrol requeue $SLURM_JOB_ID`` from inside the job (any step or the batch
  shell; needs ``--requeue``/``JobRequeue=1``) kills the run ("CANCELLED ... DUE TO JOB
  REQUEUE"), the job goes PENDING (reason BeginTime) and starts again after
  ``cred_expire`` (set to 5 s here, default 120 s!) with ``SLURM_RESTART_COUNT=1``;
  ``Restarts`` in ``scontrol show job`` counts requeues; ends COMPLETED.

Pitfalls
--------
* Requeued runs *truncate* ``--output`` unless ``--open-mode=append`` is given.
* A signal sent before the ``srun`` step exists is silently lost (``scancel`` still
  returns 0): wait for a "ready" file written by the step before signalling.
* A step without a USR1 handler dies from USR1 (job FAILED, ExitCode 138:0); an
  untrapped bash batch shell dies from ``--batch``/``--full``/``B:`` USR1 (ExitCode 0:10).
  In a batch shell with a ``trap``, ``wait`` returns 138 early: loop on it.
* ``--wrap`` scripts run under ``/bin/sh`` (dash): bash-isms need ``bash -c``.
* Only 2 CPUs per node: at most two 1-task-per-node jobs run at once; more stay PENDING.
* ``CUDA_VISIBLE_DEVICES=0,1`` is set on both nodes: on a real GPU host both "nodes"
  would use the same GPUs.
* No slurmdbd: ``sacct`` does not work; use :meth:`SlurmCluster.wait`/``state``.
  Finished jobs stay visible to ``scontrol`` for ``MinJobAge=300`` s.
* ``SLURM_*``/``SBATCH_*``/``SRUN_*`` variables inherited from an outer SLURM job are
  stripped from :attr:`env`.
* slurmd logs "pmi/pmix: can not load PMIx library" at startup: harmless (``MpiDefault=none``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shlex
import shutil
import signal as _signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.helpers import free_port

__all__ = [
    "SlurmCluster",
    "SlurmClusterError",
    "JobResult",
    "TERMINAL_STATES",
    "REQUIRED_BINARIES",
    "free_port",
    "start_slurm_cluster",
    "slurm_cluster_ctx",
    "slurm_cluster",
    "reap_dead_clusters",
    "parse_scontrol_record",
]

#: Executables the cluster needs (Debian 12: packages ``slurm-wlm`` and ``munge``).
REQUIRED_BINARIES = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "squeue",
    "scontrol",
    "scancel",
    "sinfo",
)

#: Job states after which a job never runs again (``REQUEUED``/``COMPLETING`` are not final).
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "TIMEOUT",
    }
)

NODE_NAMES = ("node1", "node2")
CPUS_PER_NODE = 2
GPUS_PER_NODE = 2
REAL_MEMORY_MB = 2000

#: Set to the cluster's root dir in the env of its daemons and jobs; used at teardown to
#: find and kill leftover slurmstepd / job processes of *this* cluster only.
MARKER_ENV = "XPL_SLURM_TEST_CLUSTER"

#: Temp dirs of clusters are ``/tmp/xpl-slurm-XXXXXXXX`` (short: unix socket path limit).
ROOT_PREFIX = "xpl-slurm-"

#: Set this env var (to anything) to keep the cluster's temp dir after teardown.
KEEP_ENV = "XPL_KEEP_SLURM_DIR"

INSTALL_HINT = "run `sudo .ci/install_slurm.sh` (Debian/Ubuntu: apt-get install slurm-wlm munge)"

# Every external command gets a time bound; these are the defaults.
COMMAND_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class SlurmClusterError(RuntimeError):
    """Raised when the private cluster cannot be started or a command fails."""


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all sockets held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, max_chars: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return text if len(text) <= max_chars else "...\n" + text[-max_chars:]


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Parse one ``scontrol show ... -o`` line (``Key=Value Key=Value ...``).

    Values may contain spaces only for a few keys (e.g. ``Reason``); a token without
    ``=`` is appended to the previous value.
    """
    record: dict[str, str] = {}
    last = None
    for token in line.strip().split(" "):
        if not token:
            continue
        key, sep, value = token.partition("=")
        if sep and key and (key[0].isalpha() or key[0] == "_") and " " not in key:
            record[key] = value
            last = key
        elif last is not None:
            record[last] += " " + token
    return record


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What ``scontrol show job -o`` says about a job (after :meth:`SlurmCluster.wait`)."""

    job_id: str
    state: str  #: JobState, e.g. ``COMPLETED``, ``FAILED``, ``CANCELLED``, ``TIMEOUT``
    exit_code: str  #: ExitCode ``"<rc>:<signal>"``, e.g. ``"0:0"``
    restarts: int  #: Restarts, i.e. how often the job was requeued
    reason: str
    info: dict[str, str]  #: the whole record

    @property
    def returncode(self) -> int:
        return int(self.exit_code.split(":")[0])

    @property
    def std_out(self) -> Path | None:
        p = self.info.get("StdOut")
        return Path(p) if p else None

    @classmethod
    def from_record(cls, job_id: str, rec: Mapping[str, str]) -> "JobResult":
        return cls(
            job_id=job_id,
            state=rec.get("JobState", "UNKNOWN"),
            exit_code=rec.get("ExitCode", "?:?"),
            restarts=int(rec.get("Restarts", "0") or 0),
            reason=rec.get("Reason", ""),
            info=dict(rec),
        )


class SlurmCluster:
    """Handle on a running private cluster; created by :func:`start_slurm_cluster`.

    Attributes:
        root: temp dir holding everything (config, state, spool, logs, job files).
        conf_path: the private ``slurm.conf``.
        env: environment for client commands *and* jobs (``SLURM_CONF``, ``PATH`` with
            this interpreter's bin dir first, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``).
        nodes: node names, ``("node1", "node2")``.
        gpus_per_node: number of fake GPUs (``Gres=gpu:N``) per node.
        job_dir: default ``--chdir`` and output directory for :meth:`sbatch`.
    """

    def __init__(self, root: Path, conf_path: Path, env: dict[str, str], ports: dict[str, int]):
        self.root = root
        self.conf_path = conf_path
        self.env = env
        self.ports = ports
        self.nodes: tuple[str, ...] = NODE_NAMES
        self.cpus_per_node = CPUS_PER_NODE
        self.gpus_per_node = GPUS_PER_NODE
        self.job_dir = root / "jobs"
        self.log_dir = root / "log"
        self._procs: dict[str, subprocess.Popen] = {}
        #: True if the fake GPU files are char devices (then jobs get CUDA_VISIBLE_DEVICES)
        self.fake_gpus_are_devices = False
        self.owns_root = False  #: remove ``root`` in :meth:`stop` (set when we made it)
        self._script_counter = itertools.count()

    # ------------------------------------------------------------------ commands
    def run(
        self,
        *cmd: str | os.PathLike,
        timeout: float = COMMAND_TIMEOUT_S,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a client command (``squeue``, ``scontrol`` ...) against this cluster."""
        argv = [os.fspath(c) for c in cmd]
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        try:
            proc = subprocess.run(
                argv,
                env=full_env,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise SlurmClusterError(f"{shlex.join(argv)} timed out after {timeout}s") from exc
        if check and proc.returncode != 0:
            raise SlurmClusterError(
                f"{shlex.join(argv)} failed with rc={proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def sbatch(
        self,
        script: str | os.PathLike | None = None,
        *args: str,
        env: Mapping[str, str] | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
        **opts: object,
    ) -> str:
        """Submit a batch job and return its job id (a string, e.g. ``"3"``).

        ``script`` is either the text of a batch script (a ``#!/bin/bash`` line is added
        if it has none), or the path to an existing script, or ``None`` together with
        ``wrap="command"``. ``args`` are passed to the script. ``opts`` become sbatch
        options: ``nodes=2`` -> ``--nodes=2``, ``ntasks_per_node=1`` ->
        ``--ntasks-per-node=1``, ``requeue=True`` -> ``--requeue``; ``False``/``None``
        values are dropped. Unless given, ``--output`` is ``job_dir/slurm-%j.out``,
        ``--chdir`` is ``job_dir`` and ``--export`` is ``ALL``. ``env`` entries are added
        to :attr:`env` for the submission (and thus, with ``--export=ALL``, to the job).
        Each submission gets a fresh free ``MASTER_PORT`` unless ``env`` sets one.
        """
        options = {"output": str(self.job_dir / "slurm-%j.out"), "chdir": str(self.job_dir)}
        options.update({k.replace("_", "-"): v for k, v in opts.items()})
        options.setdefault("export", "ALL")
        argv: list[str] = ["sbatch", "--parsable"]
        for key, value in options.items():
            if value is None or value is False:
                continue
            argv.append(f"--{key}" if value is True else f"--{key}={value}")
        if script is not None:
            argv.append(os.fspath(self._script_path(script)))
            argv.extend(str(a) for a in args)
        elif "wrap" not in options:
            raise ValueError("sbatch() needs a script or wrap=...")
        elif args:
            raise ValueError("positional args need a script (not wrap=...)")
        submit_env = {"MASTER_PORT": str(free_port())}  # fresh per job: jobs may overlap
        submit_env.update(env or {})
        out = self.run(*argv, env=submit_env, timeout=timeout).stdout.strip()
        # --parsable prints "jobid" or "jobid;cluster"
        return out.splitlines()[-1].split(";")[0].strip()

    def _script_path(self, script: str | os.PathLike) -> Path:
        if isinstance(script, os.PathLike) or (
            isinstance(script, str) and "\n" not in script and Path(script).is_file()
        ):
            return Path(script)
        text = str(script)
        if not text.startswith("#!"):
            text = "#!/bin/bash\n" + text
        if not text.endswith("\n"):
            text += "\n"
        path = self.job_dir / f"script-{next(self._script_counter)}.sh"
        path.write_text(text)
        path.chmod(0o755)
        return path

    def job_info(self, job_id: str | int) -> dict[str, str] | None:
        """``scontrol show job -o <id>`` as a dict, or ``None`` if slurmctld forgot it."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return None
            raise SlurmClusterError(f"scontrol show job {job_id} failed: {proc.stderr}")
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        if not lines:
            return None
        # a heterogeneous / array job prints several records; the first is the leader
        return parse_scontrol_record(lines[0])

    def state(self, job_id: str | int) -> JobResult:
        rec = self.job_info(job_id)
        if rec is None:
            raise SlurmClusterError(f"job {job_id} unknown to slurmctld (MinJobAge passed?)")
        return JobResult.from_record(str(job_id), rec)

    def wait(
        self,
        job_id: str | int,
        timeout: float = 60.0,
        states: Sequence[str] | frozenset[str] = TERMINAL_STATES,
        poll: float = 0.5,
    ) -> JobResult:
        """Poll ``scontrol show job`` until the job is in one of ``states`` (default: a
        terminal state) and return it. Raises :class:`SlurmClusterError` with the job
        record, its output file and the daemon logs on timeout."""
        wanted = frozenset(states)
        deadline = time.monotonic() + timeout
        last: JobResult | None = None
        while True:
            self._check_alive()
            last = self.state(job_id)
            if last.state in wanted:
                return last
            if time.monotonic() > deadline:
                break
            time.sleep(poll)
        raise SlurmClusterError(
            f"job {job_id} not in {sorted(wanted)} after {timeout}s; last state {last.state}"
            f" (reason {last.reason}, restarts {last.restarts})\n"
            f"record: {last.info}\n{self.describe_job_output(last)}\n{self.logs()}"
        )

    def describe_job_output(self, result: JobResult) -> str:
        path = result.std_out
        if path is None:
            return "<no StdOut>"
        return f"--- {path} ---\n{_tail(path)}"

    def signal(
        self, job_id: str | int, sig: str = "USR1", *, batch: bool = False, full: bool = False
    ) -> None:
        """Send ``sig`` to a running job with ``scancel --signal``.

        Default: the job's *steps* only (the ``srun`` tasks), not the batch shell --
        exactly where Lightning's SIGUSR1 handler runs. ``batch=True`` adds ``--batch``
        (only the batch shell and its children); ``full=True`` adds ``--full`` (steps
        *and* batch shell). Beware: a bash batch shell without ``trap`` dies on USR1.
        """
        argv = ["scancel", f"--signal={sig}"]
        if batch:
            argv.append("--batch")
        if full:
            argv.append("--full")
        self.run(*argv, str(job_id))

    def cancel(self, job_id: str | int) -> None:
        self.run("scancel", str(job_id), check=False)

    def jobs(self) -> list[str]:
        """Ids of all jobs slurmctld knows that are not finished."""
        proc = self.run("squeue", "-h", "-o", "%i", check=False)
        return [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]

    def node_states(self) -> dict[str, str]:
        """``{node: state}`` from ``sinfo -N`` (e.g. ``idle``, ``alloc``, ``down*``)."""
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10)
        states: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def logs(self, max_chars: int = 4000) -> str:
        """Tails of all daemon logs (and their stdout/stderr), for failure messages."""
        chunks = []
        for path in sorted(self.log_dir.glob("*")):
            limit = max_chars if path.suffix == ".log" else max_chars // 4
            chunks.append(f"===== {path} =====\n{_tail(path, limit)}")
        return "\n".join(chunks)

    def wait_for_file(self, path: str | os.PathLike, timeout: float = 30.0, job_id: str | None = None) -> Path:
        """Poll until ``path`` exists (e.g. a "ready" marker written by a job step)."""
        path = Path(path)
        deadline = time.monotonic() + timeout
        while not path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                detail = ""
                if job_id is not None:
                    with contextlib.suppress(SlurmClusterError):
                        st = self.state(job_id)
                        detail = f"\njob {job_id}: {st.state} {st.info}\n{self.describe_job_output(st)}"
                raise SlurmClusterError(f"{path} did not appear within {timeout}s{detail}\n{self.logs()}")
            time.sleep(0.2)
        return path

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
        out = open(self.log_dir / f"{name}.stdout", "wb")  # noqa: SIM115 - owned by Popen
        try:
            self._procs[name] = subprocess.Popen(
                argv,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal must not hit them
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmClusterError(
                    f"{name} (pid {proc.pid}) exited with rc={proc.returncode}\n{self.logs()}"
                )

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Cancel all jobs, stop the daemons (SIGTERM, then SIGKILL), then kill any
        process still carrying this cluster's ``SLURM_CONF`` (stray slurmstepd/tasks)."""
        if self._procs and all(p.poll() is None for p in self._procs.values()):
            with contextlib.suppress(Exception):
                ids = self.jobs()
                if ids:
                    self.run("scancel", "--full", *ids, check=False, timeout=10)
                    deadline = time.monotonic() + timeout
                    while self.jobs() and time.monotonic() < deadline:
                        time.sleep(0.5)
        # slurmds first, then slurmctld, munged last (the others need it to shut down)
        order = [n for n in self._procs if n.startswith("slurmd")]
        order += [n for n in self._procs if n not in order and n != "munged"]
        order += [n for n in self._procs if n == "munged"]
        for name in order:
            proc = self._procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, _signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self._kill_strays()
        if self.owns_root and not os.environ.get(KEEP_ENV):
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_strays(self) -> None:
        marker = f"{MARKER_ENV}={self.root}".encode()
        spare = _ancestors(os.getpid())
        for pid in _pids_with_env(marker):
            if pid not in spare:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, _signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (even by SIGKILL),
    so an aborted pytest run leaves no daemons behind. Linux only; best effort."""
    with contextlib.suppress(Exception):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(_signal.SIGTERM), 0, 0, 0)


def _ancestors(pid: int) -> set[int]:
    """``pid`` and its parents (never killed by the stray sweep)."""
    seen = {pid}
    with contextlib.suppress(OSError, ValueError, IndexError):
        while pid > 1:
            stat_line = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat_line.rsplit(")", 1)[1].split()[1])
            seen.add(pid)
    return seen


def _marked_processes() -> dict[str, list[tuple[int, str]]]:
    """``{cluster root: [(pid, comm), ...]}`` for all processes carrying :data:`MARKER_ENV`."""
    prefix = f"{MARKER_ENV}=".encode()
    found: dict[str, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        for var in environ.split(b"\0"):
            if var.startswith(prefix):
                found.setdefault(var[len(prefix):].decode(errors="replace"), []).append((int(entry.name), comm))
                break
    return found


def reap_dead_clusters(stale_dir_age_s: float = 3600.0) -> list[int]:
    """Kill leftovers (slurmstepd, job tasks) of clusters whose daemons are all gone --
    what an aborted (SIGKILLed) test run leaves behind: the daemons die with the test
    process (PR_SET_PDEATHSIG), but running job steps would not. Clusters with a live
    munged/slurmctld/slurmd (e.g. another engineer's concurrent run) are left alone.
    Also removes ``/tmp/xpl-slurm-*`` dirs older than ``stale_dir_age_s`` that no
    process uses. Returns the killed pids."""
    killed = []
    spare = _ancestors(os.getpid())
    procs = _marked_processes()
    for root, members in procs.items():
        if any(comm in _DAEMON_COMMS for _, comm in members):
            continue
        for pid, _ in members:
            if pid not in spare:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, _signal.SIGKILL)
                    killed.append(pid)
    now = time.time()
    for d in Path("/tmp").glob(f"{ROOT_PREFIX}*"):
        with contextlib.suppress(OSError):
            if str(d) not in procs and now - d.stat().st_mtime > stale_dir_age_s:
                shutil.rmtree(d, ignore_errors=True)
    return killed


_DAEMON_COMMS = frozenset({"munged", "slurmctld", "slurmd"})


def _pids_with_env(marker: bytes) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


# ---------------------------------------------------------------------- config
def _slurm_conf(root: Path, ports: Mapping[str, int], munge_socket: Path) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports[name]} "
        f"CPUs={CPUS_PER_NODE} Sockets=1 CoresPerSocket={CPUS_PER_NODE} ThreadsPerCore=1 "
        f"RealMemory={REAL_MEMORY_MB} Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN"
        for name in NODE_NAMES
    )
    return f"""\
# Private test cluster generated by tests/slurm_cluster.py -- do not edit.
ClusterName=xpltest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports["slurmctld"]}
SlurmdPort={ports[NODE_NAMES[0]]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=5
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root}/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,defer_batch=0
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=10
SlurmdTimeout=30
SlurmctldTimeout=30
MessageTimeout=10
InactiveLimit=0
Waittime=0
TCPTimeout=5
UnkillableStepTimeout=30
{nodes}
PartitionName=debug Nodes={",".join(NODE_NAMES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _gres_conf(root: Path) -> str:
    last = GPUS_PER_NODE - 1
    lines = ["AutoDetect=off"]
    for name in NODE_NAMES:
        lines.append(f"NodeName={name} Name=gpu File={root}/dev/{name}/fakegpu[0-{last}]")
    return "\n".join(lines) + "\n"


def _make_fake_device(path: Path) -> None:
    """A character device with /dev/null's numbers (1, 3): slurmd only derives the GPU
    index (-> ``CUDA_VISIBLE_DEVICES``) from ``File=`` entries that are char/block
    devices; for a plain file it logs "not a valid character or block device" and jobs
    get ``SLURM_GPUS_ON_NODE`` but no ``CUDA_VISIBLE_DEVICES``."""
    if path.exists():
        return
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError:  # e.g. no CAP_MKNOD: fall back to a plain file (see above)
        path.touch()


def _missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None and not _in_sbin(b)]


def _in_sbin(name: str) -> bool:
    return any(Path(d, name).is_file() for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"))


def _which(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        if Path(d, name).is_file():
            return str(Path(d, name))
    raise SlurmClusterError(f"{name} not found; {INSTALL_HINT}")


def _make_root() -> Path:
    # unix socket paths are limited to 107 bytes, so keep the root short
    return Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir="/tmp"))


def start_slurm_cluster(root: Path | None = None, startup_timeout: float = STARTUP_TIMEOUT_S) -> SlurmCluster:
    """Create config + daemons under ``root`` (a fresh temp dir if ``None``) and wait
    until both nodes are idle. The caller owns the result and must call ``stop()``
    (prefer :func:`slurm_cluster_ctx` or the ``slurm_cluster`` fixture)."""
    missing = _missing_binaries()
    if missing:
        raise SlurmClusterError(f"SLURM/munge binaries missing: {', '.join(missing)}; {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise SlurmClusterError("the private SLURM cluster must run as root (SlurmUser=root)")
    with contextlib.suppress(Exception):
        reap_dead_clusters()
    owns_root = root is None
    root = Path(root) if root is not None else _make_root()
    for sub in ("etc", "state", "run", "log", "jobs", "munge", *(f"spool/{n}" for n in NODE_NAMES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o755)
    for name in NODE_NAMES:
        dev = root / "dev" / name
        dev.mkdir(parents=True, exist_ok=True)
        for i in range(GPUS_PER_NODE):
            _make_fake_device(dev / f"fakegpu{i}")

    ports = dict(zip(("slurmctld", *NODE_NAMES, "master"), _free_ports(2 + len(NODE_NAMES))))
    munge_socket = root / "munge" / "munge.socket"
    conf_path = root / "etc" / "slurm.conf"
    conf_path.write_text(_slurm_conf(root, ports, munge_socket))
    (root / "etc" / "gres.conf").write_text(_gres_conf(root))
    (root / "etc" / "plugstack.conf").write_text("# empty: no SPANK plugins\n")

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_", "SACCT_", "MUNGE_"))}
    bindir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bindir, base_env.get("PATH", "/usr/bin:/bin"), "/usr/sbin", "/sbin"])
    env = {
        **base_env,
        "PATH": path,
        "SLURM_CONF": str(conf_path),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(ports["master"]),
        "PYTHONUNBUFFERED": "1",
        MARKER_ENV: str(root),
    }
    cluster = SlurmCluster(root, conf_path, env, ports)
    cluster.owns_root = owns_root
    cluster.fake_gpus_are_devices = all(
        stat.S_ISCHR(p.stat().st_mode) for p in (root / "dev").glob("*/fakegpu*")
    )
    try:
        _start_daemons(cluster, munge_socket, startup_timeout)
    except BaseException:
        cluster.stop(timeout=5)
        raise
    return cluster


def _start_daemons(cluster: SlurmCluster, munge_socket: Path, timeout: float) -> None:
    root, env, conf = cluster.root, cluster.env, str(cluster.conf_path)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    cluster._spawn(
        "munged",
        [
            _which("munged"),
            "--foreground",
            "--force",
            f"--socket={munge_socket}",
            f"--key-file={key}",
            f"--pid-file={root}/run/munged.pid",
            f"--log-file={root}/log/munged.log",
            f"--seed-file={root}/munge/munged.seed",
        ],
        env,
    )
    _wait_for(lambda: munge_socket.exists(), timeout, "munged socket", cluster)

    cluster._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", conf], env)
    _wait_for(
        lambda: cluster.run("scontrol", "ping", check=False, timeout=10).stdout.count("UP") > 0,
        timeout,
        "slurmctld to answer `scontrol ping`",
        cluster,
    )
    for name in cluster.nodes:
        cluster._spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-N", name, "-f", conf], env)

    def all_idle() -> bool:
        states = cluster.node_states()
        return all(states.get(n, "").rstrip("*") == "idle" for n in cluster.nodes)

    _wait_for(all_idle, timeout, "both nodes idle in sinfo", cluster)


def _wait_for(cond, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while True:
        cluster._check_alive()
        with contextlib.suppress(SlurmClusterError):
            if cond():
                return
        if time.monotonic() > deadline:
            extra = ""
            with contextlib.suppress(Exception):
                extra = f"\nsinfo: {cluster.node_states()}"
            raise SlurmClusterError(f"timed out after {timeout}s waiting for {what}{extra}\n{cluster.logs()}")
        time.sleep(0.3)


@contextlib.contextmanager
def slurm_cluster_ctx(root: Path | None = None) -> Iterator[SlurmCluster]:
    """``with slurm_cluster_ctx() as c:`` -- starts a cluster, always stops it."""
    cluster = start_slurm_cluster(root)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Session-scoped private two-node SLURM cluster (see module docstring)."""
    try:
        cluster = start_slurm_cluster()
    except SlurmClusterError as exc:
        pytest.fail(f"could not start the private SLURM cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
