"""The client side of a running cluster: :class:`SlurmCluster` (sbatch, wait, signal,
scontrol/squeue/sinfo helpers, daemon logs), :class:`JobResult` and the ``scontrol -o`` parser."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.helpers import free_port
from tests.slurm import daemons
from tests.slurm.config import COMMAND_TIMEOUT_S, GPUS_PER_NODE, NODE_NAMES, STOP_TIMEOUT_S, SlurmClusterError

#: Job states after which a job never runs again (``REQUEUED``/``COMPLETING`` are not final).
TERMINAL_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                             "PREEMPTED", "REVOKED", "TIMEOUT"})


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
        self.gpus_per_node = GPUS_PER_NODE
        self.job_dir = root / "jobs"
        self.log_dir = root / "log"
        self._procs: dict[str, subprocess.Popen] = {}
        #: True if the fake GPU files are char devices (then jobs get CUDA_VISIBLE_DEVICES)
        self.fake_gpus_are_devices = False
        self.owns_root = False  #: remove ``root`` in :meth:`stop` (set when we made it)
        self._script_counter = itertools.count()

    # ------------------------------------------------------------------ commands
    def run(self, *cmd: str | os.PathLike, timeout: float = COMMAND_TIMEOUT_S, check: bool = True,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a client command (``squeue``, ``scontrol`` ...) against this cluster."""
        argv = [os.fspath(c) for c in cmd]
        full_env = {**self.env, **(env or {})}
        try:
            proc = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
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
    def _spawn(self, name: str, argv: list[str]) -> None:
        self._procs[name] = daemons.spawn(name, argv, self.env, self.log_dir)

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmClusterError(
                    f"{name} (pid {proc.pid}) exited with rc={proc.returncode}\n{self.logs()}"
                )

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Cancel all jobs, stop the daemons (SIGTERM, then SIGKILL), then kill any
        process still carrying this cluster's marker env var (stray slurmstepd/tasks)."""
        daemons.stop_cluster(self, timeout)
