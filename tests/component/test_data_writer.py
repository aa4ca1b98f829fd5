import json
import tarfile
from pathlib import Path

import pytest

from tests.data_helpers import bomb_jpeg, image_tree, jpeg, jsonl_source
from xception_pl.checkpointing import temporary_path
from xception_pl.data import write_shards
from xception_pl.data.writer import main


def tar_members(directory: Path, manifest: dict) -> dict[str, bytes]:
    members = {}
    for shard in manifest["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            names = tar.getnames()
            assert len({n.split(".")[0] for n in names}) == shard["count"]
            members.update({n: tar.extractfile(n).read() for n in names})
    return members


def test_folder_source_round_trip_keeps_jpeg_bytes_and_labels(tmp_path):
    files = image_tree(tmp_path / "src", classes=3, per_class=5)
    (tmp_path / "src" / "c1" / "drawing.png").write_bytes(jpeg(seed=7, fmt="PNG"))  # not a JPEG: re-encoded
    (tmp_path / "src" / "c2" / "big.jpg").write_bytes(jpeg(200, 100, seed=8))  # larger than max_side: resized
    manifest = write_shards(str(tmp_path / "src"), str(tmp_path / "out"), shard_size=4, workers=2, max_side=64,
                            progress=False)

    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 17 and [s["count"] for s in manifest["shards"]] == [4, 4, 4, 4, 1]
    assert manifest["shards"][0]["name"] == "out-000000.tar"
    assert manifest["num_classes"] == 3 and manifest["class_names"] == ["c0", "c1", "c2"]
    assert manifest["multilabel"] is False and manifest["skipped"]["count"] == 0
    members = tar_members(tmp_path / "out", manifest)
    for key, (label, data) in files.items():
        assert members[f"{key}.jpg"] == data  # original bytes, no re-encode
        assert members[f"{key}.cls"] == str(label).encode()
    assert members["c1/drawing.cls"] == b"1" and members["c1/drawing.jpg"][:2] == b"\xff\xd8"
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(members["c2/big.jpg"])).size == (64, 32)
    keys_in_order = [n for n in members if n.endswith(".cls")]
    assert keys_in_order != sorted(keys_in_order)  # shuffled across shards


def test_same_seed_writes_the_same_shards_with_any_worker_count(tmp_path):
    image_tree(tmp_path / "src", classes=2, per_class=5)
    one = write_shards(str(tmp_path / "src"), str(tmp_path / "a"), shard_size=3, workers=1, progress=False)
    two = write_shards(str(tmp_path / "src"), str(tmp_path / "b"), shard_size=3, workers=2, progress=False)
    assert tar_members(tmp_path / "a", one) == tar_members(tmp_path / "b", two)


def test_jsonl_source_round_trip_writes_label_lists(tmp_path):
    labels = [[0, 4], [2], [], [1, 2, 3]]
    source = jsonl_source(tmp_path / "src", labels)
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\ne\n")
    manifest = write_shards(str(source), str(tmp_path / "out"), shard_size=3, workers=1, progress=False,
                            class_names=str(tmp_path / "names.txt"), prefix="jft")
    assert manifest["multilabel"] is True and manifest["num_classes"] == 5
    assert manifest["class_names"] == ["a", "b", "c", "d", "e"]
    assert [s["name"] for s in manifest["shards"]] == ["jft-000000.tar", "jft-000001.tar"]
    members = tar_members(tmp_path / "out", manifest)
    for i, ids in enumerate(labels):
        assert json.loads(members[f"im{i}.json"]) == ids
        assert members[f"im{i}.jpg"] == (tmp_path / "src" / f"im{i}.jpg").read_bytes()
    with pytest.raises(ValueError, match="num_classes"):
        write_shards(str(source), str(tmp_path / "out2"), num_classes=4, workers=1, progress=False)


def test_unreadable_and_oversized_images_are_reported_and_left_out(tmp_path, capsys):
    image_tree(tmp_path / "src", classes=2, per_class=2)
    (tmp_path / "src" / "c0" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    (tmp_path / "src" / "c0" / "truncated.jpg").write_bytes(jpeg(seed=3)[:300])
    (tmp_path / "src" / "c1" / "bomb.jpg").write_bytes(bomb_jpeg())
    manifest = write_shards(str(tmp_path / "src"), str(tmp_path / "out"), workers=1, progress=False)
    assert manifest["num_samples"] == 4
    assert manifest["skipped"]["count"] == 3
    assert manifest["skipped"]["reasons"] == {"unreadable": 2, "too_large": 1}
    assert sorted(Path(p).name for p in manifest["skipped"]["paths"]) == ["bomb.jpg", "corrupt.jpg", "truncated.jpg"]
    err = capsys.readouterr().err
    assert "corrupt.jpg" in err and "truncated.jpg" in err and "bomb.jpg" in err


def test_failed_write_leaves_no_manifest_and_no_partial_shard(tmp_path):
    image_tree(tmp_path / "src", classes=2, per_class=3)
    blocked = temporary_path(tmp_path / "out" / "out-000001.tar")
    blocked.mkdir(parents=True)  # the second shard cannot be opened
    with pytest.raises(OSError):
        write_shards(str(tmp_path / "src"), str(tmp_path / "out"), shard_size=2, workers=1, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [blocked.name, "out-000000.tar"]


def test_existing_shards_are_replaced_only_with_overwrite(tmp_path):
    image_tree(tmp_path / "src", classes=2, per_class=3)
    write_shards(str(tmp_path / "src"), str(tmp_path / "out"), shard_size=1, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shards(str(tmp_path / "src"), str(tmp_path / "out"), workers=1, progress=False)
    manifest = write_shards(str(tmp_path / "src"), str(tmp_path / "out"), shard_size=4, workers=1, progress=False,
                            overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "out-000000.tar", "out-000001.tar"]
    assert manifest["num_samples"] == 6


def test_cli_accepts_dashed_and_underscored_options(tmp_path, capsys):
    image_tree(tmp_path / "src", classes=2, per_class=3)
    main(["--source", str(tmp_path / "src"), "--output", str(tmp_path / "out"), "--shard-size", "4",
          "--shuffle_seed", "3", "--workers", "1", "--progress", "false", "--max-count", "5"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [4, 1] and manifest["shuffle_seed"] == 3
    assert "wrote 5 samples in 2 shards" in capsys.readouterr().err


def test_missing_source_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder tree or a .jsonl"):
        write_shards(str(tmp_path / "nope"), str(tmp_path / "out"), workers=1)
