"""Fine-tuning through the CLI: `--model.pretrained` from timm's legacy_xception file and from our checkpoint."""

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.data_helpers import shards
from tests.helpers import tiny_data, tiny_module, tiny_trainer
from xception_pl.__main__ import main
from xception_pl.data import make_demo_data
from xception_pl.pretrained import FreezeBackbone
from xception_pl.module import XceptionModule
from xception_pl.pretrained import network_state, param_groups, scale_lrs
from xception_pl.timm_weights import timm_to_ours

CONFIG = str(Path(__file__).parents[2] / "configs" / "finetune.yaml")


def fit(run: Path, data: Path, *extra: str) -> dict:
    """A 2-step CPU fit with configs/finetune.yaml at 71 px; returns the last checkpoint."""
    main(["fit", "--config", CONFIG, "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
          "--trainer.max_steps", "2", "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
          "--data.init_args.train", str(data / "train"), "--data.init_args.val", str(data / "val"),
          "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0", "--data.init_args.image_size", "71",
          "--data.init_args.eval_resize", "80", "--ema.decay", "0.5", *extra])
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory) -> Path:
    """timm's legacy_xception at 1000 classes (random weights: the format, not the download)."""
    path = tmp_path_factory.mktemp("weights") / "legacy_xception.pth"
    torch.save(timm.create_model("legacy_xception", pretrained=False).state_dict(), path)
    return path


def test_timm_weights_load_exactly_and_the_classifier_is_new(tmp_path, timm_file, caplog):
    caplog.set_level("INFO")
    data = tmp_path / "data"
    shards(data, "train", classes=3, per_class=4, shard_size=4)
    shards(data, "val", classes=3, per_class=1, shard_size=4)
    ckpt = fit(tmp_path / "run", data, "--model.pretrained", str(timm_file),
               "--freeze_backbone.samples", "1000000")  # the backbone stays as loaded for the whole run

    raw, polyak = ckpt["current_model_state"], ckpt["state_dict"]
    timm_state = torch.load(timm_file, weights_only=True)
    backbone = {timm_to_ours(k): v for k, v in timm_state.items() if not k.startswith("fc.")}
    assert len(backbone) == len([k for k in raw if not k.startswith("network.head.")]) > 250
    for key, value in backbone.items():
        assert torch.equal(raw[f"network.{key}"], value), key
    assert raw["network.head.fc.weight"].shape == (3, 2048)
    assert not torch.equal(raw["network.head.fc.weight"], polyak["network.head.fc.weight"])  # the head trained
    assert "freshly initialised (shapes differ or absent): head.fc.bias, head.fc.weight" in caplog.text


def test_our_checkpoint_starts_a_fit_on_ten_classes_from_its_polyak_weights(tmp_path, timm_file):
    source = tmp_path / "three"
    shards(source, "train", classes=3, per_class=4, shard_size=4)
    shards(source, "val", classes=3, per_class=1, shard_size=4)
    first = fit(tmp_path / "run1", source, "--model.pretrained", str(timm_file), "--freeze_backbone.samples", "0")
    # Polyak and raw weights differ after training; mark the Polyak copy so loading the raw one would show
    first["state_dict"]["network.entry_flow.0.conv.weight"] += 0.5
    torch.save(first, tmp_path / "source.ckpt")

    ten = make_demo_data(str(tmp_path / "demo"), num_classes=10, train_images_per_class=2, val_images_per_class=1,
                         source_size=71)
    second = fit(tmp_path / "run2", ten, "--model.pretrained", str(tmp_path / "source.ckpt"),
                 "--freeze_backbone.samples", "8", "--trainer.max_steps", "2")
    raw = second["current_model_state"]
    assert raw["network.head.fc.weight"].shape == (10, 2048) and second["hyper_parameters"]["num_classes"] == 10
    loaded = {k: v for k, v in first["state_dict"].items() if k.startswith("network.") and ".head." not in k}
    for key, value in loaded.items():
        assert torch.equal(raw[key], value), key


