"""Unit tests of the network: Figure 5's shapes and parameter count, the paper's switches, timm weights."""

import pytest
import timm
import torch
from torch import nn

from xception_pl import Xception
from xception_pl.model import MaxPool2dSame, ResidualModule, SeparableConv2d

PAPER_PARAMETERS = 22_855_952  # Table 3


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def xception() -> Xception:
    torch.manual_seed(0)
    return Xception()


def test_parameter_count_matches_table_3(xception):
    assert count(xception) == PAPER_PARAMETERS


def test_jft_fc_variant_adds_two_4096_layers():
    model = Xception(num_classes=17_000, fc_layers=(4096, 4096))
    backbone = PAPER_PARAMETERS - (2048 * 1000 + 1000)
    head = (2048 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 17_000 + 17_000)
    assert count(model) == backbone + head


def test_stage_shapes_at_299(xception):
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        stem = xception.entry_flow[:2](x)
        entry = xception.entry_flow(x)
        middle = xception.middle_flow(entry)
        features = xception.exit_flow(middle)
        logits = xception.forward_head(features)
    assert stem.shape == (1, 64, 147, 147)
    assert entry.shape == middle.shape == (1, 728, 19, 19)
    assert features.shape == (1, 2048, 10, 10)
    assert logits.shape == (1, 1000)
    assert xception.forward_head(features, pre_logits=True).shape == (1, 2048)


def test_smallest_input_is_71(xception):
    with torch.no_grad():
        assert xception(torch.randn(1, 3, 71, 71)).shape == (1, 1000)
        with pytest.raises(ValueError, match="smaller than Xception's minimum 71x71"):
            xception(torch.randn(1, 3, 70, 70))


def test_every_parameter_receives_a_gradient():
    model = Xception(num_classes=10, fc_layers=(32,), drop_rate=0.5)
    model(torch.randn(2, 3, 71, 71)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_no_conv_has_a_bias_and_separable_convs_have_nothing_between(xception):
    convs = [m for m in xception.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.bias is None for m in convs)
    separable = [m for m in xception.modules() if isinstance(m, SeparableConv2d)]
    assert len(separable) == 34  # sec. 3: 36 conv layers = 2 stem + 34 separable
    assert all(isinstance(m.activation, nn.Identity) and m.depthwise.groups == m.depthwise.in_channels
               for m in separable)


def test_no_relu_after_a_residual_sum(xception):
    """A negative output of a module survives: the sum is not rectified."""
    module = xception.middle_flow[0].eval()
    with torch.no_grad():
        y = module(torch.randn(1, 728, 19, 19))
    assert (y < 0).any()


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = Xception(num_classes=10, drop_rate=0.5)
    x = torch.randn(2, 3, 71, 71)
    model.train()
    features = model.forward_features(x).detach()
    assert not torch.equal(model.forward_head(features), model.forward_head(features))
    model.eval()
    assert torch.equal(model.forward_head(features), model.forward_head(features))


def test_channels_last_gives_the_same_output(xception):
    x = torch.randn(2, 3, 99, 99)
    model = Xception(num_classes=10).eval()
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "elu"])
def test_intermediate_activation_changes_output_not_parameters(activation):
    torch.manual_seed(0)
    plain = Xception(num_classes=10).eval()
    other = Xception(num_classes=10, intermediate_activation=activation).eval()
    other.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 71, 71)
    with torch.no_grad():
        assert not torch.allclose(plain(x), other(x))
    assert count(other) == count(plain)
    assert all(isinstance(m.activation, (nn.ReLU, nn.ELU)) for m in other.modules() if isinstance(m, SeparableConv2d))


@pytest.mark.parametrize("segments", [1, 2, 8])
def test_spatial_segments_set_the_spatial_conv_parameters(segments):
    model = Xception(spatial_segments=segments)
    separable = [m for m in model.modules() if isinstance(m, SeparableConv2d)]
    depthwise = sum(9 * m.depthwise.in_channels for m in separable)
    segmented = sum(9 * m.depthwise.in_channels * m.depthwise.in_channels // segments for m in separable)
    assert count(model) == PAPER_PARAMETERS - depthwise + segmented
    assert all(m.depthwise.groups == segments for m in separable)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 71, 71)).shape == (1, 1000)


