"""Sweeps (xception_pl/sweep.py): a study file -> one run directory per variant, locally and by array task id."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import IMAGE, scalars
from xception_pl.sweep import load_study

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4  # one epoch: 6 classes x 2 images / batch 3
BATCH = 3
DEMO = dict(num_classes=6, train_images_per_class=2, val_images_per_class=2, source_size=80)  # 6 classes: top-5 too


def tiny_base(folder: Path) -> Path:
    """The CPU demo recipe cut to 4 steps at 71 px on demo shards of 12 images made in `folder`. A sweep base,
    not tests.helpers.run_config: the sweep sets each run's directory, and the schedule is the module's own."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "val_check_interval": 2,
                    "log_every_n_steps": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "model": {"network": {"class_path": "xception_pl.Xception", "init_args": {"drop_rate": 0.5}},
                  "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}}},
        "ema": {"decay": 0.5},
        "data": {"class_path": "xception_pl.data.DemoDataModule",
                 "init_args": {"root": str(folder / "demo"), **DEMO, "batch_size": BATCH, "num_workers": 0,
                               "image_size": IMAGE, "eval_resize": 80}},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_study(folder: Path, name: str = "activations") -> Path:
    """Two variants of Figure 10's switch, on the tiny base; the base given in the file is the GPU recipe,
    replaced on the command line with --base as the README's demo does."""
    study = {"base": "configs/imagenet.yaml",
             "variants": {"none": {"model.network.init_args.intermediate_activation": "none"},
                          "relu": {"model.network.init_args.intermediate_activation": "relu"}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def sweep(*args: str, cwd: Path = ROOT, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xception_pl", "sweep", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def run_local_sweep(folder: Path) -> Path:
    """The local sweep of the two tiny variants into folder/runs/activations; returns that directory."""
    result = sweep(tiny_study(folder), "--local", "--base", tiny_base(folder), "--runs", folder / "runs")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return folder / "runs" / "activations"


@pytest.mark.timeout(900)
def test_local_sweep_trains_each_variant_in_its_own_run_directory(tmp_path):
    study = run_local_sweep(tmp_path)
    assert sorted(p.name for p in study.iterdir() if p.is_dir()) == ["none", "relu"]
    for variant in ("none", "relu"):
        run = study / variant
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["network"]["init_args"]["intermediate_activation"] == variant
        assert config["trainer"]["default_root_dir"] == str(run)
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == STEPS
        logged = scalars(run)
        assert [s for s, _ in logged["train/loss"]] == list(range(STEPS))
        # validated after steps 2 and 4 (val_check_interval 2); no step-0 echo from the HPARAMS summary
        assert [s for s, _ in logged["val/acc1"]] == [1, 3]
    recorded = yaml.safe_load((study / "study.yaml").read_text())
    assert [r["name"] for r in recorded["runs"]] == ["none", "relu"]

    # Running the same sweep again resumes each run from its own last.ckpt: nothing is retrained.
    again = sweep(tiny_study(tmp_path), "--local", "--base", tiny_base(tmp_path), "--runs", tmp_path / "runs")
    assert again.returncode == 0, again.stderr[-3000:]
    for variant in ("none", "relu"):
        assert f"resuming from {study / variant / 'checkpoints' / 'last.ckpt'}" in again.stdout
        assert [s for s, _ in scalars(study / variant)["train/loss"]] == list(range(STEPS))


def test_tasks_are_variants_times_seeds_each_with_its_own_run_directory(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"base": "configs/imagenet.yaml", "seeds": [1, 2],
                                    "variants": {"a": {"model.network.init_args.residual": False},
                                                 "b": {"model.network": "xception_pl.inception.InceptionV3"}}}))
    study = load_study(path, runs=str(tmp_path / "runs"), extra=["--trainer.max_epochs", "1"])
    assert [t.name for t in study.tasks] == ["a-seed1", "a-seed2", "b-seed1", "b-seed2"]
    assert len({t.run_dir for t in study.tasks}) == 4
    first = study.tasks[0].args
    assert first == ("--config", "configs/imagenet.yaml", "--model.network.init_args.residual", "false",
                     "--seed_everything", "1", "--trainer.max_epochs", "1",
                     "--trainer.default_root_dir", str(tmp_path / "runs" / "study" / "a-seed1"), "--ckpt_path", "last")


@pytest.mark.parametrize("study", sorted((ROOT / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_study_of_the_paper_parses_against_the_cli(study, capsys, monkeypatch):
    """Each variant's overrides are valid LightningCLI arguments on its base config (parsed, not trained; in this
    process, as `python -m xception_pl fit ... --print_config` parses them)."""
    from xception_pl.cli import main

    monkeypatch.chdir(ROOT)
    tasks = load_study(study).tasks
    assert len(tasks) >= 2
    for task in tasks:
        args = [a for a in task.args if a not in ("--ckpt_path", "last")]
        with pytest.raises(SystemExit) as stop:
            main(["fit", *args, "--print_config"])
        printed = capsys.readouterr()
        assert stop.value.code in (0, None), printed.err[-2000:]
        assert f"default_root_dir: runs/{study.stem}/{task.name}" in printed.out


@pytest.mark.parametrize("task, message", [
    ("", "error: no array task id: slurm/sweep.sh runs one variant per SLURM array task. Submit it with "
         "`python -m xception_pl sweep {study} --submit` (it passes --array=0-1)"),
    ("2", "error: task 2 is not in 0-1: {study} has 2 tasks (none, relu); submit with --array=0-1"),
    ("x", "error: task x is not in 0-1"),
])
def test_a_task_id_out_of_range_fails_with_one_line(tmp_path, task, message, monkeypatch):
    """In this process (`python -m xception_pl sweep` is xception_pl.sweep.main): a SystemExit with a message is
    exit code 1 and that one line on stderr, no traceback."""
    from xception_pl.sweep import main as sweep_main

    monkeypatch.chdir(ROOT)
    study = tiny_study(tmp_path)
    with pytest.raises(SystemExit) as stop:
        sweep_main([str(study), "--task", task, "--base", str(tiny_base(tmp_path))])
    said = str(stop.value.code)
    assert said.startswith(message.format(study=study)) and "\n" not in said, said


@pytest.mark.parametrize("content, message", [
    ("variants: {a: {}}\n", "no `base:` config"),
    ("base: configs/imagenet.yaml\n", "`variants:` must map each variant name"),
    ("base: configs/imagenet.yaml\nvariant: {a: {}}\n", "unknown keys ['variant']"),
    ("base: configs/nope.yaml\nvariants: {a: {}}\n", "base config configs/nope.yaml does not exist"),
    ("base: configs/imagenet.yaml\nvariants: {a/b: {}}\n", "variant name 'a/b' must be a directory name"),
])
def test_a_bad_study_file_fails_before_any_run(tmp_path, content, message, monkeypatch):
    from xception_pl.sweep import main as sweep_main  # in this process, as the test above

    monkeypatch.chdir(ROOT)
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as stop:
        sweep_main([str(path), "--local", "--runs", str(tmp_path / "runs")])
    said = str(stop.value.code)
    assert said.startswith("error: ") and message in said and "\n" not in said, said
    assert not (tmp_path / "runs").exists()


def test_submit_without_sbatch_says_where_to_run_it(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "xception_pl", "sweep", str(tiny_study(tmp_path)), "--submit"],
                            cwd=ROOT, env={**os.environ, "PATH": str(tmp_path / "empty")}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stdout.startswith("sbatch --array=0-1 --job-name=activations ")  # the command it would run
    assert result.stderr.strip() == ("error: sbatch is not on PATH: submit from a SLURM login node, or run the "
                                     "study here with --local")
