import io
import json
import multiprocessing

import numpy as np
import torch
from jsonargparse import ArgumentParser

from xception_pl.data import DemoDataModule, WebDatasetDataModule, make_demo_data
from xception_pl.data.demo import DEMO_SHARDS

SMALL = dict(num_classes=4, train_images_per_class=8, val_images_per_class=4, source_size=48)


def build(root: str) -> str:
    return str(make_demo_data(root, **SMALL))


def test_demo_data_is_built_once_as_real_shards(tmp_path):
    path = make_demo_data(str(tmp_path), **SMALL)
    manifest = path / "train" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert make_demo_data(str(tmp_path), **SMALL) == path and manifest.stat().st_mtime_ns == stamp
    train = json.loads(manifest.read_text())
    assert train["num_samples"] == 32 and train["num_classes"] == 4 and len(train["shards"]) == DEMO_SHARDS
    assert json.loads((path / "val" / "manifest.json").read_text())["num_samples"] == 16
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [path.name]


def test_concurrent_callers_get_one_complete_build(tmp_path):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        paths = pool.map(build, [str(tmp_path)] * 2)
    assert paths[0] == paths[1]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [paths[0].split("/")[-1]]


def test_demo_classes_differ_visibly(tmp_path):
    """Nearest class mean of the saturated pixels' colour: the class is in plain sight."""
    from PIL import Image
    import tarfile

    def features(split):
        xs, ys = [], []
        for shard in sorted((path / split).glob("*.tar")):
            with tarfile.open(shard) as tar:
                names = tar.getnames()
                for name in (n for n in names if n.endswith(".jpg")):
                    rgb = np.asarray(Image.open(io.BytesIO(tar.extractfile(name).read())).convert("RGB"), float)
                    saturated = rgb[(rgb.max(-1) - rgb.min(-1)) > 100]
                    xs.append(saturated.mean(0))
                    ys.append(int(tar.extractfile(name[:-4] + ".cls").read()))
        return np.array(xs), np.array(ys)

    path = make_demo_data(str(tmp_path), **SMALL)
    x, y = features("train")
    means = np.stack([x[y == c].mean(0) for c in range(4)])
    vx, vy = features("val")
    predicted = np.linalg.norm(vx[:, None] - means[None], axis=-1).argmin(1)
    assert (predicted == vy).mean() >= 0.9


def test_demo_datamodule_serves_train_val_and_test(tmp_path):
    dm = DemoDataModule(root=str(tmp_path), num_classes=4, train_images_per_class=8, val_images_per_class=4,
                        source_size=48, batch_size=8, num_workers=0, image_size=32, eval_resize=36, seed=7,
                        max_image_pixels=10**6)
    assert (dm.num_classes, dm.multilabel, dm.train_size) == (4, False, 32)
    assert (dm.position.seed, dm.max_image_pixels) == (7, 10**6)  # forwarded to WebDatasetDataModule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["target"].max() < 4
    assert sum(len(b["key"]) for b in dm.test_dataloader()) == 16


def test_multilabel_demo_has_one_to_three_labels_per_image(tmp_path):
    dm = DemoDataModule(root=str(tmp_path), num_classes=5, multilabel=True, train_images_per_class=4,
                        val_images_per_class=2, source_size=48, batch_size=10, num_workers=0, image_size=32,
                        eval_resize=32)
    assert dm.multilabel and dm.num_classes == 5 and dm.train_size == 20
    targets = torch.cat([b["target"] for b in dm.val_dataloader()])
    assert targets.shape == (10, 5) and set(targets.sum(1).tolist()) <= {1.0, 2.0, 3.0}


def test_datamodule_signatures_build_a_documented_command_line():
    for cls in (WebDatasetDataModule, DemoDataModule):
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "data")
        config = parser.parse_args(["--data.batch_size", "8", "--data.decode_device", "cuda"])
        assert config.data.batch_size == 8 and config.data.decode_device == "cuda"
        help_text = io.StringIO()
        parser.print_help(help_text)
        assert "samples per batch, per device" in help_text.getvalue()
    parser = ArgumentParser()
    parser.add_class_arguments(WebDatasetDataModule, "data")
    assert parser.parse_args(["--data.train", "pipe:cat x-{0..3}.tar", "--data.train_size", "4"]).data.train_size == 4


def test_demo_command_line_offers_the_loader_options_but_no_paths_or_sizes():
    parser = ArgumentParser()
    parser.add_class_arguments(DemoDataModule, "data")
    defaults = parser.get_defaults().data
    options = set(vars(defaults))
    forwarded = {"decode_device", "max_image_pixels", "train_transform", "eval_transform", "seed", "pin_memory",
                 "persistent_workers", "prefetch_factor", "multiprocessing_context"}
    assert forwarded <= options
    assert not options & {"train", "val", "test", "predict", "train_size", "val_size", "test_size", "predict_size"}
    assert (defaults.batch_size, defaults.image_size, defaults.num_classes) == (32, 96, 10)  # the demo's own
