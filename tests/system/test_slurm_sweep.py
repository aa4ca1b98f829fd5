"""A study as a SLURM job array on the private test cluster (tests/slurm/): `sweep --submit` ->
one array task per variant -> one run directory each -> a report with a row per variant."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.slurm import SlurmCluster
from tests.system.test_sweep import DEMO, ROOT, STEPS, tiny_base, tiny_study
from xception_pl.data import make_demo_data
from xception_pl.report import report

JOB_ENV = {"PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
ONE_CPU_TASK = "--nodes=1 --ntasks-per-node=1 --gres=gpu:1 --cpus-per-task=1 --time=15"


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """The two-variant tiny study, its demo shards built once here (not by two array tasks at once)."""
    make_demo_data(str(tmp_path / "demo"), DEMO["num_classes"], DEMO["train_images_per_class"],
                   DEMO["val_images_per_class"], DEMO["source_size"])
    return tiny_study(tmp_path)


def submit_sweep(cluster: SlurmCluster, folder: Path, study: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "xception_pl", "sweep", str(study), "--submit", "--base", str(tiny_base(folder)),
         "--sbatch", ONE_CPU_TASK],
        cwd=folder, env={**cluster.env, **JOB_ENV}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"sbatch --array=0-1 --job-name=activations {ONE_CPU_TASK} {ROOT / 'slurm' / 'sweep.sh'}" in result.stdout
    return re.search(r"Submitted batch job (\d+)", result.stdout).group(1)


@pytest.mark.timeout(600)
def test_submitted_sweep_runs_one_array_task_per_variant_into_its_own_run_directory(slurm_cluster, study, tmp_path):
    job = submit_sweep(slurm_cluster, tmp_path, study)
    for task, variant in enumerate(("none", "relu")):
        result = slurm_cluster.wait(f"{job}_{task}", timeout=540)
        output = (tmp_path / f"slurm-activations-{job}_{task}.out").read_text(errors="replace")
        assert result.state == "COMPLETED", output
        assert f"sweep activations: task {task}/1 {variant} -> runs/activations/{variant}" in output
        run = tmp_path / "runs" / "activations" / variant
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["network"]["init_args"]["intermediate_activation"] == variant
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] == STEPS
        (env,) = (run / "slurm").glob("job-*-restart0.env")  # this task's record, and no other task's
        assert f"SLURM_ARRAY_JOB_ID={job}\n" in env.read_text() and f"SLURM_ARRAY_TASK_ID={task}\n" in env.read_text()

    out = report(str(tmp_path / "runs" / "activations"), str(tmp_path / "report"))
    rows = [line.split("|")[1].strip() for line in (out / "report.md").read_text().splitlines()
            if line.startswith("| ")]
    assert rows == ["variant", "none", "relu"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("array, message", [
    (None, "error: no array task id: slurm/sweep.sh runs one variant per SLURM array task. Submit it with "
           "`python -m xception_pl sweep {study} --submit` (it passes --array=0-1)"),
    ("2", "error: task 2 is not in 0-1: {study} has 2 tasks (none, relu); submit with --array=0-1"),
])
def test_sweep_script_outside_its_array_fails_with_one_line(slurm_cluster, study, tmp_path, array, message):
    job = slurm_cluster.sbatch(ROOT / "slurm" / "sweep.sh", str(study), "--base", str(tiny_base(tmp_path)),
                               env=JOB_ENV, chdir=str(tmp_path), output=str(tmp_path / "out.txt"), array=array,
                               nodes=1, ntasks_per_node=1, gres="gpu:1", cpus_per_task=1)
    result = slurm_cluster.wait(f"{job}_{array}" if array else job, timeout=240)
    output = (tmp_path / "out.txt").read_text(errors="replace")
    assert result.state == "FAILED", output
    assert message.format(study=study) in output
    assert "Traceback" not in output and not (tmp_path / "runs").exists()