def test_spatial_segments_that_do_not_divide_the_widths_are_rejected():
    with pytest.raises(ValueError, match="spatial_segments=3 must divide"):
        Xception(spatial_segments=3)


def randomized_timm_xception() -> nn.Module:
    """timm's network with random weights and BN statistics calibrated on random images, so that
    its output depends on the input and any eps or padding difference shows."""
    torch.manual_seed(0)
    model = timm.create_model("legacy_xception", pretrained=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0  # running stats := this batch's stats
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 299, 299))
    return model.eval()


@pytest.mark.parametrize("width_offset", [0, 1])  # square, and one axis even where the other is odd
def test_same_max_pool_equals_padding_with_minus_infinity_then_pooling(width_offset):
    """TensorFlow's "same" max-pool (sec. 4.3's Keras network) as timm computes it, with a padded copy of the
    input: our pool without the copy gives the same output and gradient at every size from 1 to 40."""
    from timm.layers.pool2d_same import MaxPool2dSame as PadThenPool

    for size in range(1, 41):
        x = torch.randn(2, 3, size, size + width_offset, dtype=torch.double, requires_grad=True)
        ours, reference = MaxPool2dSame(3, 2)(x), PadThenPool(3, 2)(x)
        grad = torch.randn_like(reference)
        assert ours.shape == reference.shape and torch.equal(ours, reference), size
        assert torch.equal(*(torch.autograd.grad(y, x, grad)[0] for y in (ours, reference))), size


def test_same_max_pool_copies_no_padded_input_at_299(xception):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Ops() as ops:
        xception.eval()(torch.randn(1, 3, 299, 299))
    assert sum(name.startswith("max_pool2d") for name in ops.names) == 4  # Figure 5's four stride-2 modules
    assert not [name for name in ops.names if "pad" in name]


def test_from_timm_matches_legacy_xception(tmp_path):
    reference = randomized_timm_xception()
    x = torch.randn(2, 3, 299, 299)
    path = tmp_path / "legacy_xception.pth"
    torch.save(reference.state_dict(), path)
    ours = Xception.from_timm(path).eval()
    with torch.no_grad():
        expected, got = reference.forward_features(x), ours.forward_features(x)
        # The paper's own padding and BN eps are not timm's: the outputs then differ.
        paper = Xception.from_timm(reference.state_dict(), bn_eps=1e-3, pool_padding="same").eval()
        paper_features = paper.forward_features(x)
        logits = ours.forward_head(got)
    assert not torch.allclose(expected[0], expected[1], rtol=0.1)  # the input matters
    assert (got - expected).abs().max() / expected.abs().max() < 1e-4
    assert (logits - reference.forward_head(expected)).abs().max() / logits.abs().max() < 1e-4
    assert (paper_features - expected).abs().max() / expected.abs().max() > 1e-2


def test_from_timm_reads_safetensors(tmp_path):
    from safetensors.torch import save_file

    reference = randomized_timm_xception()
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    ours = Xception.from_timm(tmp_path / "w.safetensors")
    torch.testing.assert_close(ours.head.fc.weight, reference.fc.weight)


def test_from_timm_rejects_bad_state_dicts():
    state = randomized_timm_xception().state_dict()
    del state["block4.rep.1.pointwise.weight"]
    state["block4.extra.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(10, 2048)
    with pytest.raises(ValueError) as error:
        Xception.from_timm(state)
    message = str(error.value)
    assert "missing (1): middle_flow.0.layers.1.pointwise.weight" in message
    assert "unexpected (1): block4.extra.weight" in message
    assert "mis-shaped (1): head.fc.weight: got (10, 2048), expected (1000, 2048)" in message
    with pytest.raises(FileNotFoundError, match="weights file .* does not exist"):
        Xception.from_timm("/nonexistent/legacy_xception.pth")


# The four 1x1 stride-2 conv + BN shortcuts of Figure 5 (in -> out channels): entry flow 64->128,
# 128->256, 256->728; exit flow 728->1024. The 8 middle-flow shortcuts are identities (no parameters).
PROJECTION_SHORTCUTS = ((64, 128), (128, 256), (256, 728), (728, 1024))


def test_without_residual_connections_only_the_shortcut_parameters_go():
    shortcut_parameters = sum(i * o + 2 * o for i, o in PROJECTION_SHORTCUTS)  # conv weight + BN weight and bias
    assert shortcut_parameters == 972_800 + 2 * 2_136 == 977_072
    model = Xception(residual=False)
    assert count(model) == PAPER_PARAMETERS - shortcut_parameters
    # Same layer counts as Figure 5 (sec. 4.6): 2 stem convs + 34 separable convs, 12 modules, no shortcut left.
    assert len([m for m in model.modules() if isinstance(m, SeparableConv2d)]) == 34
    modules = [m for m in model.modules() if isinstance(m, ResidualModule)]
    assert len(modules) == 12 and all(m.shortcut is None for m in modules)
    assert len([m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                and m.stride == (2, 2)]) == 0
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 71, 71)).shape == (1, 1000)


