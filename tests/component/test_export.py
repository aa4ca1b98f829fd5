"""`python -m xception_pl export`: safetensors, torch.export and ONNX, each checked against the checkpoint."""

import json
from pathlib import Path

import onnxruntime
import pytest
import torch
from safetensors.torch import load_file

from tests.data_helpers import shards
from xception_pl import Xception
from xception_pl.__main__ import main
from xception_pl.export import ExportError, check

CONFIG = str(Path(__file__).parents[2] / "configs" / "finetune.yaml")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a two-step run with EMA on 3 classes, so Polyak and raw weights differ."""
    root = tmp_path_factory.mktemp("run")
    shards(root, "train", classes=3, per_class=2, shard_size=4)
    shards(root, "val", classes=3, per_class=1, shard_size=4)
    main(["fit", "--config", CONFIG, "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
          "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root),
          "--data.init_args.train", str(root / "train"), "--data.init_args.val", str(root / "val"),
          "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--data.init_args.image_size", "71",
          "--data.init_args.eval_resize", "80", "--model.pretrained", "null", "--freeze_backbone.samples", "0",
          "--ema.decay", "0.5"])
    return root / "checkpoints" / "last.ckpt"


def test_every_format_reproduces_the_polyak_network(checkpoint, tmp_path):
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(tmp_path / "out" / "xception"),
          "--image_size", "71"])
    ckpt = torch.load(checkpoint, weights_only=True)
    meta = json.loads((tmp_path / "out" / "xception.json").read_text())
    assert meta["class_names"] == ["c0", "c1", "c2"] and meta["network"]["init_args"]["num_classes"] == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "xception.json", "xception.onnx", "xception.pt2", "xception.safetensors"]

    # safetensors: the Polyak weights (not the raw ones), loadable by Xception(...) as the JSON says
    weights = load_file(tmp_path / "out" / "xception.safetensors")
    polyak = {k.removeprefix("network."): v for k, v in ckpt["state_dict"].items() if k.startswith("network.")}
    assert weights.keys() == polyak.keys() and all(torch.equal(weights[k], v) for k, v in polyak.items())
    assert not torch.equal(weights["head.fc.weight"], ckpt["current_model_state"]["network.head.fc.weight"])
    network = Xception(**meta["network"]["init_args"]).eval()
    network.load_state_dict(weights)

    x = torch.rand(3, 3, 71, 71) * 2 - 1  # another batch size than the export's sample: the batch is dynamic
    with torch.no_grad():
        expected = network(x)
        program = torch.export.load(tmp_path / "out" / "xception.pt2").module()
        torch.testing.assert_close(program(x), expected, atol=1e-4, rtol=0)
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "xception.onnx"))
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), expected,
                               atol=1e-3, rtol=0)


def test_an_export_that_differs_fails_with_the_difference():
    with pytest.raises(ExportError, match=r"torch_export export differs .* max \|logit difference\| 0.5 > 0.0001"):
        check("torch_export", torch.zeros(2, 3), torch.full((2, 3), 0.5))


def test_a_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="error: --ckpt_path .*nope.ckpt does not exist"):
        main(["export", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "x")])
    assert not (tmp_path / "x.safetensors").exists()
