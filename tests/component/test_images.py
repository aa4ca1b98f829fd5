"""Image grids in TensorBoard: the first training batch, a validation batch, misclassified validation images."""

import io
import math

import lightning as L
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import IMAGE, run_config, scalars, tiny_data, tiny_module, tiny_trainer
from xception_pl.cli import main
from xception_pl.images import MIN_TILE, ImageGrids


def images(run_dir) -> dict[str, list[tuple[int, Image.Image]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    return {tag: [(e.step, Image.open(io.BytesIO(e.encoded_image_string))) for e in events.Images(tag)]
            for tag in events.Tags()["images"]}


def tiles_in(grid: Image.Image, count: int) -> bool:
    """Whether `grid` is torchvision's make_grid of `count` tiles of our enlarged size (padding 2)."""
    tile = IMAGE * math.ceil(MIN_TILE / IMAGE)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    return grid.size == (columns * (tile + 2) + 2, rows * (tile + 2) + 2)


def test_grids_of_train_and_val_batches_and_misclassified_images_reach_tensorboard(tmp_path):
    L.seed_everything(0)
    data = tiny_data(batch_size=4, train_size=16, val_size=12)  # 4 steps, 3 validation batches per epoch
    grids = ImageGrids(num_images=3, search_batches=2)
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[grids]).fit(tiny_module(data), datamodule=data)
    logged = {tag: grid for tag, grid in images(tmp_path).items() if tag.startswith("images/")}
    assert set(logged) <= {"images/train_batch", "images/val_batch", "images/val_misclassified"}
    [(step, train)] = logged["images/train_batch"]  # once per fit, before the first step
    assert step == 0 and tiles_in(train, 3)  # num_images of the batch of 4
    [(step, val)] = logged["images/val_batch"]
    assert step == 4 and tiles_in(val, 3)
    # after each validation that got something wrong: at most num_images, from the first 2 batches (8 images)
    wrong = logged.get("images/val_misclassified", [])
    assert [step for step, _ in wrong] == [4, 8][:len(wrong)] and wrong, "an untrained 6-class model errs"
    assert all(any(tiles_in(grid, n) for n in (1, 2, 3)) for _, grid in wrong)
    tile = IMAGE * math.ceil(MIN_TILE / IMAGE)
    assert train.getpixel((4, 4)) == (0, 0, 0) != train.getpixel((tile - 2, tile - 2))  # a label box at the top left


def test_images_enabled_false_turns_them_off_from_the_command_line(tmp_path):
    run = tmp_path / "run"
    main(["fit", "--config", str(run_config(tmp_path / "c.yaml", run)), "--images.enabled", "false"])
    assert "train/loss" in scalars(run)
    assert {t: g for t, g in images(run).items() if t.startswith("images/")} == {}  # the grids; per-class results stay