def test_weights_files_in_every_format_read_the_same(tmp_path, timm_file):
    state = torch.load(timm_file, weights_only=True)
    torch.save(state, tmp_path / "pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    reference = network_state(timm_file)
    for path in (tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors"):
        assert reference.keys() == network_state(path).keys()
        assert all(torch.equal(v, network_state(path)[k]) for k, v in reference.items())


def test_backbone_lr_scale_lowers_only_the_backbone_lr():
    module = XceptionModule(num_classes=4, backbone_lr_scale=0.1)
    optimizer = torch.optim.SGD(param_groups(module.network, 1e-5, 0.1), lr=0.2)
    scale_lrs(optimizer)
    head = {id(p) for p in module.network.head.parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1 and group["lr"] == pytest.approx(0.2 if in_head == {True} else 0.02)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.network.parameters()))
    for scale in (1.0, 0.1):  # every parameter in exactly one group, decayed only when it is a matrix
        groups = param_groups(module.network, 0.0, scale)
        assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in module.network.parameters())
        assert all(all(p.ndim > 1 for p in g["params"]) or all(p.ndim <= 1 for p in g["params"]) for g in groups)


@pytest.mark.parametrize("content, message", [
    ({"conv.weight": torch.zeros(3)}, r"does not fit this network \(\d+ missing: entry_flow.*1 unexpected: conv.weight"),
    (b"<html>not found</html>", "not a readable torch file"),
])
def test_wrong_weights_file_stops_the_fit_in_one_line(tmp_path, content, message):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(content) if isinstance(content, bytes) else torch.save(content, weights)
    shards(tmp_path, "train", classes=3, per_class=2, shard_size=4)
    with pytest.raises(SystemExit, match=message) as error:
        main(["fit", "--config", CONFIG, "--trainer.accelerator", "cpu", "--trainer.default_root_dir",
              str(tmp_path / "run"), "--data.init_args.train", str(tmp_path / "train"), "--data.init_args.val", "null",
              "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
              "--model.pretrained", str(weights)])
    assert "\n" not in str(error.value.code)


def test_a_multilabel_checkpoint_given_as_ckpt_path_names_pretrained():
    module = XceptionModule(num_classes=10)
    with pytest.raises(ValueError, match="multilabel=True .* pass it as --model.pretrained instead of --ckpt_path"):
        module.on_load_checkpoint({"hyper_parameters": {"num_classes": 10, "multilabel": True}})


def test_backbone_is_frozen_for_its_samples_then_trains(tmp_path):
    from tests.helpers import tiny_data, tiny_module, tiny_trainer

    data = tiny_data(batch_size=4)
    module = tiny_module(data)
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append({k: v.clone() for k, v in pl_module.network.state_dict().items()})

    start = {k: v.clone() for k, v in module.network.state_dict().items()}
    frozen = FreezeBackbone(samples=8)  # two steps of 4 samples frozen, then free
    tiny_trainer(tmp_path, max_steps=3, callbacks=[Snapshot()], parts={"freeze_backbone": frozen},
                 limit_val_batches=0).fit(module, data)
    backbone = [k for k in start if not k.startswith("head.")]
    for frozen in snapshots[:2]:  # weights and BatchNorm statistics untouched; the head learns
        assert all(torch.equal(frozen[k], start[k]) for k in backbone)
        assert not torch.equal(frozen["head.fc.weight"], start["head.fc.weight"])
    assert not torch.equal(snapshots[2]["entry_flow.0.conv.weight"], start["entry_flow.0.conv.weight"])
    assert not torch.equal(snapshots[2]["entry_flow.0.bn.running_mean"], start["entry_flow.0.bn.running_mean"])


class AverageAtStart(L.Callback):
    """The Polyak copy and the module's weights when training starts (after the sanity check)."""

    def on_train_start(self, trainer, pl_module):
        [ema] = [c for c in trainer.callbacks if type(c).__name__ == "PolyakAveraging"]
        self.average = {k: v.clone() for k, v in ema._average_model.module.network.state_dict().items()}
        self.network = {k: v.clone() for k, v in pl_module.network.state_dict().items()}


def test_the_polyak_copy_starts_from_the_pretrained_weights(tmp_path, timm_file):
    data = tiny_data(num_classes=3)
    probe = AverageAtStart()
    trainer = tiny_trainer(tmp_path, max_steps=1, num_sanity_val_steps=1, callbacks=[probe])
    trainer.fit(tiny_module(data, pretrained=str(timm_file)), data)
    timm_state = torch.load(timm_file, weights_only=True)
    backbone = {timm_to_ours(k): v for k, v in timm_state.items() if not k.startswith("fc.")}
    for key, value in backbone.items():
        assert torch.equal(probe.network[key], value), key  # loaded
        assert torch.equal(probe.average[key], value), key  # and averaged from there (the sanity check scored it)
    assert torch.equal(probe.average["head.fc.weight"], probe.network["head.fc.weight"])  # the new head too
