"""Tests of the private SLURM test cluster itself (tests/slurm/).

They document the behaviour later tests rely on: two nodes, ``srun`` ranks, fake GPUs
via GRES, requeue with ``SLURM_RESTART_COUNT``, and how SIGUSR1 reaches job steps.
"""

from __future__ import annotations

import re
import sys
import textwrap
import time
from pathlib import Path

import pytest

# Registers the `slurm_cluster` fixture. As a plugin (not an imported fixture) it is
# the same single session cluster when tests/conftest.py also lists this plugin.
pytest_plugins = ["tests.slurm.fixture"]
pytest.register_assert_rewrite("tests.slurm.fixture")  # no "already imported" warning

from tests.slurm import SlurmCluster, SlurmClusterError, config, daemons  # noqa: E402
from tests.slurm import slurm_cluster_ctx, start_slurm_cluster  # noqa: E402

PY = sys.executable

# A job step that records SIGUSR1 per rank and then waits for a "release" file.
SIGNAL_STEP = textwrap.dedent(
    """\
    import os, signal, sys, time
    from pathlib import Path

    out = Path(sys.argv[1])
    rank = os.environ["SLURM_PROCID"]
    node = os.environ["SLURMD_NODENAME"]

    def on_usr1(signum, frame):
        (out / f"step-got-usr1-{rank}").write_text(f"{signum} {node}\\n")

    signal.signal(signal.SIGUSR1, on_usr1)
    (out / f"ready-{rank}").write_text(node)
    deadline = time.monotonic() + float(sys.argv[2])
    while not (out / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"rank {rank} on {node} exits", flush=True)
    """
)

# Batch shell: traps USR1 (a bare bash would die from it), runs the step on both nodes.
SIGNAL_BATCH = textwrap.dedent(
    """\
    #!/bin/bash
    OUT="$1"
    trap 'echo "batch shell got USR1"; touch "$OUT/batch-got-usr1"' USR1
    srun {py} "$OUT/step.py" "$OUT" "$2" &
    # `wait` returns early (rc 138) when a trapped signal arrives: wait again
    while ! wait; do :; done
    echo "batch done"
    """
).replace("{py}", PY)


def _out(s: SlurmCluster, result) -> str:
    return s.describe_job_output(result)


def _signal_job(s: SlurmCluster, name: str, step_timeout: float = 60, **opts) -> tuple[str, Path]:
    out = s.job_dir / name
    out.mkdir()
    (out / "step.py").write_text(SIGNAL_STEP)
    job = s.sbatch(
        SIGNAL_BATCH, str(out), str(step_timeout), nodes=2, ntasks_per_node=1,
        output=str(out / "slurm-%j.out"), job_name=name, **opts,
    )
    return job, out


def _received(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if "got-usr1" in p.name}


def test_cluster_is_private_and_idle(slurm_cluster: SlurmCluster):
    s = slurm_cluster
    assert s.nodes == ("node1", "node2")
    assert s.node_states() == {"node1": "idle", "node2": "idle"}
    assert Path(s.env["SLURM_CONF"]) == s.conf_path
    assert s.conf_path.is_relative_to(s.root) and not str(s.root).startswith("/etc")
    assert s.env["MASTER_ADDR"] == "127.0.0.1" and int(s.env["MASTER_PORT"]) > 0
    ping = s.run("scontrol", "ping").stdout
    assert "UP" in ping, ping
    cfg = s.run("scontrol", "show", "config").stdout
    assert re.search(r"SLURM_CONF\s*=\s*" + re.escape(str(s.conf_path)), cfg), cfg
    assert re.search(r"JobRequeue\s*=\s*1", cfg)


