"""The cluster's processes: start munged, slurmctld and one slurmd per node and wait until the
nodes are idle; stop them; kill what a cluster leaves behind (slurmstepd, job tasks), also
what a killed test run left."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tests.slurm.config import KEEP_ENV, MARKER_ENV, ROOT_PREFIX, SlurmClusterError, munge_socket, which

if TYPE_CHECKING:
    from tests.slurm.cluster import SlurmCluster

_DAEMON_COMMS = frozenset({"munged", "slurmctld", "slurmd"})


# ---------------------------------------------------------------------- start
def spawn(name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> subprocess.Popen:
    """Start a daemon in the foreground, its stdout+stderr in ``log_dir/<name>.stdout``."""
    out = open(log_dir / f"{name}.stdout", "wb")  # noqa: SIM115 - owned by Popen
    try:
        return subprocess.Popen(argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,  # Ctrl-C in the terminal must not hit them
                                preexec_fn=_die_with_parent)
    finally:
        out.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (even by SIGKILL),
    so an aborted pytest run leaves no daemons behind. Linux only; best effort."""
    with contextlib.suppress(Exception):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def start_daemons(cluster: SlurmCluster, timeout: float) -> None:
    """munged (own key and socket), then slurmctld, then the slurmds; each step waits for
    the previous one to answer, at most ``timeout`` s each."""
    root, conf, sock = cluster.root, str(cluster.conf_path), munge_socket(cluster.root)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    cluster._spawn("munged", [which("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                              f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
                              f"--seed-file={root}/munge/munged.seed"])
    wait_for(lambda: sock.exists(), timeout, "munged socket", cluster)

    cluster._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", conf])
    wait_for(lambda: cluster.run("scontrol", "ping", check=False, timeout=10).stdout.count("UP") > 0,
             timeout, "slurmctld to answer `scontrol ping`", cluster)
    for name in cluster.nodes:
        cluster._spawn(f"slurmd-{name}", [which("slurmd"), "-D", "-N", name, "-f", conf])

    def all_idle() -> bool:
        states = cluster.node_states()
        return all(states.get(n, "").rstrip("*") == "idle" for n in cluster.nodes)

    wait_for(all_idle, timeout, "both nodes idle in sinfo", cluster)


def wait_for(cond: Callable[[], bool], timeout: float, what: str, cluster: SlurmCluster) -> None:
    """Poll ``cond`` until true; fail at once if a daemon died, with logs on timeout."""
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


# ---------------------------------------------------------------------- stop
def stop_cluster(cluster: SlurmCluster, timeout: float) -> None:
    """Cancel all jobs, stop the daemons (SIGTERM, then SIGKILL), kill any process still
    carrying this cluster's :data:`MARKER_ENV` (stray slurmstepd/tasks), remove the root
    if the cluster made it (unless :data:`KEEP_ENV` is set)."""
    procs = cluster._procs
    if procs and all(p.poll() is None for p in procs.values()):
        with contextlib.suppress(Exception):
            ids = cluster.jobs()
            if ids:
                cluster.run("scancel", "--full", *ids, check=False, timeout=10)
                deadline = time.monotonic() + timeout
                while cluster.jobs() and time.monotonic() < deadline:
                    time.sleep(0.5)
    # slurmds first, then slurmctld, munged last (the others need it to shut down)
    for name in sorted(procs, key=lambda n: 0 if n.startswith("slurmd") else 2 if n == "munged" else 1):
        _terminate(procs[name], timeout)
    _kill(pids_with_env(f"{MARKER_ENV}={cluster.root}".encode()))
    if cluster.owns_root and not os.environ.get(KEEP_ENV):
        shutil.rmtree(cluster.root, ignore_errors=True)


def _terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then after ``timeout`` s SIGKILL to its process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


# ---------------------------------------------------------------------- leftovers
def reap_dead_clusters(stale_dir_age_s: float = 3600.0) -> list[int]:
    """Kill leftovers (slurmstepd, job tasks) of clusters whose daemons are all gone --
    what an aborted (SIGKILLed) test run leaves behind: the daemons die with the test
    process (PR_SET_PDEATHSIG), but running job steps would not. Clusters with a live
    munged/slurmctld/slurmd (e.g. another engineer's concurrent run) are left alone.
    Also removes ``/tmp/xpl-slurm-*`` dirs older than ``stale_dir_age_s`` that no
    process uses. Returns the killed pids."""
    killed = []
    procs = _marked_processes()
    for members in procs.values():
        if not any(comm in _DAEMON_COMMS for _, comm in members):
            killed += _kill(pid for pid, _ in members)
    now = time.time()
    for d in Path("/tmp").glob(f"{ROOT_PREFIX}*"):
        with contextlib.suppress(OSError):
            if str(d) not in procs and now - d.stat().st_mtime > stale_dir_age_s:
                shutil.rmtree(d, ignore_errors=True)
    return killed


def pids_with_env(marker: bytes) -> list[int]:
    """Pids of processes whose environment holds the variable ``marker`` (``b"NAME=value"``)."""
    return [pid for pid, environ, _ in _processes() if marker in environ]


def _marked_processes() -> dict[str, list[tuple[int, str]]]:
    """``{cluster root: [(pid, comm), ...]}`` for all processes carrying :data:`MARKER_ENV`."""
    prefix = f"{MARKER_ENV}=".encode()
    found: dict[str, list[tuple[int, str]]] = {}
    for pid, environ, proc_dir in _processes():
        try:
            comm = (proc_dir / "comm").read_text().strip()
        except OSError:
            continue
        for var in environ:
            if var.startswith(prefix):
                found.setdefault(var[len(prefix):].decode(errors="replace"), []).append((pid, comm))
                break
    return found


def _processes() -> Iterator[tuple[int, list[bytes], Path]]:
    """``(pid, environment variables, /proc/<pid>)`` of every process whose environ we may read."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        yield int(entry.name), environ.split(b"\0"), entry


def _kill(pids: Iterable[int]) -> list[int]:
    """SIGKILL ``pids``, sparing this process and its ancestors; returns the pids signalled."""
    spare = _ancestors(os.getpid())
    killed = []
    for pid in pids:
        if pid not in spare:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def _ancestors(pid: int) -> set[int]:
    """``pid`` and its parents (never killed by the stray sweep)."""
    seen = {pid}
    with contextlib.suppress(OSError, ValueError, IndexError):
        while pid > 1:
            stat_line = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat_line.rsplit(")", 1)[1].split()[1])
            seen.add(pid)
    return seen
