"""decode_device="cuda": packed JPEG batches from real workers, the batched crop against torchvision's
per-image transforms, corrupt batches. The device part runs on the CPU by the same code; CUDA tests
are marked."""

import json
import tarfile

import pytest
import torch
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from tests.data_helpers import add_shard, bomb_jpeg, jpeg, shards
from xception_pl.data import SKIP_REASONS, WebDatasetDataModule
from xception_pl.data.batch_crop import CANVAS_SLACK, RandomResizedCropFlip, ResizeCenterCrop, crop_batch, size_groups
from xception_pl.data.samples import unpack

CORRUPT = SKIP_REASONS.index("corrupt_image")


def datamodule(tmp_path, **kw):
    data = tmp_path / "train"
    if not data.exists():
        shards(tmp_path, "train", classes=3, per_class=4, shard_size=2)  # 12 samples, 6 shards
    args = dict(train=str(data), val=str(data), batch_size=4, num_workers=0, image_size=24, eval_resize=28,
                decode_device="cuda")
    return WebDatasetDataModule(**(args | kw))


def original_jpegs(directory):
    originals = {}
    for shard in json.loads((directory / "manifest.json").read_text())["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            originals |= {n[:-4]: tar.extractfile(n).read() for n in tar.getnames() if n.endswith(".jpg")}
    return originals


def smooth_image(height: int, width: int, seed: int) -> torch.Tensor:
    """uint8 [3, H, W] colour fields, like photographs at this scale (noise would make any two resampling
    filters disagree)."""
    low = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 255
    image = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)
    return image.clamp(0, 255).round().to(torch.uint8)[0]


IMAGES = [(60, 45), (45, 60), (80, 80), (33, 50), (200, 150)]  # portrait, landscape, square; up- and downscaled


def test_workers_ship_one_packed_tensor_per_batch_that_round_trips_through_two_workers(tmp_path):
    dm = datamodule(tmp_path, num_workers=2, multiprocessing_context="fork")
    dm.setup("validate")
    loader = dm.val_dataloader()
    originals = original_jpegs(tmp_path / "train")
    raw = list(loader.pipeline[0])  # the DataLoader: what crossed from the workers
    assert sorted(len(b["key"]) for b in raw) == [2, 2, 4, 4]  # per worker: 3 shards of 2 in batches of 4
    for batch in raw:
        assert "image" not in batch and batch["jpeg"].dtype == torch.uint8 and batch["jpeg"].ndim == 1
        assert batch["jpeg_offsets"].tolist()[0] == 0 and len(batch["jpeg_offsets"]) == len(batch["key"]) + 1
        jpegs = unpack(batch["jpeg"], batch["jpeg_offsets"])
        assert [bytes(x.numpy()) for x in jpegs] == [originals[k] for k in batch["key"]]
    decoded = list(loader)  # the same, decoded and cropped by the device stage (here on the CPU)
    assert sorted(k for b in decoded for k in b["key"]) == sorted(originals)
    assert all(b["image"].dtype == torch.uint8 and b["image"].shape == (len(b["key"]), 3, 24, 24) for b in decoded)
    out = dm.on_after_batch_transfer(decoded[0], 0)
    assert out["image"].dtype == torch.float32 and -1 <= out["image"].min() and out["image"].max() <= 1


def test_batched_eval_crop_matches_torchvision_resize_and_centre_crop():
    images = [smooth_image(h, w, seed) for seed, (h, w) in enumerate(IMAGES)]
    for size, resize in [(24, 28), (64, 72), (299, 333)]:
        out = ResizeCenterCrop(size, resize)(images)
        reference = torch.stack([v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])(image)
                                 for image in images])
        assert out.shape == reference.shape == (len(images), 3, size, size) and out.dtype == torch.uint8
        difference = (out.int() - reference.int()).abs()
        # roi_align's box average vs torchvision's antialias filter: within 1 level on average, 4 at most
        assert difference.float().mean() < 1.0 and difference.max() <= 4, (size, resize)


