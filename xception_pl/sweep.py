"""`python -m xception_pl sweep STUDY.yaml`: one study of the paper (a base recipe and its variants), one run each.

A study file (configs/experiments/) names a base config and its variants, each a set of command-line
overrides; `seeds` optionally repeats every variant. Task i of the study (variant-major, then seed) trains
`fit --config BASE <overrides> --trainer.default_root_dir RUNS/<study>/<variant>[-seed<k>] --ckpt_path last`,
so every task has its own run directory and resumes (or is requeued) from its own checkpoints only.

    python -m xception_pl sweep STUDY.yaml                  # list the tasks and their commands
    python -m xception_pl sweep STUDY.yaml --local [...]    # run them here, one after another
    python -m xception_pl sweep STUDY.yaml --submit [...]   # sbatch --array=0-(N-1) slurm/sweep.sh STUDY.yaml
    python -m xception_pl sweep STUDY.yaml --task I [...]   # task I (what slurm/sweep.sh runs per array task)

Arguments other than the sweep's own (`--base`, `--runs`, `--sbatch`) go to every run's command line
after the variant's overrides (e.g. `--trainer.max_epochs 1`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from xception_pl.checkpointing import write_atomically

STUDY_KEYS = {"base", "variants", "seeds", "args"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a variant name is a directory name
SWEEP_SCRIPT = "slurm/sweep.sh"


@dataclass(frozen=True)
class Task:
    """One array task: a variant (and seed) of the study, with its run directory and `fit` arguments."""

    name: str
    run_dir: Path
    args: tuple[str, ...]


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    base: str
    tasks: tuple[Task, ...]


def overrides(values: dict[str, Any] | None) -> list[str]:
    """{"model.network.init_args.residual": False} -> ["--model.network.init_args.residual", "false"]."""
    flags: list[str] = []
    for key, value in (values or {}).items():
        flags += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return flags


def load_study(path: str | os.PathLike, base: str | None = None, runs: str = "runs",
               extra: list[str] | tuple[str, ...] = ()) -> Study:
    """Read and check a study file; `base` replaces its base config, `extra` is appended to every run."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: study file {path} does not exist: give one of configs/experiments/*.yaml")
    spec = yaml.safe_load(path.read_text()) or {}

    def bad(problem: str) -> SystemExit:
        return SystemExit(f"error: {path}: {problem}")

    if not isinstance(spec, dict) or set(spec) - STUDY_KEYS:
        raise bad(f"unknown keys {sorted(set(spec) - STUDY_KEYS) if isinstance(spec, dict) else spec!r}; "
                  f"a study has {sorted(STUDY_KEYS)}")
    base = base or spec.get("base")
    if not base:
        raise bad("no `base:` config (e.g. base: configs/imagenet.yaml), and no --base given")
    if not Path(base).is_file():
        raise SystemExit(f"error: base config {base} does not exist (run from the repository root, or pass --base)")
    variants = spec.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise bad("`variants:` must map each variant name to its overrides, e.g. relu: "
                  "{model.network.init_args.intermediate_activation: relu}")
    seeds = spec.get("seeds") or [None]
    if not isinstance(seeds, list) or not all(s is None or isinstance(s, int) for s in seeds):
        raise bad(f"`seeds:` must be a list of integers, got {seeds!r}")
    common = overrides(spec.get("args"))
    tasks = []
    for variant, values in variants.items():
        variant = str(variant)
        if not NAME.match(variant):
            raise bad(f"variant name {variant!r} must be a directory name (letters, digits, _ . -)")
        if values is not None and not isinstance(values, dict):
            raise bad(f"variant {variant}: overrides must be a mapping of config keys to values, got {values!r}")
        for seed in seeds:
            name = variant if len(seeds) == 1 else f"{variant}-seed{seed}"
            run_dir = Path(runs) / path.stem / name
            seeded = [] if seed is None else ["--seed_everything", str(seed)]
            args = ("--config", base, *common, *overrides(values), *seeded, *extra,
                    "--trainer.default_root_dir", str(run_dir), "--ckpt_path", "last")
            tasks.append(Task(name, run_dir, args))
    return Study(path.stem, path, base, tuple(tasks))


