"""The report (xception_pl/report.py) of a real local sweep: a table row and a curve per run, read back from
TensorBoard event files and checkpoints."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import scalars
from tests.system.test_sweep import BATCH, DEMO, ROOT, STEPS, run_local_sweep
from xception_pl.report import Run, read_run, report, table

PAPER_PARAMETERS = 22_855_952  # Table 3, 1000 classes


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_local_sweep(tmp_path_factory.mktemp("sweep"))


def rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.timeout(900)
def test_report_has_a_row_and_a_curve_per_run(study, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "xception_pl", "report", str(study), "--output", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    header, *body = rows((out / "report.md").read_text())
    assert header == ["variant", "parameters", "best val/acc1", "final val/acc1", "final val/acc5", "train images/s",
                      "steps", "wall time"]
    assert [row[0] for row in body] == ["none", "relu"]  # the study's order
    # Table 3's count with a 6-class classifier instead of 1000 (the intermediate activation adds none)
    parameters = PAPER_PARAMETERS - (2048 * 1000 + 1000) + (2048 * DEMO["num_classes"] + DEMO["num_classes"])
    for row in body:
        logged = scalars(study / row[0])
        accuracy = [v for _, v in logged["val/acc1"]]
        assert len(accuracy) == 2  # validated twice; no step-0 copy for the HPARAMS tab
        assert row[1] == f"{parameters:,}"
        assert (row[2], row[3]) == (f"{max(accuracy):.4f}", f"{accuracy[-1]:.4f}")
        assert row[4] == f"{logged['val/acc5'][-1][1]:.4f}"
        assert float(row[5].replace(",", "")) > 0  # images/s: logged on every logging step
        assert row[6] == str(STEPS)
        hours, minutes, seconds = map(int, row[7].split(":"))
        assert 0 < hours * 3600 + minutes * 60 + seconds < 3600
    for png in ("val_acc1.png", "train_loss.png"):
        assert "![" in (out / "report.md").read_text() and f"({png})" in (out / "report.md").read_text()
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size == (768, 504)


def test_curves_are_against_samples_seen(study):
    run = read_run(study / "relu", study)
    assert run.global_batch == BATCH
    curve = run.scalars["val/acc1"]
    assert curve == scalars(study / "relu")["val/acc1"]
    assert run.samples(curve) == [2 * BATCH, 4 * BATCH]  # validated after 2 and 4 steps
    assert run.samples(run.scalars["train/loss"]) == [BATCH, 2 * BATCH, 3 * BATCH, 4 * BATCH]


def test_a_resumed_run_replaces_the_points_after_its_checkpoint(tmp_path):
    """Two event files, as a run killed after step 5 and resumed from its checkpoint at step 3 leaves them."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "study" / "a"
    first = SummaryWriter(str(run), filename_suffix=".0")
    for step in range(6):
        first.add_scalar("train/loss", 10.0 + step, step)
    first.close()
    second = SummaryWriter(str(run), filename_suffix=".1")
    for step in range(3, 8):
        second.add_scalar("train/loss", 20.0 + step, step)
    second.close()
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    curve = read_run(run, run.parent).scalars["train/loss"]
    assert curve == [(0, 10.0), (1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0), (5, 25.0), (6, 26.0), (7, 27.0)]


def test_a_run_still_going_is_reported_as_far_as_it_got(study, tmp_path):
    """A run before its first checkpoint: its curves and steps so far, no parameter count yet."""
    partial = tmp_path / "study"
    shutil.copytree(study, partial)
    shutil.rmtree(partial / "relu" / "checkpoints")
    out = report(str(partial), str(tmp_path / "out"))
    _, none, relu = rows((out / "report.md").read_text())
    assert none[1] != "-" and relu[1] == "-"
    assert relu[3] == f"{scalars(study / 'relu')['val/acc1'][-1][1]:.4f}" and relu[6] == str(STEPS)


def test_no_runs_fails_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match=f"error: no TensorBoard event files under {tmp_path}: run the study first"):
        report(str(tmp_path))
    with pytest.raises(SystemExit, match="is not a directory: give a study's run folder"):
        report(str(tmp_path / "missing"))


def test_images_per_second_is_the_median_of_the_logged_throughput():
    run = Run("a", {"train/samples_per_sec": [(10, 90.0), (20, 100.0), (30, 400.0)], "val/acc1": [(30, 0.5)]},
              parameters=1234, steps=30, wall_time_s=3723.0, global_batch=8)
    _, _, row = table([run]).splitlines()
    assert row == "| a | 1,234 | 0.5000 | 0.5000 | - | 100.0 | 30 | 1:02:03 |"
    # one device: the throughput monitor logs only the per-device key
    run.scalars["train/device/samples_per_sec"] = run.scalars.pop("train/samples_per_sec")
    assert table([run]).splitlines()[-1] == row