def test_batched_train_crop_matches_a_per_image_resized_crop_of_the_same_box():
    images = [smooth_image(h, w, seed) for seed, (h, w) in enumerate(IMAGES)]
    torch.manual_seed(0)
    boxes = RandomResizedCropFlip(32).boxes(torch.tensor(IMAGES))
    out = crop_batch(images, boxes, torch.zeros(len(images), dtype=torch.bool), 32)
    reference = torch.stack([F.resized_crop(image, int(y0), int(x0), int(y1 - y0), int(x1 - x0), [32, 32],
                                            antialias=True) for image, (x0, y0, x1, y1) in zip(images, boxes)])
    difference = (out.int() - reference.int()).abs()
    assert difference.float().mean() < 1.0 and difference.max() <= 6  # same tolerance story as eval

    flip = torch.tensor([True, False, True, False, True])
    flipped = crop_batch(images, boxes, flip, 32)
    assert torch.equal(flipped[flip], out[flip].flip(-1)) and torch.equal(flipped[~flip], out[~flip])
    assert not torch.equal(flipped[flip], out[flip])  # the images are not mirror-symmetric


def test_random_resized_crop_boxes_follow_torchvision():
    sizes = torch.tensor([[375, 500], [500, 375], [40, 400]] * 2000)  # the last one often needs the fallback
    torch.manual_seed(1)
    boxes = RandomResizedCropFlip(32).boxes(sizes)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= sizes[:, 1]).all() and (boxes[:, 3] <= sizes[:, 0]).all()
    assert (w >= 1).all() and (h >= 1).all() and torch.equal(boxes, boxes.round())  # whole pixels, as torchvision
    for i, (height, width) in enumerate(sizes[:3].tolist()):
        ours = (w[i::3] * h[i::3] / (height * width)).mean()
        params = [RandomResizedCrop.get_params(torch.empty(1).expand(3, height, width), (0.08, 1.0), (3 / 4, 4 / 3))
                  for _ in range(2000)]
        theirs = torch.tensor([ph * pw / (height * width) for _, _, ph, pw in params]).mean()
        assert abs(ours - theirs) < 0.03, (height, width, ours, theirs)  # 2000 draws: a few sigma


def test_size_groups_keep_one_huge_image_from_padding_the_batch():
    sizes = [(375, 500), (500, 375), (8000, 6000), (375, 500), (500, 375), (300, 300)]
    groups = size_groups(sizes)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))

    def canvas(group):
        return len(group) * max(sizes[i][0] for i in group) * max(sizes[i][1] for i in group)

    assert all(canvas(g) <= CANVAS_SLACK * sum(sizes[i][0] * sizes[i][1] for i in g) for g in groups)
    assert sum(canvas(g) for g in groups) < canvas(range(len(sizes))) / 2  # one canvas for all: 6 x 8000 x 6000
    assert len(groups) <= 3


def test_an_all_corrupt_batch_is_skipped_and_counted(tmp_path):
    dm = datamodule(tmp_path, batch_size=2)  # creates the shards
    bad = [{"__key__": f"bad{i}", "jpg": bomb_jpeg(40, 32), "cls": b"0"} for i in range(2)]  # a header, no image
    add_shard(tmp_path / "train", "bad-0.tar", bad, position=0)
    add_shard(tmp_path / "train", "half-bad.tar", [bad[0] | {"__key__": "bad2"},
                                                   {"__key__": "good", "jpg": jpeg(), "cls": b"1"}], position=1)
    dm = datamodule(tmp_path, batch_size=2)
    batches = list(dm.val_dataloader())
    assert batches[0]["key"] == ["good"] and batches[0]["skipped"][CORRUPT] == 3  # 2 from the dropped batch
    assert len(batches[0]["target"]) == 1 and batches[0]["image"].shape == (1, 3, 24, 24)
    assert sum(len(b["key"]) for b in batches) == 13 and sum(int(b["skipped"].sum()) for b in batches) == 3


def test_a_png_sample_travels_re_encoded_as_jpeg_and_decodes(tmp_path):
    datamodule(tmp_path)
    png = {"__key__": "drawing", "png": jpeg(fmt="PNG"), "cls": b"2"}
    add_shard(tmp_path / "train", "png-0.tar", [png], position=0)
    dm = datamodule(tmp_path, batch_size=1)
    raw = next(iter(dm.val_dataloader().pipeline[0]))
    assert raw["key"] == ["drawing"] and bytes(raw["jpeg"][:2].numpy()) == b"\xff\xd8"  # a JPEG now
    batch = next(iter(dm.val_dataloader()))
    assert batch["key"] == ["drawing"] and batch["image"].shape == (1, 3, 24, 24) and batch["skipped"].sum() == 0


