"""Getting a cluster: the session fixture ``slurm_cluster``, ``with slurm_cluster_ctx()`` and
:func:`start_slurm_cluster`. This module is the pytest plugin: ``pytest_plugins =
["tests.slurm.fixture"]`` (tests/conftest.py); do not import the fixture itself (see README.md)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm import config
from tests.slurm.cluster import SlurmCluster
from tests.slurm.config import ROOT_PREFIX, STARTUP_TIMEOUT_S, SlurmClusterError
from tests.slurm.daemons import reap_dead_clusters, start_daemons


def start_slurm_cluster(root: Path | None = None, startup_timeout: float = STARTUP_TIMEOUT_S) -> SlurmCluster:
    """Create config + daemons under ``root`` (a fresh temp dir if ``None``) and wait
    until both nodes are idle. The caller owns the result and must call ``stop()``
    (prefer :func:`slurm_cluster_ctx` or the ``slurm_cluster`` fixture)."""
    config.check_host()
    with contextlib.suppress(Exception):
        reap_dead_clusters()
    owns_root = root is None
    # unix socket paths are limited to 107 bytes, so keep the root short
    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir="/tmp"))
    config.make_tree(root)
    ports = config.pick_ports()
    conf_path = config.write_config(root, ports)
    cluster = SlurmCluster(root, conf_path, config.cluster_env(root, conf_path, ports["master"]), ports)
    cluster.owns_root = owns_root
    cluster.fake_gpus_are_devices = config.fake_gpus_are_devices(root)
    try:
        start_daemons(cluster, startup_timeout)
    except BaseException:
        cluster.stop(timeout=5)
        raise
    return cluster


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
    """Session-scoped private two-node SLURM cluster (see tests/slurm/README.md)."""
    try:
        cluster = start_slurm_cluster()
    except SlurmClusterError as exc:
        pytest.fail(f"could not start the private SLURM cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