def test_srun_runs_one_task_on_each_node(slurm_cluster: SlurmCluster):
    s = slurm_cluster
    job = s.sbatch(
        wrap="srun bash -c 'echo rank=$SLURM_PROCID node=$SLURMD_NODENAME "
        "ntasks=$SLURM_NTASKS master=$MASTER_ADDR:$MASTER_PORT conf=$SLURM_CONF'",
        nodes=2,
        ntasks_per_node=1,
        env={"MASTER_PORT": "29512"},
    )
    res = s.wait(job, timeout=30)
    assert res.state == "COMPLETED" and res.exit_code == "0:0", _out(s, res)
    text = res.std_out.read_text()
    lines = sorted(re.findall(r"^rank=.*$", text, re.M))
    assert lines == [
        f"rank=0 node=node1 ntasks=2 master=127.0.0.1:29512 conf={s.conf_path}",
        f"rank=1 node=node2 ntasks=2 master=127.0.0.1:29512 conf={s.conf_path}",
    ], text
    assert res.info["NodeList"] == "node[1-2]"


def test_each_submission_gets_a_fresh_master_port(slurm_cluster: SlurmCluster):
    s = slurm_cluster
    jobs = [s.sbatch(wrap="echo port=$MASTER_PORT addr=$MASTER_ADDR") for _ in range(2)]
    ports = []
    for job in jobs:
        res = s.wait(job, timeout=30)
        assert res.state == "COMPLETED", _out(s, res)
        m = re.search(r"port=(\d+) addr=127\.0\.0\.1", res.std_out.read_text())
        assert m, _out(s, res)
        ports.append(m.group(1))
    assert ports[0] != ports[1]


def test_gres_gpu_is_accepted_and_exported(slurm_cluster: SlurmCluster):
    s = slurm_cluster
    job = s.sbatch(
        wrap="srun bash -c 'echo node=$SLURMD_NODENAME "
        "cvd=${CUDA_VISIBLE_DEVICES:-none} gpus_on_node=${SLURM_GPUS_ON_NODE:-none}'",
        nodes=2,
        ntasks_per_node=1,
        gres=f"gpu:{s.gpus_per_node}",
    )
    res = s.wait(job, timeout=30)
    assert res.state == "COMPLETED", _out(s, res)
    text = res.std_out.read_text()
    found = dict(re.findall(r"node=(node\d) (.*)$", text, re.M))
    assert set(found) == {"node1", "node2"}, text
    for line in found.values():
        assert f"gpus_on_node={s.gpus_per_node}" in line, text
        if s.fake_gpus_are_devices:  # CUDA_VISIBLE_DEVICES needs char-device File= entries
            assert "cvd=0,1" in line, text
    assert "gres/gpu" in res.info.get("TRES", "") or "gpu:2" in res.info.get("TresPerNode", "")

    # more GPUs than a node has: rejected at submission
    with pytest.raises(SlurmClusterError, match="Requested node configuration is not available"):
        s.sbatch(wrap="true", gres=f"gpu:{s.gpus_per_node + 1}")


def test_requeue_runs_the_job_again_with_restart_count(slurm_cluster: SlurmCluster):
    s = slurm_cluster
    script = textwrap.dedent(
        """\
        #!/bin/bash
        echo "run restart_count=${SLURM_RESTART_COUNT:-unset}"
        if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
            scontrol requeue "$SLURM_JOB_ID"
            echo "requeue rc=$?"
            sleep 60  # killed by the requeue
            echo "NOT REACHED"
            exit 3
        fi
        srun bash -c 'echo "step rank=$SLURM_PROCID restart=$SLURM_RESTART_COUNT"'
        """
    )
    # --open-mode=append: otherwise the second run truncates the first run's output
    job = s.sbatch(script, nodes=2, ntasks_per_node=1, requeue=True, open_mode="append")
    res = s.wait(job, timeout=60)
    text = res.std_out.read_text()
    assert res.state == "COMPLETED" and res.exit_code == "0:0", _out(s, res)
    assert res.restarts == 1, res.info
    assert "run restart_count=unset" in text and "run restart_count=1" in text, text
    assert "requeue rc=0" in text and "NOT REACHED" not in text, text
    assert sorted(re.findall(r"step rank=\d restart=\d", text)) == [
        "step rank=0 restart=1",
        "step rank=1 restart=1",
    ], text


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        # scancel --signal=USR1 <job>: every step task, NOT the batch shell
        ("steps", {"step-got-usr1-0", "step-got-usr1-1"}),
        # scancel --signal=USR1 --full <job>: step tasks AND batch shell
        ("full", {"step-got-usr1-0", "step-got-usr1-1", "batch-got-usr1"}),
        # scancel --signal=USR1 --batch <job>: only the batch shell (srun does not forward)
        ("batch", {"batch-got-usr1"}),
    ],
)
def test_scancel_signal_delivery(slurm_cluster: SlurmCluster, how: str, expected: set[str]):
    s = slurm_cluster
    job, out = _signal_job(s, f"scancel-{how}")
    for rank in (0, 1):
        s.wait_for_file(out / f"ready-{rank}", timeout=30, job_id=job)
    s.signal(job, "USR1", full=how == "full", batch=how == "batch")
    deadline = time.monotonic() + 15
    while _received(out) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # would an unexpected receiver show up late?
    got = _received(out)
    (out / "release").touch()
    res = s.wait(job, timeout=30)
    assert got == expected, f"{how}: got {sorted(got)}\n{_out(s, res)}"
    assert res.state == "COMPLETED", _out(s, res)
    if "step-got-usr1-0" in expected:
        assert {(out / f"step-got-usr1-{r}").read_text().split()[1] for r in (0, 1)} == {"node1", "node2"}


