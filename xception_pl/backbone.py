"""What a network must be for this framework (`Backbone`), checked by `check_backbone`; and `TimmNetwork`, which
makes any timm classifier one (`--model.network.class_path xception_pl.backbone.TimmNetwork`).

Who needs what:
    the module      network(num_classes) -> module; forward: [B, 3, H, W] in [-1, 1] -> [B, num_classes] logits
    export          the same forward, traceable; rebuilt from its class_path and init_args (export.py)
    fine-tuning     `head`: the submodule holding the classifier (and any FC layers before it): the tensors
                    --model.pretrained may leave fresh, --freeze_backbone.samples trains first and
                    backbone_lr_scale leaves at the full lr; everything else is the backbone (pretrained.py)
    fp32 logits     the head's last layer is a FullPrecisionLinear: logits in fp32 under autocast (model.py)
    features        forward_features -> forward_head(features, pre_logits) (timm's convention)

Xception (model.py) and InceptionV3 (inception.py) are written to it; tests/unit/test_backbone.py checks every
network we ship.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from xception_pl.model import FullPrecisionLinear


@runtime_checkable
class Backbone(Protocol):
    num_classes: int  # classifier outputs
    num_features: int  # channels of forward_features, pooled into the head
    head: nn.Module  # the classifier and any layers that belong with it; a submodule of the network

    def forward(self, x: Tensor) -> Tensor: ...

    def forward_features(self, x: Tensor) -> Tensor: ...

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor: ...


def head_prefix(network: nn.Module) -> str:
    """The state_dict prefix of the network's head: "head." for ours, "body.fc." for a timm ResNet."""
    found = next((name for name, module in network.named_modules() if module is getattr(network, "head", None)), None)
    if not found:
        raise ValueError(f"{type(network).__name__} has no `head` submodule: --model.pretrained, backbone_lr_scale "
                         "and --freeze_backbone.samples need the split of backbone and head that xception_pl.backbone."
                         "Backbone describes (Xception, InceptionV3 and TimmNetwork have it)")
    return found + "."


def check_backbone(network: nn.Module) -> None:
    """Raises a ValueError that names every part of the Backbone contract the network lacks."""
    lacks = [name for name in ("num_classes", "num_features", "head", "forward_features", "forward_head")
             if not hasattr(network, name)]
    if not lacks:
        head_prefix(network)
        classifier = list(network.head.modules())[-1]
        if not isinstance(classifier, FullPrecisionLinear):
            lacks.append(f"a FullPrecisionLinear as the head's last layer (it is {type(classifier).__name__})")
    if lacks:
        raise ValueError(f"{type(network).__name__} does not meet xception_pl.backbone.Backbone: it lacks "
                         + ", ".join(lacks))


class TimmNetwork(nn.Module):
    """A timm classifier as a Backbone: `timm.create_model(model_name, num_classes=..., **kwargs)` in `body`, its
    classifier (timm's `get_classifier()`) as `head`, computing in fp32. timm's own pretrained weights are not
    downloaded here (no network access assumed): give a file with --model.pretrained, or pretrained_file.

        network:
          class_path: xception_pl.backbone.TimmNetwork
          init_args: {model_name: xception41p, drop_rate: 0.5, drop_path_rate: 0.1}
    """

    def __init__(self, num_classes: int = 1000, model_name: str = "legacy_xception", drop_rate: float = 0.0,
                 drop_path_rate: float | None = None, pretrained_file: str | None = None, **kwargs: Any) -> None:
        import timm

        super().__init__()
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        if pretrained_file is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": pretrained_file}
        try:
            self.body = timm.create_model(model_name, pretrained=pretrained_file is not None, num_classes=num_classes,
                                          drop_rate=drop_rate, **kwargs)
        except RuntimeError as error:  # timm's "Unknown model (...)"
            raise ValueError(f"model.network.init_args.model_name={model_name!r}: {error}; timm.list_models() "
                             "lists the names") from None
        classifier = self.body.get_classifier()
        if type(classifier) is not nn.Linear:
            raise ValueError(f"timm's {model_name} ends in a {type(classifier).__name__}, not a Linear classifier: "
                             "TimmNetwork needs a Linear head")
        classifier.__class__ = FullPrecisionLinear  # the same parameters, computed in fp32 under autocast
        self.num_classes, self.num_features = num_classes, self.body.num_features

    @property
    def head(self) -> nn.Module:  # not a second registration: its tensors keep timm's names, under body.
        return self.body.get_classifier()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body.forward_features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.body.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)