@pytest.mark.cuda
def test_gpu_decode_matches_the_cpu_batch_format(tmp_path):
    gpu = datamodule(tmp_path, batch_size=6)
    cpu = datamodule(tmp_path, batch_size=6, decode_device="cpu")
    device = torch.device("cuda")
    out = gpu.on_after_batch_transfer(gpu.transfer_batch_to_device(next(iter(gpu.val_dataloader())), device, 0), 0)
    ref = cpu.on_after_batch_transfer(next(iter(cpu.val_dataloader())), 0)
    assert out["image"].device.type == "cuda" and out["image"].dtype == torch.float32
    assert out["image"].shape == ref["image"].shape and out["key"] == ref["key"]
    assert torch.equal(out["target"].cpu(), ref["target"])
    assert (out["image"].cpu() - ref["image"]).abs().mean() < 0.05  # nvjpeg vs libjpeg-turbo, box vs antialias


@pytest.mark.cuda
def test_gpu_training_batches_decode_ahead_on_a_side_stream_and_skip_corrupt_images(tmp_path):
    dm = datamodule(tmp_path, batch_size=4)
    bad = [{"__key__": f"bad{i}", "jpg": bomb_jpeg(40, 32), "cls": b"0"} for i in range(4)]
    add_shard(tmp_path / "train", "bad-0.tar", bad)
    dm = datamodule(tmp_path, batch_size=4, train_size=16)
    dm.setup("fit")
    batches = [dm.transfer_batch_to_device(b, torch.device("cuda"), 0) for b in dm.train_dataloader()]
    torch.cuda.synchronize()
    assert len(batches) == 16 // 4  # an all-corrupt batch is replaced, the epoch keeps its length
    for batch in batches:
        assert batch["image"].is_cuda and batch["image"].shape == (len(batch["key"]), 3, 24, 24)
        assert batch["image"].dtype == torch.uint8 and not any(k.startswith("bad") for k in batch["key"])
    cpu = ResizeCenterCrop(24, 28)([smooth_image(h, w, s) for s, (h, w) in enumerate(IMAGES)])
    gpu = ResizeCenterCrop(24, 28)([smooth_image(h, w, s).cuda() for s, (h, w) in enumerate(IMAGES)])
    assert (gpu.cpu().int() - cpu.int()).abs().max() <= 1  # the same kernels' arithmetic on both devices


@pytest.mark.cuda
def test_gpu_batched_crop_never_makes_the_host_wait_for_the_device():
    """The crop runs on the side stream while the host queues the step: a host sync there (a copy from
    pageable memory, an .item()) would stall the host until the GPU drains. The GPU check counted 5 per batch."""
    images = [smooth_image(h, w, s).cuda() for s, (h, w) in enumerate(IMAGES)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        train = RandomResizedCropFlip(24)(images)
        val = ResizeCenterCrop(24, 28)(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert train.is_cuda and train.shape == val.shape == (len(IMAGES), 3, 24, 24)
    cpu = ResizeCenterCrop(24, 28)([image.cpu() for image in images])
    assert (val.cpu().int() - cpu.int()).abs().max() <= 1  # the pinned copies carried the right boxes


@pytest.mark.cuda
def test_lightning_fits_and_validates_with_gpu_decode(tmp_path):
    from tests.helpers import tiny_module, tiny_trainer

    datamodule(tmp_path)
    add_shard(tmp_path / "train", "bad-0.tar", [{"__key__": f"bad{i}", "jpg": bomb_jpeg(40, 32), "cls": b"0"}
                                                for i in range(4)])
    dm = datamodule(tmp_path, image_size=71, eval_resize=80)  # 12 good + 4 corrupt samples, batches of 4
    trainer = tiny_trainer(tmp_path / "run", accelerator="gpu", max_steps=4)
    trainer.fit(tiny_module(dm), datamodule=dm)
    assert trainer.global_step == 4 and "val/acc1" in trainer.callback_metrics