def test_without_residual_connections_a_module_outputs_its_layers_alone():
    torch.manual_seed(0)
    plain = Xception(num_classes=10, residual=False).eval()
    residual = Xception(num_classes=10).eval()
    residual.load_state_dict(plain.state_dict(), strict=False)  # all but the shortcuts
    x = torch.randn(1, 728, 19, 19)
    with torch.no_grad():
        alone = plain.middle_flow[0].layers(x)
        torch.testing.assert_close(plain.middle_flow[0](x), alone)
        torch.testing.assert_close(residual.middle_flow[0](x), alone + x)  # identity shortcut
    model = Xception(num_classes=10, residual=False, fc_layers=(32,))
    model(torch.randn(2, 3, 71, 71)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_ablation_switches_combine():
    model = Xception(residual=False, intermediate_activation="elu", spatial_segments=4)
    separable = [m for m in model.modules() if isinstance(m, SeparableConv2d)]
    depthwise = sum(9 * m.depthwise.in_channels for m in separable)
    segmented = sum(9 * m.depthwise.in_channels * m.depthwise.in_channels // 4 for m in separable)
    shortcuts = sum(i * o + 2 * o for i, o in PROJECTION_SHORTCUTS)
    assert count(model) == PAPER_PARAMETERS - shortcuts - depthwise + segmented
    assert all(isinstance(m.activation, nn.ELU) for m in separable)


def test_drop_path_drops_whole_residual_branches_of_the_middle_flow_in_training_only():
    torch.manual_seed(0)
    model = Xception(num_classes=10, drop_path_rate=0.4)
    assert count(model) == count(Xception(num_classes=10))  # no parameters, the same state dict keys
    assert model.state_dict().keys() == Xception(num_classes=10).state_dict().keys()
    rates = [m.drop_path.drop_prob if hasattr(m.drop_path, "drop_prob") else 0.0 for m in model.middle_flow]
    assert rates == pytest.approx([0.4 * i / 8 for i in range(1, 9)])  # Huang et al.'s linear rule
    assert all(isinstance(m.drop_path, nn.Identity) for m in [*model.entry_flow[2:], model.exit_flow[0]])
    last = model.middle_flow[7]  # p = 0.4
    x = torch.randn(64, 728, 5, 5)
    with torch.no_grad():
        last.eval()
        branch = last.layers(x)
        torch.testing.assert_close(last(x), branch + x)  # evaluation: all kept, unscaled
        last.train()
        out = last(x) - x  # per sample: the branch / (1 - p) or nothing (train-mode BN: recompute the branch)
        branch = last.layers(x)
    dropped = out.flatten(1).abs().amax(1) == 0
    torch.testing.assert_close(out[~dropped], branch[~dropped] / 0.6)
    assert 10 < int(dropped.sum()) < 45  # ~0.4 of 64
    with pytest.raises(ValueError, match="drop_path_rate"):
        Xception(drop_path_rate=1.0)


def test_compiled_with_static_shapes_each_input_size_is_one_graph_without_breaks():
    """What XceptionModule(compile=True) relies on under progressive resizing (module.py: dynamic=False)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(Xception(num_classes=4), backend="eager", dynamic=False)
    for size in (72, 80, 72):
        compiled(torch.randn(1, 3, size, size)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
