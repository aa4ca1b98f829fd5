"""Augmentations are named parts after the crop and flip, the same list on the CPU path and the device path
(data/augmentations.py), over real shards from our writer."""

import pytest
import torch

from tests.data_helpers import shards
from xception_pl.cli import XceptionCLI
from xception_pl.data import WebDatasetDataModule
from xception_pl.data.augmentations import RandAugment, RandomErasing, TrivialAugmentWide


def first_batch(tmp_path, **kwargs) -> torch.Tensor:
    data = tmp_path / "train"
    if not data.exists():
        shards(tmp_path, "train", classes=2, per_class=4, shard_size=4)
    dm = WebDatasetDataModule(train=str(data), batch_size=8, num_workers=0, image_size=24, seed=3, **kwargs)
    dm.setup("fit")
    torch.manual_seed(0)  # the device path draws from torch's RNG in the main process
    return next(iter(dm.train_dataloader()))["image"]


@pytest.mark.parametrize("decode_device", ["cpu", pytest.param("cuda", id="device-path")])  # its code, on the CPU
def test_random_erasing_adds_to_the_crop_on_both_paths(tmp_path, decode_device):
    erased = first_batch(tmp_path, decode_device=decode_device, augmentations=[RandomErasing(p=1.0, value=7)])
    assert erased.shape == (8, 3, 24, 24) and erased.dtype == torch.uint8  # still cropped to image_size
    for image in erased:  # one filled rectangle of the value per image (p=1), of at most a third of it
        filled = (image == 7).all(0)
        rows, cols = filled.any(1).nonzero(), filled.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert filled.sum() == box and 0 < box <= 0.33 * 24 * 24 + 24


def test_the_batched_erasing_draws_torchvisions_boxes():
    """Area within `scale`, aspect ratio within `ratio`, inside the image, p of the images: over many draws."""
    torch.manual_seed(0)
    part = RandomErasing(p=0.5, scale=(0.1, 0.3), ratio=(0.5, 2.0))
    boxes = part.boxes(4000, 40, 60).double()
    erased = boxes[:, 2] > boxes[:, 0]
    assert 0.45 < erased.double().mean() < 0.55
    w, h = (boxes[erased, 2] - boxes[erased, 0]), (boxes[erased, 3] - boxes[erased, 1])
    assert ((w * h / 2400 > 0.08) & (w * h / 2400 < 0.32)).all()  # rounding moves the area a little
    assert ((h / w > 0.4) & (h / w < 2.5)).all()
    assert (boxes[erased, 2] <= 60).all() and (boxes[erased, 3] <= 40).all() and (boxes >= 0).all()


def test_per_image_parts_run_on_cpu_workers_and_are_refused_on_the_device_path_by_name(tmp_path):
    plain = first_batch(tmp_path)
    for part in (TrivialAugmentWide(), RandAugment(num_ops=2, magnitude=15)):
        augmented = first_batch(tmp_path, augmentations=[part])
        assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    with pytest.raises(ValueError, match="data.augmentations: TrivialAugmentWide has no batched form for "
                                         "decode_device: cuda; use decode_device: cpu"):
        first_batch(tmp_path, decode_device="cuda", augmentations=[TrivialAugmentWide(), RandomErasing()])


def test_a_config_lists_augmentations_by_name(tmp_path):
    shards(tmp_path, "train", classes=2, per_class=2, shard_size=2)
    cli = XceptionCLI(run=False, args=[
        "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.class_path", "xception_pl.data.WebDatasetDataModule", "--data.init_args.train", str(tmp_path / "train"),
        "--data.init_args.augmentations+=xception_pl.data.augmentations.TrivialAugmentWide",
        "--data.init_args.augmentations+=xception_pl.data.augmentations.RandomErasing",
        "--data.init_args.augmentations.p", "0.5"])
    parts = cli.datamodule.train_transform.transforms[2:]  # after the crop and flip
    assert [type(p).__name__ for p in parts] == ["TrivialAugmentWide", "RandomErasing"] and parts[1].p == 0.5


def test_mixing_runs_on_training_batches_after_transfer_and_the_loss_reads_the_soft_targets(tmp_path):
    from tests.crash import TinyNetwork
    from tests.helpers import tiny_module, tiny_trainer
    from xception_pl.data.mixing import CutMix, Mixup
    from xception_pl.module import XceptionModule

    class Recording(XceptionModule):
        def shared_step(self, batch, stage):
            self.seen.append((stage, batch.get("soft_target"), batch["target"].clone()))
            return super().shared_step(batch, stage)

    shards(tmp_path, "train", classes=3, per_class=4, shard_size=4)
    dm = WebDatasetDataModule(train=str(tmp_path / "train"), val=str(tmp_path / "train"), batch_size=4, num_workers=0,
                              image_size=71, mixing=[Mixup(alpha=1.0), CutMix(alpha=1.0)])
    module = tiny_module(dm, cls=Recording, network=TinyNetwork)  # what reaches the loss is the data's
    module.seen = []
    torch.manual_seed(0)
    tiny_trainer(tmp_path / "run", ema=None, max_steps=3, limit_val_batches=1).fit(module, dm)
    train = [(soft, hard) for stage, soft, hard in module.seen if stage == "train"]
    assert len(train) == 3 and all(soft is not None for soft, _ in train)
    for soft, hard in train:  # mixed: soft weights that sum to 1, the hard labels kept for the metrics
        torch.testing.assert_close(soft.sum(1), torch.ones(4))
        assert hard.dtype == torch.long
    assert any((soft.max(1).values < 1).any() for soft, _ in train)  # (a pair of one class stays one-hot)
    assert [soft for stage, soft, _ in module.seen if stage == "val"] == [None]  # evaluation is never mixed


@pytest.mark.parametrize("decode_device", ["cpu", pytest.param("cuda", id="device-path")])  # its code, on the CPU
def test_evaluation_crops_at_its_own_size(tmp_path, decode_device):
    shards(tmp_path, "val", classes=2, per_class=2, shard_size=4)
    dm = WebDatasetDataModule(val=str(tmp_path / "val"), batch_size=4, num_workers=0, image_size=24,
                              eval_image_size=32, eval_resize=36, decode_device=decode_device)
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["image"].shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="eval_resize=30 is smaller than the evaluation crop .32 px.: set eval_resize "
                                         ">= eval_image_size, e.g. 36"):
        WebDatasetDataModule(val=str(tmp_path / "val"), image_size=24, eval_image_size=32, eval_resize=30)
