"""The Xception network (Chollet, CVPR 2017, arXiv:1610.02357), Figure 5.

Shapes in comments are for a 299x299 input (sec. 4.3); the smallest input is 71.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import DropPath


@dataclass(frozen=True)
class ModuleSpec:
    """One residual module of Figure 5: (ReLU, SeparableConv, BN) x len(widths), then a shortcut is added.

    Columns: in_channels; widths = out channels of each separable conv; stride 2 ends the
    module with MaxPool 3x3 s2 and gives it a 1x1 stride-2 conv + BN shortcut (identity
    otherwise); relu_first = ReLU before the first separable conv (not in the first module).
    """

    in_channels: int
    widths: tuple[int, ...]
    stride: int
    relu_first: bool = True


# Figure 5, as a table. Sec. 3: 36 conv layers (2 stem + 32 separable; the 1x1 shortcuts are
# not counted) in 14 modules (the stem, 12 residual modules, the exit convs).
MIN_INPUT = 71  # Keras Applications' minimum input side for Xception (sec. 4.3 trains at 299)
STEM = ((32, 2), (64, 1))  # (out_channels, stride) of the two 3x3 "valid" convs -> 147x147x64
ENTRY_FLOW = (
    ModuleSpec(64, (128, 128), stride=2, relu_first=False),  # -> 74x74x128
    ModuleSpec(128, (256, 256), stride=2),  # -> 37x37x256
    ModuleSpec(256, (728, 728), stride=2),  # -> 19x19x728
)
MIDDLE_FLOW = (ModuleSpec(728, (728, 728, 728), stride=1),) * 8  # "repeated 8 times" -> 19x19x728
EXIT_FLOW = (ModuleSpec(728, (728, 1024), stride=2),)  # -> 10x10x1024
EXIT_CONVS = (1536, 2048)  # SeparableConv -> BN -> ReLU, after the last residual module -> 10x10x2048

# Sec. 4.7 / Figure 10: what may sit between the depthwise and the pointwise convolution.
INTERMEDIATE_ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "elu": nn.ELU}
IntermediateActivation = Literal["none", "relu", "elu"]


class MaxPool2dSame(nn.MaxPool2d):
    """Max-pool with TensorFlow's "same" padding, without copying the input into a padded one (ours).

    TF pads p = (ceil(L / s) - 1) * s + k - L pixels in all, the odd one at the bottom/right. A max ignores
    padding, so p // 2 on every side is the pool's own padding, and the odd pixel is ceil_mode's partial last
    window. Equal, forward and backward, to timm's MaxPool2dSame (pad with -inf, then pool) at every size;
    that one writes a padded copy of the activation at each of the four pools, twice with its backward."""

    def forward(self, x: Tensor) -> Tensor:
        (height, width), k, s = x.shape[-2:], self.kernel_size, self.stride
        pads = [max((math.ceil(size / s) - 1) * s + k - size, 0) for size in (height, width)]
        if pads[0] % 2 != pads[1] % 2:  # odd on one axis only: ceil_mode cannot tell the two apart
            x = F.pad(x, (0, pads[1] % 2, 0, pads[0] % 2), value=-math.inf)
            pads = [pad - pad % 2 for pad in pads]
        return F.max_pool2d(x, k, s, padding=(pads[0] // 2, pads[1] // 2), ceil_mode=pads[0] % 2 == 1)


# Max-pool 3x3 s2 (Figure 5). "same" is TensorFlow's padding (the paper trained in Keras: 74 -> 37
# pads only bottom/right); "symmetric" pads 1 everywhere as timm's port does.
POOLS = {"same": partial(MaxPool2dSame, 3, 2), "symmetric": partial(nn.MaxPool2d, 3, 2, 1)}
PoolPadding = Literal["same", "symmetric"]


class FullPrecisionLinear(nn.Linear):
    """nn.Linear that computes in fp32 under autocast (same parameters and state_dict keys).

    The classifier's logits are ranked by the metrics: bf16 keeps 8 significant bits, so ranking 14,000
    images per class (MAP@100, sec. 4.4) meets many exact ties (~1 % lower MAP@100, the size of Table 2's
    differences). The layer costs well under 1 % of the network's FLOPs in fp32 (ours).
    """

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class SeparableConv2d(nn.Module):
    """A 3x3 spatial conv over channel segments, then a 1x1 pointwise conv; no bias (sec. 3).

    `segments=None` gives one segment per channel: the depthwise separable convolution of
    Xception. `segments=1` is a regular 3x3 convolution; values between are the intermediate
    Inception-style modules of sec. 3 / Figure 4.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        segments: int | None = None,
        activation: IntermediateActivation = "none",
    ) -> None:
        super().__init__()
        groups = in_channels if segments is None else segments
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=groups, bias=False)
        self.activation = INTERMEDIATE_ACTIVATIONS[activation]()  # Identity in Xception (sec. 4.7)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.activation(self.depthwise(x)))


