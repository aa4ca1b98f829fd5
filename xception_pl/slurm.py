"""SLURM launch checks and the run record. (Placeholder: filled in by the SLURM work.)"""

from pathlib import Path


def check_launch() -> None:
    """Fail fast, with the fix, on a SLURM launch that would hang or mismatch devices."""


def record_run(root: Path) -> None:
    """Keep the sbatch script and the SLURM environment of this job in the run directory."""
