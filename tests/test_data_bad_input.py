"""Bad data is skipped and counted, training goes on; bad configuration fails before any worker starts."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from tests.test_data_helpers import add_shard, bomb_jpeg, jpeg, shards
from xception_pl.data import SKIP_REASONS, WebDatasetDataModule


def counted(batches) -> dict[str, int]:
    total = sum(b["skipped"] for b in batches)
    return {r: int(n) for r, n in zip(SKIP_REASONS, total) if n}


def bad_shards(tmp_path):
    data = shards(tmp_path, classes=3, per_class=4, shard_size=3)  # 12 good samples in 4 shards
    add_shard(data, "bad-000000.tar", [
        {"__key__": "corrupt", "jpg": jpeg()[:200] + b"\x00" * 100, "cls": b"0"},
        {"__key__": "not_an_image", "jpg": b"hello", "cls": b"0"},
        {"__key__": "no_label", "jpg": jpeg(seed=1)},
        {"__key__": "no_image", "cls": b"1"},
        {"__key__": "out_of_range", "jpg": jpeg(seed=2), "cls": b"3"},
        {"__key__": "not_a_number", "jpg": jpeg(seed=3), "cls": b"one"},
        {"__key__": "bomb", "jpg": bomb_jpeg(), "cls": b"2"},
        {"__key__": "fine", "jpg": jpeg(seed=4), "cls": b"2"},
    ], position=2)
    return data


def test_bad_samples_are_skipped_and_counted_per_reason(tmp_path, caplog):
    data = bad_shards(tmp_path)
    dm = WebDatasetDataModule(val=str(data), batch_size=4, num_workers=0, image_size=16, eval_resize=16)
    with caplog.at_level(logging.WARNING, logger="xception_pl.data.samples"):
        batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 13 and "fine" in keys
    assert counted(batches) == {"corrupt_image": 2, "missing_field": 2, "bad_label": 2, "too_large": 1}
    assert "too_large" in caplog.text and "bomb" in caplog.text


def test_training_goes_on_past_bad_samples(tmp_path):
    dm = WebDatasetDataModule(train=str(bad_shards(tmp_path)), batch_size=4, num_workers=0, image_size=16,
                              shuffle_buffer=50)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 20 // 4 and all(len(b["key"]) == 4 for b in batches)
    assert not {"no_label", "bomb", "corrupt", "out_of_range"} & {k for b in batches for k in b["key"]}


def test_truncated_tar_in_the_middle_is_counted_and_later_shards_are_read(tmp_path):
    data = shards(tmp_path, classes=3, per_class=4, shard_size=3)
    manifest = json.loads((data / "manifest.json").read_text())
    middle = data / manifest["shards"][1]["name"]
    middle.write_bytes(middle.read_bytes()[:2000])  # cut inside the first sample's image
    dm = WebDatasetDataModule(val=str(data), batch_size=4, num_workers=0, image_size=16, eval_resize=16)
    batches = list(dm.val_dataloader())
    assert len([k for b in batches for k in b["key"]]) == 9  # the other three shards, whole
    assert counted(batches).get("read_error", 0) >= 1


def test_decompression_bomb_is_skipped_without_decoding(tmp_path):
    data = shards(tmp_path, classes=1, per_class=1, shard_size=1)
    # 50000 x 50000 RGB would be 7.5 GB decoded; the header alone decides
    add_shard(data, "bomb-000000.tar", [{"__key__": "bomb", "jpg": bomb_jpeg(), "cls": b"0"}], position=0)
    dm = WebDatasetDataModule(val=str(data), batch_size=4, num_workers=0, image_size=16, eval_resize=16)
    assert counted(list(dm.val_dataloader())) == {"too_large": 1}


def test_skips_of_a_worker_without_good_samples_reach_the_next_batch(tmp_path, caplog):
    data = shards(tmp_path, classes=1, per_class=1, shard_size=1)
    add_shard(data, "bomb-000000.tar", [{"__key__": "bomb", "jpg": bomb_jpeg(), "cls": b"0"}], position=0)
    dm = WebDatasetDataModule(val=str(data), batch_size=4, num_workers=2, image_size=16, eval_resize=16,
                              multiprocessing_context="fork", persistent_workers=False)
    batches = list(dm.val_dataloader())  # worker 0 read only the bomb; worker 1 the good sample
    assert [b["key"] for b in batches] == [["c0/img0_0"]] and counted(batches) == {"too_large": 1}

    none_fit = WebDatasetDataModule(val=str(data), batch_size=4, num_workers=0, max_image_pixels=40 * 32 - 1)
    with caplog.at_level(logging.WARNING, logger="xception_pl.data.pipeline"):
        assert list(none_fit.val_dataloader()) == []
    assert "2 samples skipped after this rank's last batch" in caplog.text


def test_all_shards_unreadable_fails_loudly_instead_of_spinning(tmp_path):
    dm = WebDatasetDataModule(train=f"pipe:cat {tmp_path}/missing-{{0..3}}.tar", train_size=8, num_classes=2,
                              multilabel=False, batch_size=4, num_workers=0)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="shard read errors in a row"):
        next(iter(dm.train_dataloader()))


def test_pattern_matching_no_shards_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no shard file"):
        WebDatasetDataModule(train=f"{tmp_path}/train-{{000000..000009}}.tar", train_size=10, num_classes=2,
                             multilabel=False)


def test_some_missing_shards_are_listed(tmp_path):
    data = shards(tmp_path, classes=2, per_class=2, shard_size=2)
    with pytest.raises(FileNotFoundError, match="1 of 3 shards do not exist"):
        WebDatasetDataModule(train=f"{data}/train-{{000000..000002}}.tar")


def test_directory_without_manifest_names_the_writer(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(FileNotFoundError, match="python -m xception_pl shards"):
        WebDatasetDataModule(train=str(tmp_path / "raw"))


def test_pattern_without_manifest_needs_a_size(tmp_path):
    data = shards(tmp_path, classes=2, per_class=2, shard_size=2)
    (data / "manifest.json").unlink()
    with pytest.raises(ValueError, match="pass train_size"):
        WebDatasetDataModule(train=f"{data}/train-{{000000..000001}}.tar", num_classes=2, multilabel=False)
    with pytest.raises(ValueError, match="pass multilabel"):
        WebDatasetDataModule(train=f"{data}/train-{{000000..000001}}.tar", train_size=4, num_classes=2)
    with pytest.raises(ValueError, match="pass train_size"):
        WebDatasetDataModule(train=f"pipe:cat {data}/train-{{000000..000001}}.tar", num_classes=2, multilabel=False)


def test_train_set_smaller_than_a_global_batch_is_refused(tmp_path):
    dm = WebDatasetDataModule(train=str(shards(tmp_path, classes=2, per_class=2)), batch_size=4, num_workers=0)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(ValueError, match="less than one global batch"):
        dm.setup("fit")


def test_manifests_that_disagree_are_refused(tmp_path):
    a = shards(tmp_path, "a", classes=2, per_class=2)
    b = shards(tmp_path, "b", classes=3, per_class=2)
    with pytest.raises(ValueError, match="num_classes"):
        WebDatasetDataModule(train=str(a), val=str(b))
    with pytest.raises(ValueError, match="num_classes=5"):
        WebDatasetDataModule(train=str(a), num_classes=5)
