import json
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.data_helpers import jsonl_source, shards
from xception_pl.data import SKIP_REASONS, WebDatasetDataModule, write_shards


def datamodule(tmp_path, **kw):
    data = tmp_path / "train"
    if not data.exists():
        shards(tmp_path, "train", classes=3, per_class=4, shard_size=2)  # 12 samples, 6 shards
    args = dict(train=str(data), val=str(data), batch_size=4, num_workers=0, image_size=24, eval_resize=28)
    return WebDatasetDataModule(**(args | kw))


def all_keys(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    keys = []
    for shard in manifest["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            keys += [n.rsplit(".", 1)[0] for n in tar.getnames() if n.endswith((".cls", ".json"))]
    return keys


def test_facts_come_from_the_manifest_at_construction(tmp_path):
    dm = datamodule(tmp_path)
    assert (dm.num_classes, dm.multilabel, dm.train_size, dm.batch_size) == (3, False, 12, 4)
    assert dm.class_names == ["c0", "c1", "c2"]


def test_train_batches_have_the_documented_format(tmp_path):
    dm = datamodule(tmp_path)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 12 // 4
    batch = batches[0]
    assert set(batch) == {"image", "target", "skipped", "key", "stream"}
    assert [b["stream"][:2].tolist() for b in batches] == [[0, 4], [0, 8], [0, 12]]  # slot, raw samples used
    assert batch["image"].shape == (4, 3, 24, 24) and batch["image"].dtype == torch.uint8
    assert batch["target"].dtype == torch.long and batch["target"].shape == (4,)
    assert batch["skipped"].tolist() == [0] * len(SKIP_REASONS)
    assert len(batch["key"]) == 4 and all(isinstance(k, str) for k in batch["key"])
    batch = dm.on_after_batch_transfer(batch, 0)
    assert batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].min() < -0.5


def test_validation_reads_every_sample_once_with_a_short_last_batch(tmp_path):
    dm = datamodule(tmp_path, batch_size=5)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(all_keys(tmp_path / "train"))
    assert [len(b["key"]) for b in batches] == [5, 5, 2]
    assert batches[0]["image"].shape == (5, 3, 24, 24)


def test_multilabel_targets_are_multi_hot(tmp_path):
    labels = [[0, 4], [2], [], [1, 2, 3], [4]]
    write_shards(str(jsonl_source(tmp_path / "src", labels)), str(tmp_path / "jft"), shard_size=1, workers=1,
                 progress=False)
    dm = WebDatasetDataModule(val=str(tmp_path / "jft"), batch_size=8, num_workers=0, image_size=16, eval_resize=16)
    assert dm.multilabel and dm.num_classes == 5
    (batch,) = list(dm.val_dataloader())
    assert batch["target"].dtype == torch.float32 and batch["target"].shape == (5, 5)
    by_key = {k: t.nonzero().flatten().tolist() for k, t in zip(batch["key"], batch["target"])}
    assert by_key == {f"im{i}": ids for i, ids in enumerate(labels)}


def test_pipe_url_source_with_explicit_sizes(tmp_path):
    data = shards(tmp_path, classes=2, per_class=3, shard_size=2)  # 3 shards
    pattern = f"pipe:cat {data}/train-{{000000..000002}}.tar"
    with pytest.raises(ValueError, match="num_classes"):
        WebDatasetDataModule(val=pattern, val_size=6)
    dm = WebDatasetDataModule(train=pattern, val=pattern, train_size=6, val_size=6, num_classes=2, multilabel=False,
                              batch_size=3, num_workers=0, image_size=16, eval_resize=16)
    dm.setup("fit")
    assert len(list(dm.train_dataloader())) == 2
    assert sorted(k for b in dm.val_dataloader() for k in b["key"]) == sorted(all_keys(data))


def test_predict_reads_shards_without_labels(tmp_path):
    import webdataset as wds
    from tests.data_helpers import jpeg
    with wds.TarWriter(str(tmp_path / "unlabelled-0.tar"), encoder=False) as tar:
        for i in range(3):
            tar.write({"__key__": f"img{i}", "jpg": jpeg(seed=i)})
    dm = WebDatasetDataModule(predict=str(tmp_path / "unlabelled-0.tar"), predict_size=3, num_classes=4,
                              multilabel=False, batch_size=4, num_workers=0, image_size=16, eval_resize=16)
    (batch,) = list(dm.predict_dataloader())
    assert batch["key"] == ["img0", "img1", "img2"] and batch["target"].tolist() == [-1, -1, -1]
    assert batch["skipped"].sum() == 0


def test_brace_pattern_beside_a_manifest_counts_its_shards(tmp_path):
    data = shards(tmp_path, classes=2, per_class=3, shard_size=2)
    dm = WebDatasetDataModule(train=f"{data}/train-{{000000..000001}}.tar", num_workers=0)
    assert dm.train_size == 4 and dm.num_classes == 2


def test_two_workers_read_every_sample_once_and_train(tmp_path):  # spawned workers: test_data_distributed
    dm = datamodule(tmp_path, num_workers=2, multiprocessing_context="fork")
    dm.setup("fit")
    assert sorted(k for b in dm.val_dataloader() for k in b["key"]) == sorted(all_keys(tmp_path / "train"))
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(b["image"].shape == (4, 3, 24, 24) for b in batches)


def test_resumed_state_redraws_the_same_training_stream(tmp_path):
    dm = datamodule(tmp_path, num_workers=1, multiprocessing_context="fork", seed=5)
    dm.setup("fit")
    loader = dm.train_dataloader()  # persistent worker: the epoch reaches it through shared memory
    epoch0 = [b["key"] for b in loader]
    epoch1 = [b["key"] for b in loader]
    state = dm.state_dict()
    assert state == {"seed": 5, "epoch": 1, "batch": 0} and epoch0 != epoch1

    resumed = datamodule(tmp_path, num_workers=0, seed=0)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    assert [b["key"] for b in resumed.train_dataloader()] == epoch1

    resumed.trainer = SimpleNamespace(current_epoch=0, global_rank=0, world_size=1, training=True)
    assert [b["key"] for b in resumed.train_dataloader()] == epoch0  # a trainer's epoch takes precedence


def test_ranks_draw_different_training_data(tmp_path):
    keys = []
    for rank in (0, 1):
        dm = datamodule(tmp_path)
        dm.trainer = SimpleNamespace(current_epoch=0, global_rank=rank, world_size=2, training=True,
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
        dm.setup("fit")
        keys.append([b["key"] for b in dm.train_dataloader()])
    assert len(keys[0]) == len(keys[1]) == 12 // (4 * 2) and keys[0] != keys[1]


def test_the_data_package_does_not_import_the_slurm_module():
    code = "import sys, xception_pl.data; assert 'xception_pl.slurm' not in sys.modules, 'data/ imports slurm'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
