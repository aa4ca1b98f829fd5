"""`python -m xception_pl predict` on plain image files: a folder (recursively) or a glob, with class names."""

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data_helpers import jpeg, shards
from xception_pl.__main__ import main
from xception_pl.data import transforms
from xception_pl.model import Xception
from xception_pl.module import XceptionModule

CONFIG = str(Path(__file__).parents[2] / "configs" / "finetune.yaml")
DATA = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--data.init_args.image_size", "71",
        "--data.init_args.eval_resize", "80", "--model.pretrained", "null"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A one-step run on 3 classes (c0, c1, c2); returns its directory."""
    root = tmp_path_factory.mktemp("run")
    shards(root, "train", classes=3, per_class=2, shard_size=4)
    shards(root, "val", classes=3, per_class=1, shard_size=4)
    main(["fit", "--config", CONFIG, *DATA, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(root),
          "--data.init_args.train", str(root / "train"), "--data.init_args.val", str(root / "val"),
          "--freeze_backbone.samples", "0", "--ema.decay", "0.5"])
    return root


def predict(run: Path, source: str, output: Path) -> list[dict]:
    main(["predict", "--config", CONFIG, *DATA, "--trainer.default_root_dir", str(run / "predict"),
          "--data.init_args.train", str(run / "train"), "--data.init_args.val", str(run / "val"),
          "--data.init_args.predict", source, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
          "--trainer.callbacks+=xception_pl.predictions.NamedPredictionWriter", "--trainer.callbacks.output",
          str(output)])
    return [json.loads(line) for line in output.read_text().splitlines()]


def photos(root: Path) -> list[Path]:
    files = [root / "a.jpg", root / "trip" / "b.JPEG", root / "trip" / "day2" / "c.png"]
    for i, path in enumerate(files):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(90, 80, seed=i, fmt="PNG" if path.suffix == ".png" else "JPEG"))
    (root / "trip" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "notes.txt").write_text("not an image")
    return files


def test_folder_is_predicted_recursively_with_names_and_unreadable_files_reported(trained, tmp_path, capfd):
    files = photos(tmp_path / "photos")
    lines = predict(trained, str(tmp_path / "photos"), tmp_path / "preds.jsonl")

    by_key = {line["key"]: line for line in lines}
    assert sorted(by_key) == sorted(map(str, files + [tmp_path / "photos" / "trip" / "broken.jpg"]))
    assert by_key[str(tmp_path / "photos" / "trip" / "broken.jpg")]["error"].startswith("corrupt_image")
    assert "1 inputs could not be read" in capfd.readouterr().err
    # The probabilities are the checkpoint's Polyak network on the eval crop of each file.
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    network = partial(Xception, drop_rate=0.5, bn_eps=1e-5, pool_padding="symmetric")
    module = XceptionModule(num_classes=3, network=network).eval()
    module.load_state_dict(checkpoint["state_dict"])
    for path in files:
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        with torch.no_grad():
            probs = module(transforms.to_model_input(transforms.eval_transform(71, 80)(image))[None]).softmax(-1)[0]
        line = by_key[str(path)]
        assert line["classes"] == probs.argsort(descending=True).tolist()
        assert line["names"] == [f"c{c}" for c in line["classes"]]
        assert line["probs"] == pytest.approx(probs.sort(descending=True).values.tolist(), abs=1e-5)


def test_a_glob_selects_the_files_it_matches(trained, tmp_path):
    photos(tmp_path / "photos")
    lines = predict(trained, str(tmp_path / "photos" / "**" / "*.png"), tmp_path / "preds.jsonl")
    assert [line["key"] for line in lines] == [str(tmp_path / "photos" / "trip" / "day2" / "c.png")]


def test_a_folder_without_images_is_refused_in_one_line(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no image files and no manifest.json"):
        predict(trained, str(tmp_path / "empty"), tmp_path / "preds.jsonl")
