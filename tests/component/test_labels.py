"""Label files and class lists through `python -m xception_pl shards`: ImageNet as downloaded, CSV, --classes."""

import json
import tarfile
from pathlib import Path

import pytest

from tests.data_helpers import image_tree, jpeg
from xception_pl.__main__ import main
from xception_pl.data import WebDatasetDataModule

SYNSETS = ["n01440764", "n01443537", "n01484850"]


def shards(*args: str) -> dict:
    main(["shards", "--workers", "1", "--progress", "false", "--shard_size", "2", *args])
    output = Path(args[args.index("--output") + 1])
    return json.loads((output / "manifest.json").read_text())


def labels_in(directory: Path) -> dict[str, int]:
    """{sample key: class id} of every shard in a manifest."""
    manifest = json.loads((directory / "manifest.json").read_text())
    out = {}
    for shard in manifest["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            out |= {m.name.split(".")[0]: int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")}
    return out


def imagenet_train(tmp_path: Path) -> Path:
    for i, synset in enumerate(SYNSETS):
        for j in range(2):
            (tmp_path / "train" / synset).mkdir(parents=True, exist_ok=True)
            (tmp_path / "train" / synset / f"{synset}_{j}.JPEG").write_bytes(jpeg(seed=10 * i + j))
    shards("--source", str(tmp_path / "train"), "--output", str(tmp_path / "train_shards"))
    return tmp_path / "train_shards"


def test_ilsvrc_val_solution_csv_gets_the_train_class_ids(tmp_path):
    train = imagenet_train(tmp_path)
    val = tmp_path / "val"
    val.mkdir()
    # As published: flat JPEGs, synset first in PredictionString, rows in no particular order;
    # this val holds only two of the three classes, so its own sorted names would give other ids.
    truth = {"ILSVRC2012_val_00000003": "n01484850", "ILSVRC2012_val_00000001": "n01443537",
             "ILSVRC2012_val_00000002": "n01484850"}
    rows = ["ImageId,PredictionString"]
    for n, (image_id, synset) in enumerate(truth.items()):
        (val / f"{image_id}.JPEG").write_bytes(jpeg(seed=n))
        rows.append(f"{image_id},{synset} 255 142 454 329 {synset} 44 21 322 295")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")

    manifest = shards("--source", str(val), "--labels", str(tmp_path / "LOC_val_solution.csv"),
                      "--classes", str(train / "manifest.json"), "--output", str(tmp_path / "val_shards"))

    assert manifest["class_names"] == SYNSETS and manifest["num_classes"] == 3 and manifest["num_samples"] == 3
    assert labels_in(tmp_path / "val_shards") == {k: SYNSETS.index(s) for k, s in truth.items()}
    data = WebDatasetDataModule(train=str(train), val=str(tmp_path / "val_shards"), num_workers=0, batch_size=2)
    assert data.class_names == SYNSETS and data.num_classes == 3


def test_csv_labels_by_name_or_id_and_a_class_list_file(tmp_path):
    image_tree(tmp_path / "flat" / "sub", classes=1, per_class=4)  # flat/sub/c0/img0_*.jpg
    (tmp_path / "by_name.csv").write_text("path,label\n" + "".join(
        f"sub/c0/img0_{i}.jpg,{'cat' if i % 2 else 'dog'}\n" for i in range(4)))
    named = shards("--source", str(tmp_path / "flat"), "--labels", str(tmp_path / "by_name.csv"),
                   "--output", str(tmp_path / "named"))
    assert named["class_names"] == ["cat", "dog"]
    assert labels_in(tmp_path / "named") == {f"sub/c0/img0_{i}": 0 if i % 2 else 1 for i in range(4)}

    (tmp_path / "by_id.csv").write_text("".join(f"sub/c0/img0_{i}.jpg,{i}\n" for i in range(4)))  # no header
    ids = shards("--source", str(tmp_path / "flat"), "--labels", str(tmp_path / "by_id.csv"), "--num_classes", "6",
                 "--output", str(tmp_path / "ids"))
    assert ids["class_names"] is None and ids["num_classes"] == 6
    assert labels_in(tmp_path / "ids") == {f"sub/c0/img0_{i}": i for i in range(4)}

    (tmp_path / "names.txt").write_text("bird\ndog\ncat\n")
    fixed = shards("--source", str(tmp_path / "flat"), "--labels", str(tmp_path / "by_name.csv"),
                   "--classes", str(tmp_path / "names.txt"), "--output", str(tmp_path / "fixed"))
    assert fixed["class_names"] == ["bird", "dog", "cat"]
    assert labels_in(tmp_path / "fixed") == {f"sub/c0/img0_{i}": 2 if i % 2 else 1 for i in range(4)}


def test_class_folders_follow_the_order_of_classes(tmp_path):
    image_tree(tmp_path / "src", classes=2, per_class=2)  # c0, c1
    (tmp_path / "names.txt").write_text("c1\nx\nc0\n")
    manifest = shards("--source", str(tmp_path / "src"), "--classes", str(tmp_path / "names.txt"),
                      "--output", str(tmp_path / "out"))
    assert manifest["class_names"] == ["c1", "x", "c0"] and manifest["num_classes"] == 3
    assert labels_in(tmp_path / "out") == {f"c{c}/img{c}_{i}": 2 - 2 * c for c in range(2) for i in range(2)}


def test_label_file_naming_a_missing_image_stops_before_writing(tmp_path):
    image_tree(tmp_path / "flat", classes=1, per_class=2)
    (tmp_path / "labels.csv").write_text("c0/img0_0.jpg,a\nc0/gone.jpg,b\n")
    with pytest.raises(FileNotFoundError, match=r"1 images named in --labels .* e.g. \[.labels.csv:2: c0/gone.jpg"):
        shards("--source", str(tmp_path / "flat"), "--labels", str(tmp_path / "labels.csv"),
               "--output", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_class_in_val_absent_from_train_is_refused(tmp_path):
    train = imagenet_train(tmp_path)
    (tmp_path / "val" / "n99999999").mkdir(parents=True)
    (tmp_path / "val" / "n99999999" / "x.JPEG").write_bytes(jpeg())
    with pytest.raises(ValueError, match="class 'n99999999' is not in --classes .*manifest.json"):
        shards("--source", str(tmp_path / "val"), "--classes", str(train / "manifest.json"),
               "--output", str(tmp_path / "val_shards"))


def test_fit_refuses_train_and_val_with_different_class_names(tmp_path, capsys):
    train = imagenet_train(tmp_path)
    for synset in SYNSETS[1:] + ["n02000000"]:  # val written without --classes: 3 classes, other ids
        (tmp_path / "val" / synset).mkdir(parents=True)
        (tmp_path / "val" / synset / "a.JPEG").write_bytes(jpeg())
    shards("--source", str(tmp_path / "val"), "--output", str(tmp_path / "val_shards"))
    with pytest.raises(SystemExit, match="class id 0 is 'n01440764' in train but 'n01443537' in val"):
        main(["fit", "--data", "xception_pl.data.WebDatasetDataModule", "--data.train", str(train),
              "--data.val", str(tmp_path / "val_shards"), "--data.num_workers", "0", "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(tmp_path / "run")])
