"""A private, throw-away SLURM cluster for tests: munged + slurmctld + two slurmd on 127.0.0.1.

See README.md in this folder. tests/conftest.py registers the fixture module as a plugin
(``pytest_plugins = ["tests.slurm.fixture"]``); a test asks for ``slurm_cluster`` and imports
the names below from ``tests.slurm``.
"""

from tests.slurm.cluster import TERMINAL_STATES, JobResult, SlurmCluster, parse_scontrol_record
from tests.slurm.config import REQUIRED_BINARIES, SlurmClusterError
from tests.slurm.daemons import reap_dead_clusters
from tests.slurm.fixture import slurm_cluster_ctx, start_slurm_cluster

__all__ = [
    "SlurmCluster",
    "SlurmClusterError",
    "JobResult",
    "TERMINAL_STATES",
    "REQUIRED_BINARIES",
    "start_slurm_cluster",
    "slurm_cluster_ctx",
    "reap_dead_clusters",
    "parse_scontrol_record",
]
