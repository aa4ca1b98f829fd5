"""Per-class accuracy and confusion matrix at validation: TensorBoard and the `validate` file, through the CLI."""

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import scalars
from tests.system.test_ddp import run_cli
from tests.data_helpers import shards
from xception_pl.__main__ import main
from xception_pl.data import DemoDataModule, WebDatasetDataModule
from xception_pl.model import Xception
from xception_pl.module import XceptionModule
from xception_pl.per_class import matrix_image

CONFIG = str(Path(__file__).parents[2] / "configs" / "finetune.yaml")
ARGS = ["--config", CONFIG, "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
        "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "2", "--data.init_args.num_workers",
        "0", "--data.init_args.image_size", "71", "--data.init_args.eval_resize", "80", "--model.pretrained", "null"]


def test_validation_logs_per_class_accuracy_and_a_confusion_matrix_and_validate_writes_them(tmp_path):
    shards(tmp_path, "train", classes=3, per_class=2, shard_size=4)
    shards(tmp_path, "val", classes=3, per_class=3, shard_size=2)  # 9 images, 3 per class
    data = ["--data.init_args.train", str(tmp_path / "train"), "--data.init_args.val", str(tmp_path / "val")]
    main(["fit", *ARGS, *data, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
          "--freeze_backbone.samples", "0", "--ema.decay", "0.5", "--trainer.log_every_n_steps", "1"])

    logged = scalars(tmp_path / "run")
    per_class = [logged[f"val_per_class/acc1/c{i}"][-1][1] for i in range(3)]
    # Three images per class: the mean of the per-class accuracies is the overall accuracy.
    assert sum(per_class) / 3 == pytest.approx(logged["val/acc1"][-1][1], abs=1e-6)
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert "val_per_class/confusion_matrix" in events.Tags()["images"]  # beside the image grids (images/)

    output = tmp_path / "per_class.json"
    main(["validate", *ARGS, *data, "--trainer.default_root_dir", str(tmp_path / "validate"),
          "--ckpt_path", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--trainer.callbacks+=xception_pl.per_class.PerClassMetrics",
          "--trainer.callbacks.output", str(output)])
    result = json.loads(output.read_text())
    # The confusion matrix of the checkpoint's Polyak network, computed here by hand over the same data.
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    module = XceptionModule(num_classes=3, network=partial(Xception, drop_rate=0.5, bn_eps=1e-5,
                                                          pool_padding="symmetric")).eval()
    module.load_state_dict(checkpoint["state_dict"])
    datamodule = WebDatasetDataModule(val=str(tmp_path / "val"), batch_size=2, num_workers=0, image_size=71,
                                      eval_resize=80)
    datamodule.setup("validate")
    expected = torch.zeros(3, 3, dtype=torch.long)
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            batch = datamodule.on_after_batch_transfer(batch, 0)
            for t, p in zip(batch["target"], module(batch["image"]).argmax(-1)):
                expected[t, p] += 1
    assert result["class_names"] == ["c0", "c1", "c2"]
    assert result["confusion_matrix"] == expected.tolist()
    assert result["accuracy"] == (expected.diag() / 3).tolist()


def test_matrix_image_darkens_with_the_row_share():
    image = matrix_image(torch.tensor([[3, 1], [0, 4]]))
    assert image.shape == (1, 400, 400) and image.dtype == torch.uint8
    assert [image[0, 0, 0], image[0, 0, 200], image[0, 200, 0], image[0, 200, 200]] == [64, 191, 255, 0]


def nearest_centroid_checkpoint(tmp_path: Path) -> tuple[Path, list[float]]:
    """A checkpoint whose classifier is the nearest class centroid of the demo's validation features (a
    random backbone's outputs are nearly constant, so its per-class accuracies would all be 0 or 1), and
    the per-class accuracies it gets, computed here."""
    datamodule = DemoDataModule(root=str(tmp_path / "demo"), num_classes=3, train_images_per_class=4,
                                val_images_per_class=7, source_size=80, image_size=71, eval_resize=75,
                                batch_size=4, num_workers=0)  # the data of tests.system.test_ddp.run_cli
    datamodule.setup("validate")
    module = XceptionModule(num_classes=3).eval()
    with torch.no_grad():
        batches = [datamodule.on_after_batch_transfer(b, 0) for b in datamodule.val_dataloader()]
        features = torch.cat([module.network.forward_head(module.network.forward_features(b["image"]), True)
                              for b in batches])
        target = torch.cat([b["target"] for b in batches])
        mean = features.mean(0)
        centred = torch.nn.functional.normalize(features - mean, dim=1)
        centroids = torch.stack([centred[target == c].mean(0) for c in range(3)])
        module.network.head.fc.weight.copy_(centroids)
        module.network.head.fc.bias.copy_(-centroids @ mean)  # logits: centroids . (feature - mean)
        predicted = torch.cat([module(b["image"]).argmax(1) for b in batches])
    accuracy = [(predicted[target == c] == c).float().mean().item() for c in range(3)]
    path = tmp_path / "centroid.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path, accuracy


def test_two_process_per_class_results_equal_one_process(tmp_path):
    """21 validation images over 2 gloo ranks (uneven shares): the synced per-class accuracies equal one process's."""
    checkpoint, expected = nearest_centroid_checkpoint(tmp_path)
    assert any(0 < a < 1 for a in expected)  # not a degenerate classifier: a rank's share would give other values
    results = []
    for name, devices in (("one", 1), ("two", 2)):
        run = run_cli(tmp_path, "validate", name, devices, "--ckpt_path", str(checkpoint))
        logged = scalars(run)
        results.append([logged[f"val_per_class/acc1/class_{c:03d}"][-1][1] for c in range(3)])
    assert results[0] == pytest.approx(expected, abs=1e-6)
    assert results[1] == results[0]
