"""A steady-state training step (not a logging, checkpoint or validation step) makes no device-to-host read
and no collective: counted in real fits of the shipped recipes (2 gloo ranks, and 1 rank launched as under
srun), with xception_pl.host_syncs.HostSyncCounter. The one-rank fit trains the recipe's Xception; the 2-rank
fits train tests.crash.TinyNetwork in its place (what they add is DDP's, around the network; an Xception step
in bf16 autocast takes seconds on a CPU without bf16 instructions, and they were 2 of the suite's 3 longest tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRUN_ENV = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "steady", "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_JOB_NUM_NODES": "1"}


@pytest.mark.parametrize("recipe, devices, env", [
    ("imagenet", 2, {}), ("jft", 2, {}), ("imagenet", 1, SRUN_ENV)], ids=["imagenet-ddp", "jft-ddp", "imagenet-srun"])
def test_a_steady_state_step_never_waits_for_the_host(tmp_path, recipe, devices, env):
    syncs = tmp_path / "syncs.json"
    data = ["--data", "xception_pl.data.synthetic.SyntheticDataModule", "--data.init_args.image_size", "71",
            "--data.init_args.batch_size", "2", "--data.init_args.train_size", "64",
            "--data.init_args.num_classes", "12", "--data.init_args.multilabel", str(recipe == "jft").lower()]
    command = [sys.executable, "-m", "xception_pl", "fit", "--config", f"configs/{recipe}.yaml", *data,
               "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
               "--trainer.strategy", "ddp" if devices > 1 else "auto", "--trainer.max_steps", "9",
               *(["--model.network", "tests.crash.TinyNetwork"] if devices > 1 else []),
               "--trainer.log_every_n_steps", "4", "--trainer.limit_val_batches", "0",
               "--trainer.default_root_dir", str(tmp_path / "run"),  # progress bar on, as shipped
               "--trainer.callbacks+=xception_pl.host_syncs.HostSyncCounter", f"--trainer.callbacks.output={syncs}",
               # the stop signal's agreement between logging steps (every ~5 s, RequeueOnSignal) out of the way
               "--trainer.callbacks+=tests.probes.StopCheckEvery", "--trainer.callbacks.seconds=3600"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | env
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    files = [syncs.with_name(f"syncs.rank{r}.json") for r in range(devices)] if devices > 1 else [syncs]
    for file in files:
        records = json.loads(file.read_text())["records"]
        # steps 4 and 8 log, and the last (ValidateAtEnd stops the fit there, which makes it a logging step)
        assert len(records) == 9 and [r["global_step"] for r in records if r["logs"]] == [4, 8, 9]
        # not the first step (set-up) nor the last (the end of training saves and syncs)
        steady = [r for r in records[1:-1] if not (r["logs"] or r["validated"] or r["checkpointed"])]
        assert len(steady) >= 5
        assert [(r["reads"], r["collectives"]) for r in steady] == [(0, 0)] * len(steady), steady
        # and the counter sees what logging steps do (so a zero above is not a blind counter)
        assert all(r["reads"] > 0 for r in records if r["logs"])
