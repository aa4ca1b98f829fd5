"""System test of benchmarks/throughput.py: the whole script on CPU with tiny settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_script_reports_every_section_and_checks_outputs_match_timm(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", "cpu", "--quick",
               "--sections", "a,b,c,d,e", "--image-size", "71", "--batch-sizes", "2", "--steps", "1", "--warmup", "0",
               "--layouts", "channels_last", "--workers", "0", "--images", "8", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["check"]["passed"], report["check"]
    rows = {(r["section"], r["setting"]): r for r in report["rows"]}
    assert sorted(rows) == [
        ("a", "train step fp32 channels_last eager"),
        ("b", "fit synthetic fp32 channels_last eager EMA"),
        ("b", "fit synthetic fp32 channels_last eager no EMA"),
        ("c", "fit JPEG shards, decode cpu, 0 workers, fp32 eager"),
        ("d", "inference fp32 channels_last eager"),
        ("e", "Table 3 train step fp32 channels_last eager, 75 px"),
    ]
    for row in report["rows"]:
        assert row["batch"] == 2
        assert row["img_s"] > 0 and row["baseline_img_s"] > 0 and row["peak_mib"] > 0, row
        assert row["ratio"] == row["img_s"] / row["baseline_img_s"]
    assert report["params"] == {"xception": 22_855_952, "inception_v3": 23_834_568}
    assert result.stdout.rstrip().splitlines()[-1].startswith("Training steps/s at batch 2: Xception")  # table last
