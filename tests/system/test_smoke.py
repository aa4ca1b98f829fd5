"""System test: the README's main command, the CPU demo, trains end to end and learns."""

import subprocess
import sys
from pathlib import Path

from tests.helpers import scalars

ROOT = Path(__file__).resolve().parents[2]
CHANCE = 0.1  # 10 demo classes


def test_cpu_demo_learns_well_above_chance(tmp_path):
    run = tmp_path / "smoke"
    result = subprocess.run(
        [sys.executable, "-m", "xception_pl", "fit", "--config", "configs/smoke.yaml",
         "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
         "--data.init_args.root", str(tmp_path / "demo")],  # the real demo data, made in the test's own dir
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = scalars(run)
    accuracy = logged["val/acc1"][-1][1]
    print(f"demo val/acc1 after {logged['train/loss'][-1][0] + 1} steps: {accuracy:.3f}")
    assert accuracy >= 5 * CHANCE  # it reaches ~0.99
    assert logged["data/skipped"][-1][1] == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
