"""Every network we ship meets the Backbone contract (xception_pl/backbone.py): the module's forward, fp32 logits,
a head that fine-tuning can tell from the backbone; and a network that does not is told what it lacks."""

from functools import partial

import pytest
import torch
from torch import nn

from tests.crash import TinyNetwork
from xception_pl import Xception
from xception_pl.backbone import Backbone, TimmNetwork, check_backbone, head_prefix
from xception_pl.inception import InceptionV3
from xception_pl.pretrained import load_pretrained, param_groups

SHIPPED = {  # name: (network given num_classes, the input side it is checked at)
    "xception": (Xception, 71),
    "xception-fc-layers": (partial(Xception, fc_layers=(16, 16)), 71),  # the JFT variant of Table 2
    "inception-v3": (InceptionV3, 75),
    "timm-resnet10t": (partial(TimmNetwork, model_name="resnet10t"), 32),
    "timm-legacy-xception": (partial(TimmNetwork, model_name="legacy_xception"), 71),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_network_meets_the_backbone_contract(name, tmp_path):
    build, side = SHIPPED[name]
    torch.manual_seed(0)
    network = build(7).eval()
    check_backbone(network)
    assert isinstance(network, Backbone)
    images = torch.rand(2, 3, side, side) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = network(images)
        features = network.forward_features(images)
        pooled = network.forward_head(features, pre_logits=True)
    assert logits.shape == (2, 7) and logits.dtype == torch.float32  # the fp32 classifier
    assert pooled.shape == (2, list(network.head.modules())[-1].in_features)  # what the classifier reads
    assert features.shape[1] == network.num_features and network.num_classes == 7

    # Fine-tuning: weights of 7 classes start a 3-class network; only the head's tensors stay fresh
    torch.save({"state_dict": {f"network.{k}": v for k, v in network.state_dict().items()}}, tmp_path / "w.ckpt")
    other = build(3)
    head = head_prefix(other)
    fresh = load_pretrained(other, tmp_path / "w.ckpt")
    assert fresh and all(k.startswith(head) for k in fresh)
    assert {id(p) for p in other.head.parameters()} == {id(p) for n, p in other.named_parameters()
                                                        if n.startswith(head)}
    groups = param_groups(other, 1e-5, backbone_lr_scale=0.1)
    scaled = {id(p) for g in groups if g["lr_scale"] == 0.1 for p in g["params"]}
    assert scaled and not scaled & {id(p) for p in other.head.parameters()}


def test_a_network_without_the_contract_is_told_what_it_lacks():
    with pytest.raises(ValueError, match="TinyNetwork does not meet xception_pl.backbone.Backbone: it lacks "
                                         "num_classes, num_features, head, forward_features, forward_head"):
        check_backbone(TinyNetwork(3))
    with pytest.raises(ValueError, match="TinyNetwork has no `head` submodule: --model.pretrained, backbone_lr_scale"):
        param_groups(TinyNetwork(3), 1e-5, backbone_lr_scale=0.1)
    plain = Xception(3)
    plain.head.fc = nn.Linear(2048, 3)
    with pytest.raises(ValueError, match="lacks a FullPrecisionLinear as the head's last layer .it is Linear."):
        check_backbone(plain)


def test_inception_v3_reads_checkpoints_written_before_it_had_a_head():
    network = InceptionV3(5)
    before = {("fc." + k.removeprefix("head.fc.") if k.startswith("head.fc.") else k): v.clone() + 1
              for k, v in network.state_dict().items() if v.is_floating_point()}
    network.load_state_dict(before, strict=False)
    torch.testing.assert_close(network.head.fc.weight, before["fc.weight"])


def test_a_timm_network_loads_timms_own_weights_file_and_freezes_by_its_head(tmp_path):
    torch.manual_seed(0)
    source = TimmNetwork(10, model_name="resnet10t")
    torch.save(source.body.state_dict(), tmp_path / "resnet10t.pth")  # as timm's hub files hold them
    network = TimmNetwork(4, model_name="resnet10t", pretrained_file=str(tmp_path / "resnet10t.pth"))
    torch.testing.assert_close(network.body.conv1[0].weight, source.body.conv1[0].weight)
    assert network.head.out_features == 4 and head_prefix(network) == "body.fc."


def test_an_unknown_timm_name_says_where_the_names_are():
    with pytest.raises(ValueError, match="model_name='xceptionn'.*timm.list_models"):
        TimmNetwork(3, model_name="xceptionn")