def pick(study: Study, task: str) -> Task:
    """The task of an array index, or a one-line error naming the fix."""
    count = len(study.tasks)
    if not task.strip():
        raise SystemExit(f"error: no array task id: slurm/sweep.sh runs one variant per SLURM array task. Submit it "
                         f"with `python -m xception_pl sweep {study.path} --submit` (it passes --array=0-{count - 1})")
    if not task.strip().isdigit() or int(task) >= count:
        raise SystemExit(f"error: task {task} is not in 0-{count - 1}: {study.path} has {count} tasks "
                         f"({', '.join(t.name for t in study.tasks)}); submit with --array=0-{count - 1}, "
                         f"as `python -m xception_pl sweep {study.path} --submit` does")
    return study.tasks[int(task)]


def record(study: Study) -> None:
    """RUNS/<study>/study.yaml: the variants in the study's order, for the report; written atomically."""
    folder = study.tasks[0].run_dir.parent
    folder.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"study": study.name, "file": str(study.path), "base": study.base,
                           "runs": [{"name": t.name, "args": list(t.args)} for t in study.tasks]}, sort_keys=False)
    write_atomically(folder / "study.yaml", text)


def command(task: Task) -> list[str]:
    return [sys.executable, "-m", "xception_pl", "fit", *task.args]


def run_local(study: Study) -> None:
    """Every task here, one after another; a failed one is reported and the next one still runs."""
    failed = []
    for i, task in enumerate(study.tasks):
        print(f"sweep {study.name}: task {i}/{len(study.tasks) - 1} {task.name} -> {task.run_dir}", flush=True)
        if subprocess.run(command(task)).returncode != 0:
            failed.append(task.name)
    if failed:
        raise SystemExit(f"error: sweep {study.name}: {len(failed)} of {len(study.tasks)} runs failed "
                         f"({', '.join(failed)}); rerun the same command to resume them")
    print(f"sweep {study.name}: {len(study.tasks)} runs in {study.tasks[0].run_dir.parent}; "
          f"`python -m xception_pl report {study.tasks[0].run_dir.parent}` tabulates and plots them", flush=True)


def submit(study: Study, argv: list[str], sbatch: str) -> None:
    """sbatch the study as one array, one task per run: the array size comes from the study file."""
    script = Path(SWEEP_SCRIPT)
    if not script.is_file():
        script = Path(__file__).resolve().parents[1] / SWEEP_SCRIPT
    cmd = ["sbatch", f"--array=0-{len(study.tasks) - 1}", f"--job-name={study.name}", *shlex.split(sbatch),
           str(script), *argv]
    print(shlex.join(cmd), flush=True)
    if shutil.which("sbatch") is None:
        raise SystemExit("error: sbatch is not on PATH: submit from a SLURM login node, or run the study here "
                         "with --local")
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise SystemExit(f"error: sbatch failed (exit {result.returncode}); the command is above")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xception_pl sweep", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("study", help="a study file, e.g. configs/experiments/figure10.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run every task here, one after another")
    mode.add_argument("--submit", action="store_true", help="submit one SLURM array, one task per run")
    mode.add_argument("--task", help="run this array task (slurm/sweep.sh passes $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--base", help="replace the study's base config (e.g. configs/smoke.yaml)")
    parser.add_argument("--runs", default="runs", help="parent of the study's run directories (default: runs)")
    parser.add_argument("--sbatch", default="",
                        help="options for sbatch with --submit, e.g. --sbatch='--time=48:00:00' (with =)")
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    study = load_study(args.study, args.base, args.runs, extra)
    if args.submit:
        own = [args.study, *(["--base", args.base] if args.base else []), "--runs", args.runs, *extra]
        return submit(study, own, args.sbatch)
    if args.task is not None:
        task = pick(study, args.task)
        if os.environ.get("SLURM_PROCID", "0") == "0":
            record(study)
        print(f"sweep {study.name}: task {args.task}/{len(study.tasks) - 1} {task.name} -> {task.run_dir}", flush=True)
        from xception_pl.cli import main as fit

        sys.argv = [sys.argv[0], "fit", *task.args]  # this process is the run: its command line is the run's
        return fit()
    if args.local:
        record(study)
        return run_local(study)
    for i, task in enumerate(study.tasks):
        print(f"{i}  {task.name}  {shlex.join(command(task)[1:])}")