def test_sbatch_signal_option_reaches_steps_before_time_limit(slurm_cluster: SlurmCluster):
    """``--signal=USR1@N`` goes to the steps, ``--signal=B:USR1@N`` to the batch shell
    only. slurmctld checks time limits about every 30 s, so with ``--time=1`` and
    ``@55`` the signal comes 5-35 s after the start."""
    s = slurm_cluster
    steps_job, steps_out = _signal_job(s, "opt-steps", time="1", signal="USR1@55")
    batch_job, batch_out = _signal_job(s, "opt-batch", time="1", signal="B:USR1@55")
    t0 = time.monotonic()
    want = {steps_out: {"step-got-usr1-0", "step-got-usr1-1"}, batch_out: {"batch-got-usr1"}}
    while any(_received(o) != w for o, w in want.items()) and time.monotonic() - t0 < 50:
        time.sleep(0.5)
    time.sleep(0.5)
    got = {o: _received(o) for o in want}
    for o in want:
        (o / "release").touch()
    steps_res = s.wait(steps_job, timeout=30)
    batch_res = s.wait(batch_job, timeout=30)
    assert got[steps_out] == want[steps_out], _out(s, steps_res)
    assert got[batch_out] == want[batch_out], _out(s, batch_res)
    assert steps_res.state == batch_res.state == "COMPLETED", (_out(s, steps_res), _out(s, batch_res))


def test_second_private_cluster_starts_and_stops_cleanly(slurm_cluster: SlurmCluster):
    """A second cluster (own ports, own munge) runs beside the session one, and stop()
    leaves no process of it behind and removes its temp dir."""
    with slurm_cluster_ctx() as other:
        assert other.root != slurm_cluster.root
        assert other.ports["slurmctld"] != slurm_cluster.ports["slurmctld"]
        job = other.sbatch(wrap="srun sleep 300", nodes=2, ntasks_per_node=1)
        other.wait(job, timeout=30, states={"RUNNING"})
        pids = [p.pid for p in other._procs.values()]
        root = other.root
        marker = f"{config.MARKER_ENV}={root}".encode()
        time.sleep(1)
        assert len(daemons.pids_with_env(marker)) > len(pids)  # daemons + slurmstepd + tasks
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), pid
    assert [p for p in daemons.pids_with_env(marker) if not _is_zombie(p)] == []
    assert not root.exists()
    # the session cluster is unaffected
    assert slurm_cluster.node_states() == {"node1": "idle", "node2": "idle"}


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_missing_binaries_fail_with_install_hint(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(config, "missing_binaries", lambda: ["slurmctld", "munged"])
    with pytest.raises(SlurmClusterError, match=r"slurmctld, munged.*install_slurm\.sh"):
        start_slurm_cluster()
