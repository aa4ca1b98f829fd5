"""What a private cluster is made of: its sizes and knobs, the files under its root (slurm.conf,
gres.conf, fake GPU devices), its ports and environment, and where the SLURM/munge binaries are."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

#: Executables the cluster needs (Debian 12: packages ``slurm-wlm`` and ``munge``).
REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")  # the daemons live there, often not on PATH
INSTALL_HINT = "run `sudo .ci/install_slurm.sh` (Debian/Ubuntu: apt-get install slurm-wlm munge)"

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

# Every external command gets a time bound; these are the defaults.
COMMAND_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

#: Variables of an outer SLURM job (or of munge) that must not leak into the private cluster.
FOREIGN_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_", "SACCT_", "MUNGE_")


class SlurmClusterError(RuntimeError):
    """Raised when the private cluster cannot be started or a command fails."""


# ---------------------------------------------------------------------- binaries
def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        if Path(d, name).is_file():
            return str(Path(d, name))
    return None


def which(name: str) -> str:
    found = find_binary(name)
    if found is None:
        raise SlurmClusterError(f"{name} not found; {INSTALL_HINT}")
    return found


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if find_binary(b) is None]


def check_host() -> None:
    """Fail (with the install hint) unless every binary is there and we are root."""
    missing = missing_binaries()
    if missing:
        raise SlurmClusterError(f"SLURM/munge binaries missing: {', '.join(missing)}; {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise SlurmClusterError("the private SLURM cluster must run as root (SlurmUser=root)")


# ---------------------------------------------------------------------- ports and env
def free_ports(n: int) -> list[int]:
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


def pick_ports() -> dict[str, int]:
    """``slurmctld``, one per node (its slurmd), and ``master`` (the default ``MASTER_PORT``)."""
    return dict(zip(("slurmctld", *NODE_NAMES, "master"), free_ports(2 + len(NODE_NAMES))))


def cluster_env(root: Path, conf_path: Path, master_port: int) -> dict[str, str]:
    """Env for the daemons, client commands and jobs: this process's env without
    :data:`FOREIGN_ENV_PREFIXES`, this interpreter's bin dir first on ``PATH``, the private
    ``SLURM_CONF``, ``MASTER_ADDR``/``MASTER_PORT`` and :data:`MARKER_ENV`."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV_PREFIXES)}
    bindir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bindir, base_env.get("PATH", "/usr/bin:/bin"), "/usr/sbin", "/sbin"])
    return {
        **base_env,
        "PATH": path,
        "SLURM_CONF": str(conf_path),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port),
        "PYTHONUNBUFFERED": "1",
        MARKER_ENV: str(root),
    }


# ---------------------------------------------------------------------- files under the root
def munge_socket(root: Path) -> Path:
    return root / "munge" / "munge.socket"


def make_tree(root: Path) -> None:
    """The directories under ``root`` and each node's fake GPU devices."""
    for sub in ("etc", "state", "run", "log", "jobs", "munge", *(f"spool/{n}" for n in NODE_NAMES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o755)
    for name in NODE_NAMES:
        dev = root / "dev" / name
        dev.mkdir(parents=True, exist_ok=True)
        for i in range(GPUS_PER_NODE):
            make_fake_device(dev / f"fakegpu{i}")


def make_fake_device(path: Path) -> None:
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


def fake_gpus_are_devices(root: Path) -> bool:
    return all(stat.S_ISCHR(p.stat().st_mode) for p in (root / "dev").glob("*/fakegpu*"))


def write_config(root: Path, ports: Mapping[str, int]) -> Path:
    """``etc/slurm.conf``, ``etc/gres.conf`` and an empty ``etc/plugstack.conf``; returns slurm.conf's path."""
    conf_path = root / "etc" / "slurm.conf"
    conf_path.write_text(slurm_conf(root, ports, munge_socket(root)))
    (root / "etc" / "gres.conf").write_text(gres_conf(root))
    (root / "etc" / "plugstack.conf").write_text("# empty: no SPANK plugins\n")
    return conf_path


def slurm_conf(root: Path, ports: Mapping[str, int], munge_socket: Path) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports[name]} "
        f"CPUs={CPUS_PER_NODE} Sockets=1 CoresPerSocket={CPUS_PER_NODE} ThreadsPerCore=1 "
        f"RealMemory={REAL_MEMORY_MB} Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN"
        for name in NODE_NAMES
    )
    return f"""\
# Private test cluster generated by tests/slurm/config.py -- do not edit.
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


def gres_conf(root: Path) -> str:
    last = GPUS_PER_NODE - 1
    nodes = (f"NodeName={name} Name=gpu File={root}/dev/{name}/fakegpu[0-{last}]" for name in NODE_NAMES)
    return "\n".join(["AutoDetect=off", *nodes]) + "\n"
