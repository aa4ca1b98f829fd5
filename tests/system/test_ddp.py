"""Real DDP on CPU (gloo, 2 processes launched by Lightning): validation sees every sample exactly
once, so two processes give the single-process metrics."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.data_helpers import shards
from tests.helpers import scalars

ROOT = Path(__file__).resolve().parents[2]


def run_cli(tmp_path: Path, subcommand: str, name: str, devices: int, *args: str, data: dict | None = None,
            model: dict | None = None) -> Path:
    # its own config, not tests.helpers.run_config: the module's own optimizer and schedule, Lightning's defaults
    run = tmp_path / name
    data = data or {"class_path": "xception_pl.data.DemoDataModule",
                    "init_args": {"root": str(tmp_path / "demo"), "num_classes": 3, "train_images_per_class": 4,
                                  "val_images_per_class": 7,  # 21 samples: odd, so 2 ranks cannot split them evenly
                                  "source_size": 80, "image_size": 71, "eval_resize": 75, "batch_size": 4,
                                  "num_workers": 1}}
    config = {"trainer": {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                          "default_root_dir": str(run), "enable_progress_bar": False},
              "data": data, "model": model or {}, "ema": {"decay": None}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "xception_pl", subcommand, "--config", str(tmp_path / f"{name}.yaml"),
                             *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def validate(tmp_path: Path, name: str, devices: int, data: dict | None = None) -> dict[str, float]:
    run = run_cli(tmp_path, "validate", name, devices, data=data)
    return {tag: values[-1][1] for tag, values in scalars(run).items() if tag.startswith("val/")}


@pytest.mark.slow  # the uneven case below (one shard, two ranks) runs the same path in the default suite
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


def test_validation_over_fewer_shards_than_ranks_equals_one_process(tmp_path):
    validate(tmp_path, "demo", devices=1)  # builds the demo shards
    one_shard = sorted((tmp_path / "demo").glob("*/val/*.tar"))[0]  # rank 1 gets no shard
    data = {"class_path": "xception_pl.data.WebDatasetDataModule",
            "init_args": {"val": str(one_shard), "num_classes": 3, "multilabel": False, "image_size": 71,
                          "eval_resize": 75, "batch_size": 4, "num_workers": 2}}
    one = validate(tmp_path, "one", devices=1, data=data)
    two = validate(tmp_path, "two", devices=2, data=data)
    assert two["val/acc1"] == one["val/acc1"]
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-5)


def fit_with_probe(tmp_path: Path, name: str) -> tuple[list[dict], dict]:
    probe = ["--trainer.callbacks+=tests.probes.RankProbe", f"--trainer.callbacks.output={tmp_path / name}.json",
             "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"]
    data = {"class_path": "xception_pl.data.synthetic.SyntheticDataModule",
            "init_args": {"num_classes": 4, "train_size": 16, "batch_size": 2, "image_size": 71}}
    # What is checked is the ranks' generators, not the network: TinyNetwork (with dropout) keeps the runs short.
    run = run_cli(tmp_path, "fit", name, 2, *probe, data=data, model={"network": {
        "class_path": "tests.crash.TinyNetwork", "init_args": {"dropout": 0.5}}})
    ranks = [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, scalars(run)


def test_each_rank_draws_its_own_dropout_masks_and_skip_counts_sum_over_ranks(tmp_path):
    ranks, curves = fit_with_probe(tmp_path, "first")
    assert ranks[0]["masks"] != ranks[1]["masks"]
    again, _ = fit_with_probe(tmp_path, "again")  # the same seed and world size: the same draws
    assert [r["masks"] for r in again] == [r["masks"] for r in ranks]
    # rank 0 reports 1 skipped sample per batch, rank 1 two: logged once, summed over the ranks
    assert curves["data/skipped"][-1][1] == 2 * (1 + 2)  # 2 steps


def uneven_eval(tmp_path: Path, devices: int, val_shards: int, test_shards: int, *, ckpt: Path | None = None,
                unreadable: bool = False) -> dict[str, dict[str, float]]:
    """tests/uneven_eval.py on real shards: 12 training images, and the first val_shards / test_shards shards of
    the same 12 images for evaluation (3 per shard); `unreadable`: the last test shard is cut inside its
    first image, so the rank that gets it reads nothing."""
    if not (tmp_path / "train").exists():
        shards(tmp_path, "train", classes=3, per_class=4, shard_size=3)
    for name, count in (("val", val_shards), ("test", test_shards)):
        if not (tmp_path / name).exists():
            shards(tmp_path, name, classes=3, per_class=4, shard_size=3)
            keep_first_shards(tmp_path / name, count)
    if unreadable:
        last = sorted((tmp_path / "test").glob("*.tar"))[-1]
        last.write_bytes(last.read_bytes()[:2000])
    name = f"{devices}-{'eval' if ckpt else 'fit'}"
    command = [sys.executable, "-m", "tests.uneven_eval", *(f"--{s}={tmp_path / s}" for s in ("train", "val", "test")),
               f"--devices={devices}", f"--root={tmp_path / name}", f"--out={tmp_path / name}.json"]
    # A hang (a collective one rank never makes) fails here, not at the suite's timeout.
    result = subprocess.run([*command, *([f"--ckpt={ckpt}"] if ckpt else [])], cwd=ROOT, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / f"{name}.json").read_text())


def keep_first_shards(directory: Path, count: int) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    for entry in manifest["shards"][count:]:
        (directory / entry["name"]).unlink()
    manifest["shards"] = manifest["shards"][:count]
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("devices, val_shards, test_shards, unreadable", [
    (2, 1, 2, True),  # rank 1: no validation shard; its only test shard unreadable
    (3, 2, 2, False),  # rank 2: no shard at all
], ids=["1-shard-on-2-ranks", "2-shards-on-3-ranks"])
def test_fit_validate_and_test_with_fewer_shards_than_ranks_finish_and_equal_one_process(
        tmp_path, devices, val_shards, test_shards, unreadable):
    ranks = uneven_eval(tmp_path, devices, val_shards, test_shards, unreadable=unreadable)
    one = uneven_eval(tmp_path, 1, val_shards, test_shards, ckpt=tmp_path / f"{devices}-fit" / "checkpoints" / "last.ckpt")
    # fit's last validation, validate and test of its checkpoint: on every rank the weights rank 0 saved
    for got in (ranks["fit"], ranks["validate"]):
        assert got["val/acc1"] == one["validate"]["val/acc1"]
        assert got["val/loss"] == pytest.approx(one["validate"]["val/loss"], rel=1e-5)
    assert ranks["test"]["test/acc1"] == one["test"]["test/acc1"]
    assert ranks["test"]["test/loss"] == pytest.approx(one["test"]["test/loss"], rel=1e-5)
    if unreadable:  # counted on the rank that read nothing, as on one process
        assert ranks["test"]["data/test_skipped"] == one["test"]["data/test_skipped"] >= 1
