"""Real DDP on CPU (gloo, 2 processes launched by Lightning): validation sees every sample exactly
once, so two processes give the single-process metrics."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import scalars

ROOT = Path(__file__).resolve().parents[1]


def run_cli(tmp_path: Path, subcommand: str, name: str, devices: int, *args: str) -> Path:
    run = tmp_path / name
    data = {"class_path": "xception_pl.data.DemoDataModule",
            "init_args": {"root": str(tmp_path / "demo"), "num_classes": 3, "train_images_per_class": 4,
                          "val_images_per_class": 7,  # 21 samples: odd, so 2 ranks cannot split them evenly
                          "source_size": 80, "image_size": 71, "eval_resize": 75, "batch_size": 4,
                          "num_workers": 1}}
    config = {"trainer": {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                          "default_root_dir": str(run), "enable_progress_bar": False},
              "data": data, "model": {"ema_decay": None}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "xception_pl", subcommand, "--config", str(tmp_path / f"{name}.yaml"),
                             *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def validate(tmp_path: Path, name: str, devices: int) -> dict[str, float]:
    run = run_cli(tmp_path, "validate", name, devices)
    return {tag: values[-1][1] for tag, values in scalars(run).items() if tag.startswith("val/")}


def test_two_process_validation_equals_one_process(tmp_path):
    one = validate(tmp_path, "one", devices=1)
    two = validate(tmp_path, "two", devices=2)
    assert set(one) == {"val/loss", "val/acc1"}  # 3 classes: no top-5
    assert two["val/acc1"] == one["val/acc1"]  # counts over the same 21 images
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-5)  # float sums in another order


def test_two_process_predict_writes_every_image_once(tmp_path):
    output = tmp_path / "predictions.jsonl"
    writer = ["--trainer.callbacks+=xception_pl.callbacks.PredictionWriter",
              f"--trainer.callbacks.output={output}"]
    run_cli(tmp_path, "predict", "predict", 2, *writer)
    lines = [json.loads(line) for rank in (0, 1)
             for line in (tmp_path / f"predictions-rank{rank}.jsonl").read_text().splitlines()]
    keys = [line["key"] for line in lines]
    assert len(keys) == len(set(keys)) == 21
    assert all(len(line["classes"]) == len(line["probs"]) == 3 for line in lines)
