"""Bad samples inside the shards: each is skipped and counted per reason (data/skipped, SKIP_REASONS), never
decoded when its header is too large, never fatal; the good samples around it are still served and training goes on.
(Bad inputs that stop a run: tests/component/test_bad_inputs.py.)"""

import json
import logging
import struct
import zlib

import pytest
import webdataset as wds

from tests.data_helpers import add_shard, bomb_jpeg, jpeg, shards
from xception_pl.data import SKIP_REASONS, WebDatasetDataModule
from xception_pl.data.pipeline import carry_skips


def png_header(width: int, height: int) -> bytes:
    """A PNG that announces width x height pixels and holds none."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


SAMPLES = [  # (what is wrong, the bad sample's fields, its skip reason, data module arguments)
    ("truncated JPEG", {"jpg": jpeg()[:300] + b"\x00" * 100, "cls": b"0"}, "corrupt_image", {}),
    ("not an image", {"jpg": b"hello", "cls": b"0"}, "corrupt_image", {}),
    ("PNG without data", {"png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cls": b"0"}, "corrupt_image", {}),
    ("JPEG bomb", {"jpg": bomb_jpeg(), "cls": b"0"}, "too_large", {}),  # 50000 x 50000: 7.5 GB decoded
    ("PNG bomb", {"png": png_header(30_000, 30_000), "cls": b"0"}, "too_large", {}),  # PIL's own bomb check
    ("over max_image_pixels", {"jpg": jpeg(40, 32), "cls": b"0"}, "too_large", {"max_image_pixels": 40 * 32 - 1}),
    ("no image", {"cls": b"0"}, "missing_field", {}),
    ("no image, a caption", {"txt": b"a caption", "cls": b"0"}, "missing_field", {}),
    ("no label", {"jpg": jpeg()}, "missing_field", {}),
    ("label out of range", {"jpg": jpeg(), "cls": b"3"}, "bad_label", {}),
    ("negative label", {"jpg": jpeg(), "cls": b"-1"}, "bad_label", {}),
    ("label not a number", {"jpg": jpeg(), "cls": b"one"}, "bad_label", {}),
    ("multi-label id out of range", {"jpg": jpeg(), "json": b"[0, 3]"}, "bad_label", {"multilabel": True}),
    ("multi-label not a list", {"jpg": jpeg(), "json": b'{"labels": [0]}'}, "bad_label", {"multilabel": True}),
    ("multi-label not JSON", {"jpg": jpeg(), "json": b"[0,"}, "bad_label", {"multilabel": True}),
    ("single label in a multi-label set", {"jpg": jpeg(), "cls": b"0"}, "missing_field", {"multilabel": True}),
]


@pytest.mark.parametrize("fields, reason, kwargs", [s[1:] for s in SAMPLES], ids=[s[0] for s in SAMPLES])
def test_bad_samples_are_skipped_and_counted(fields, reason, kwargs, tmp_path):
    kwargs = dict(kwargs)
    multilabel = kwargs.pop("multilabel", False)
    good = {"jpg": jpeg(20, 16, seed=5), "json" if multilabel else "cls": b"[1]" if multilabel else b"1"}
    with wds.TarWriter(str(tmp_path / "shard-0.tar"), encoder=False) as tar:
        tar.write({"__key__": "good-before", **good})
        tar.write({"__key__": "bad", **fields})
        tar.write({"__key__": "good-after", **good})
    dm = WebDatasetDataModule(val=str(tmp_path / "shard-0.tar"), val_size=3, num_classes=3, multilabel=multilabel,
                              batch_size=4, num_workers=0, image_size=16, eval_resize=16, **kwargs)
    batches = list(dm.val_dataloader())
    assert [k for b in batches for k in b["key"]] == ["good-before", "good-after"]
    skipped = sum(b["skipped"] for b in batches)
    assert {r: int(n) for r, n in zip(SKIP_REASONS, skipped) if n} == {reason: 1}


@pytest.mark.parametrize("shard", [0, 1], ids=["first", "middle"])
def test_a_truncated_shard_is_counted_and_the_other_shards_are_read(tmp_path, shard):
    data = shards(tmp_path, classes=3, per_class=4, shard_size=3)
    cut = data / json.loads((data / "manifest.json").read_text())["shards"][shard]["name"]
    cut.write_bytes(cut.read_bytes()[:2000])  # cut inside its first image
    dm = WebDatasetDataModule(val=str(data), batch_size=4, num_workers=0, image_size=16, eval_resize=16)
    batches = list(dm.val_dataloader())
    assert len([k for b in batches for k in b["key"]]) == 9  # the three other shards, whole
    assert counted(batches).get("read_error", 0) >= 1


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

    # No good sample at all: evaluation still counts the skips, on one empty batch the module counts unforwarded
    none_fit = WebDatasetDataModule(val=str(data), batch_size=4, num_workers=0, max_image_pixels=40 * 32 - 1)
    [empty] = list(none_fit.val_dataloader())
    assert empty["key"] == [] and len(empty["image"]) == 0 and counted([empty]) == {"too_large": 2}
    # training has no such batch (every rank draws the same number): the count left over is said in the log
    leftover = {"image": empty["image"], "target": empty["target"], "skipped": empty["skipped"], "key": []}
    with caplog.at_level(logging.WARNING, logger="xception_pl.data.pipeline"):
        assert list(carry_skips(iter([leftover]))) == []
    assert "2 samples skipped after this rank's last batch" in caplog.text