class ResidualModule(nn.Module):
    """One row of ENTRY_FLOW / MIDDLE_FLOW / EXIT_FLOW. No ReLU after the residual sum (Figure 5).

    `residual=False` drops the shortcut (identity or 1x1 conv + BN): the non-residual network of
    sec. 4.6 / Figure 9, with the same separable convs, BN and pooling.
    """

    def __init__(self, spec: ModuleSpec, norm: partial, pool: PoolPadding, residual: bool = True,
                 drop_path: float = 0.0, **separable) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = spec.in_channels
        for i, width in enumerate(spec.widths):
            if i > 0 or spec.relu_first:
                # The first ReLU must not be in-place: the shortcut still reads the input.
                layers.append(nn.ReLU(inplace=i > 0))
            layers += [SeparableConv2d(in_channels, width, **separable), norm(width)]
            in_channels = width
        if spec.stride == 2:
            layers.append(POOLS[pool]())
        self.layers = nn.Sequential(*layers)
        if not residual:
            self.shortcut: nn.Module | None = None
        elif spec.stride == 1 and spec.in_channels == in_channels:
            self.shortcut = nn.Identity()
        else:
            conv = nn.Conv2d(spec.in_channels, in_channels, 1, stride=spec.stride, bias=False)
            self.shortcut = nn.Sequential(OrderedDict(conv=conv, bn=norm(in_channels)))
        # Stochastic depth: in training, the residual branch of a whole sample is dropped with this probability
        # (and the kept ones scaled by 1 / (1 - p)); no parameters, so the state dict is unchanged.
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.shortcut is None:
            return self.layers(x)
        return self.drop_path(self.layers(x)) + self.shortcut(x)


def conv_bn_relu(conv: nn.Module, norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=conv, bn=norm, relu=nn.ReLU(inplace=True)))


