"""`python -m xception_pl report runs/<study> --output report/`: a study's runs as a table and the paper's curves.

Reads every run directory under the study (any folder holding TensorBoard event files) with TensorBoard's
EventAccumulator, and its newest checkpoint for the parameter count; writes report.md (one row per run)
and PNG plots of the validation metric and the training loss against samples seen (optimizer steps x
global batch), one line per run, as Figures 6-10 of the paper plot their training profiles. A run still going
is reported as far as its event files go.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from xception_pl.checkpointing import atomic_path, write_atomically

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics: not parameters
Curve = list[tuple[int, float]]  # (global step, value)
DEVICE_SPEED = "train/device/samples_per_sec"


@dataclass
class Run:
    name: str
    scalars: dict[str, Curve]
    parameters: int | None
    steps: int
    wall_time_s: float
    global_batch: int | None = field(default=None)

    def samples(self, curve: Curve) -> list[int]:
        """Samples seen when each point was logged: the point at step s follows s + 1 optimizer steps."""
        return [(step + 1) * (self.global_batch or 1) for step, _ in curve]


def run_dirs(study: Path) -> list[Path]:
    """Folders under `study` with event files, in the order of the sweep's study.yaml (else by name)."""
    found = sorted({p.parent for p in study.rglob("events.out.tfevents.*")})
    recorded = study / "study.yaml"
    if recorded.is_file():
        order = [r["name"] for r in (yaml.safe_load(recorded.read_text()) or {}).get("runs", [])]
        found.sort(key=lambda p: order.index(p.name) if p.name in order else len(order))
    return found


def read_events(run: Path) -> tuple[dict[str, Curve], float]:
    """Every scalar curve of the run, and its wall time: the first to the last event of each event file,
    summed, so that a requeued run's time in the queue is not counted.

    Files are read in the order they were started (a resumed run opens a new one): a later file's points
    replace the earlier ones from its first step on. Within a file, a point at a step lower than one
    already logged is Lightning's copy of the final metrics for the HPARAMS tab, at step 0, which runs of
    earlier versions have: dropped.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = [EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()  # 0: keep every point
             for path in run.glob("events.out.tfevents.*")]
    curves: dict[str, Curve] = {}
    wall_time = 0.0
    for events in sorted(files, key=started):
        times = []
        for tag in events.Tags()["scalars"]:
            points: Curve = []
            for event in events.Scalars(tag):
                times.append(event.wall_time)
                if not points or event.step >= points[-1][0]:
                    points.append((event.step, event.value))
            if points:
                kept = [p for p in curves.get(tag, []) if p[0] < points[0][0]]
                curves[tag] = kept + points
        wall_time += max(times) - min(times) if times else 0.0
    return curves, wall_time


def started(events: object) -> float:
    """When an event file was opened; a file with no event yet (its writer just started) sorts last."""
    try:
        return events.FirstEventTimestamp()
    except ValueError:
        return float("inf")


def checkpoint_facts(run: Path) -> tuple[int | None, int | None]:
    """(parameters, global step) from the run's newest checkpoint; (None, None) before its first one."""
    candidates = [*run.glob("hpc_ckpt_*.ckpt"), *(run / "checkpoints").glob("*.ckpt")]
    if not candidates:
        return None, None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    checkpoint = torch.load(newest, map_location="cpu", weights_only=True, mmap=True)
    parameters = sum(t.numel() for name, t in checkpoint["state_dict"].items() if not name.endswith(BUFFERS))
    return parameters, checkpoint.get("global_step")


def read_run(run: Path, study: Path) -> Run:
    scalars, wall_time = read_events(run)
    parameters, checkpoint_step = checkpoint_facts(run)
    # A point logged at step s comes from the (s+1)-th optimizer step (train/loss 0 ... n-1 for n steps).
    # Only the module's own keys count: the throughput monitor's validate/* count validation batches.
    logged_steps = max((step + 1 for tag, curve in scalars.items() if tag.startswith(("train/loss", "val/"))
                        for step, _ in curve), default=0)
    batch = scalars.get("train/global_batch_size")
    return Run(name=str(run.relative_to(study)), scalars=scalars, parameters=parameters,
               steps=max(logged_steps, checkpoint_step or 0), wall_time_s=wall_time,
               global_batch=int(batch[-1][1]) if batch else None)


def main_metric(runs: list[Run]) -> str:
    """val/map100 (multi-label, Table 2) where logged, else val/acc1 (Table 1)."""
    tags = {tag for run in runs for tag in run.scalars}
    return next((t for t in sorted(tags) if t.startswith("val/map")), "val/acc1")


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def hms(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def table(runs: list[Run]) -> str:
    metric = main_metric(runs)
    second = "val/acc1" if metric.startswith("val/map") else "val/acc5"
    header = ["variant", "parameters", f"best {metric}", f"final {metric}", f"final {second}",
              "train images/s", "steps", "wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        main = [v for _, v in run.scalars.get(metric, [])]
        other = run.scalars.get(second, [])
        # all devices; on one device the throughput monitor logs only the per-device key
        speed = [v for _, v in run.scalars.get("train/samples_per_sec") or run.scalars.get(DEVICE_SPEED, [])]
        cells = [run.name, "-" if run.parameters is None else f"{run.parameters:,}",
                 fmt(max(main) if main else None), fmt(main[-1] if main else None),
                 fmt(other[-1][1] if other else None), fmt(statistics.median(speed) if speed else None, 1),
                 f"{run.steps:,}", hms(run.wall_time_s)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], tag: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for run in runs:
        curve = run.scalars.get(tag, [])
        if curve:
            axes.plot(run.samples(curve), [v for _, v in curve], label=run.name, linewidth=1.4,
                      marker="o" if len(curve) < 20 else None, markersize=3)
    batches = {run.global_batch for run in runs}
    axes.set_xlabel("samples seen" if None not in batches else "optimizer steps")
    axes.set_ylabel(tag)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def report(runs: str, output: str | None = None) -> Path:
    """Tabulate and plot every run under `runs` (e.g. runs/figure10) into `output` (default: <runs>/report).

    Args:
        runs: a study's directory of run directories, as `python -m xception_pl sweep` writes them.
        output: folder for report.md and the PNG plots.
    """
    study = Path(runs)
    if not study.is_dir():
        raise SystemExit(f"error: {study} is not a directory: give a study's run folder, e.g. runs/figure10")
    try:
        import matplotlib  # noqa: F401  (checked before reading anything)
    except ImportError:
        raise SystemExit("error: the report's plots need matplotlib: pip install 'xception_pl[report]'") from None
    dirs = run_dirs(study)
    if not dirs:
        raise SystemExit(f"error: no TensorBoard event files under {study}: run the study first "
                         f"(python -m xception_pl sweep configs/experiments/<study>.yaml ...)")
    found = [read_run(d, study) for d in dirs]
    out = Path(output) if output else study / "report"
    out.mkdir(parents=True, exist_ok=True)
    metric = main_metric(found)
    plots = {metric: f"{metric.replace('/', '_')}.png", "train/loss": "train_loss.png"}
    for tag, name in plots.items():
        plot(found, tag, out / name, f"{study.name}: {tag}")
    text = (f"# {study.name}\n\n{len(found)} runs under `{study}`; curves against samples seen "
            f"(optimizer steps x global batch).\n\n{table(found)}\n"
            + "".join(f"![{tag}]({name})\n" for tag, name in plots.items()))
    write_atomically(out / "report.md", text)
    print(f"wrote {out / 'report.md'} and {', '.join(plots.values())}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    auto_cli(report, args=argv)