class Xception(nn.Module):
    """Xception, Figure 5: entry flow -> middle flow (x8) -> exit flow -> classifier.

    Args:
        num_classes: classifier outputs (1000 for ImageNet, 17,000 for JFT; sec. 4.1).
        in_channels: input image channels.
        drop_rate: dropout before the classifier; 0.5 on ImageNet, none on JFT (sec. 4.3).
        fc_layers: widths of optional fully connected layers (each + ReLU) before the
            classifier; (4096, 4096) is the JFT "with FC layers" variant (sec. 4.3, Table 2).
        bn_eps: BatchNorm epsilon; Keras' 1e-3 (ours: the paper's implementation is Keras).
        bn_momentum: BatchNorm running-stat momentum in PyTorch's convention (Keras' 0.99 = 0.01).
        intermediate_activation: "none" (Xception), "relu" or "elu" between the depthwise and
            pointwise convolutions (the ablation of sec. 4.7, Figure 10).
        spatial_segments: channel segments of each separable conv's 3x3 spatial conv; None =
            one per channel (Xception); 1 = regular conv (sec. 3, Figure 4). Must divide 8,
            the largest number dividing every separable conv's input width.
        residual: shortcut connections around each of the 12 residual modules (Figure 5); False
            drops them (identity and 1x1 conv + BN alike) for the ablation of sec. 4.6, Figure 9.
        pool_padding: "same" is the TensorFlow/Keras padding the paper's network was trained
            with; "symmetric" pads 1 on every side, as timm's port of the Keras weights does.
        drop_path_rate: stochastic depth over the 8 middle-flow modules (ours, not in the paper; Huang et al.,
            ECCV 2016): module i of 8 drops its residual branch per sample with probability drop_path_rate * i / 8
            (their linear rule), timm's DropPath. 0 (the paper) = off.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        fc_layers: tuple[int, ...] = (),
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        intermediate_activation: IntermediateActivation = "none",
        spatial_segments: int | None = None,
        residual: bool = True,
        pool_padding: PoolPadding = "same",
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if intermediate_activation not in INTERMEDIATE_ACTIVATIONS:
            raise ValueError(
                f"intermediate_activation={intermediate_activation!r}: choose one of {sorted(INTERMEDIATE_ACTIVATIONS)}"
            )
        widths = [s.in_channels for s in ENTRY_FLOW + MIDDLE_FLOW + EXIT_FLOW] + [EXIT_FLOW[-1].widths[-1], EXIT_CONVS[0]]
        if spatial_segments is not None and any(w % spatial_segments for w in widths):
            raise ValueError(f"spatial_segments={spatial_segments} must divide every separable conv's width "
                             f"{sorted(set(widths))}: use 1, 2, 4, 8 or None (depthwise)")
        for name, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name}={rate} must be in [0, 1)")
        self.num_classes = num_classes
        self.num_features = EXIT_CONVS[-1]
        norm = partial(nn.BatchNorm2d, eps=bn_eps, momentum=bn_momentum)
        separable = dict(segments=spatial_segments, activation=intermediate_activation)
        if pool_padding not in POOLS:
            raise ValueError(f"pool_padding={pool_padding!r}: choose one of {sorted(POOLS)}")
        module = partial(ResidualModule, norm=norm, pool=pool_padding, residual=residual, **separable)

        (stem1, stride1), (stem2, stride2) = STEM
        self.entry_flow = nn.Sequential(
            conv_bn_relu(nn.Conv2d(in_channels, stem1, 3, stride=stride1, bias=False), norm(stem1)),
            conv_bn_relu(nn.Conv2d(stem1, stem2, 3, stride=stride2, bias=False), norm(stem2)),
            *(module(spec) for spec in ENTRY_FLOW),
        )
        self.middle_flow = nn.Sequential(*(module(spec, drop_path=drop_path_rate * (i + 1) / len(MIDDLE_FLOW))
                                           for i, spec in enumerate(MIDDLE_FLOW)))
        exit_convs = []
        in_channels = EXIT_FLOW[-1].widths[-1]
        for width in EXIT_CONVS:
            exit_convs.append(conv_bn_relu(SeparableConv2d(in_channels, width, **separable), norm(width)))
            in_channels = width
        self.exit_flow = nn.Sequential(*(module(spec) for spec in EXIT_FLOW), *exit_convs)

        hidden: list[nn.Module] = []
        for width in fc_layers:
            hidden += [FullPrecisionLinear(in_channels, width), nn.ReLU(inplace=True)]
            in_channels = width
        self.head = nn.Sequential(OrderedDict(
            pool=nn.AdaptiveAvgPool2d(1),  # global average pooling (Figure 5)
            flatten=nn.Flatten(1),
            hidden=nn.Sequential(*hidden),
            dropout=nn.Dropout(drop_rate),
            fc=FullPrecisionLinear(in_channels, num_classes),  # logistic regression (Figure 5), in fp32
        ))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Our init (the paper gives none): He normal (fan_out) convs as timm, BN 1/0, PyTorch's Linear."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward_features(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < MIN_INPUT:
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than Xception's minimum {MIN_INPUT}x{MIN_INPUT}")
        x = self.entry_flow(x)  # 299x299x3 -> 19x19x728
        x = self.middle_flow(x)  # 19x19x728
        return self.exit_flow(x)  # -> 10x10x2048

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if pre_logits:
            return self.head[:-1](x)  # 2048 (or the last FC width), after dropout
        return self.head(x)  # num_classes logits

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @classmethod
    def from_timm(cls, state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike, **kwargs) -> "Xception":
        """Our network holding timm's `legacy_xception` weights (the Keras-trained ImageNet model).

        Defaults follow timm's port so outputs match it: BatchNorm eps 1e-5 and symmetric
        max-pool padding; pass `bn_eps`/`pool_padding` to override.
        """
        from xception_pl.timm_weights import load_timm_state_dict

        model = cls(**{"bn_eps": 1e-5, "pool_padding": "symmetric", **kwargs})
        load_timm_state_dict(model, state_dict_or_path)
        return model
