"""Inception V3 without its auxiliary tower: the paper's baseline in Tables 1-3 (sec. 4.3)."""

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn
from torchvision.models import Inception3

from xception_pl.model import FullPrecisionLinear

# torchvision's feature layers, in the order its _forward runs them (299x299x3 -> 8x8x2048)
FEATURES = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
            "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
            "Mixed_7a", "Mixed_7b", "Mixed_7c")


class InceptionV3(Inception3):
    """torchvision's Inception V3 (Szegedy et al. 2016) as a Backbone (xception_pl.backbone): `num_classes` first,
    and its pooling, dropout and classifier as `head` (pool, flatten, dropout, fc), the classifier in fp32.

    The paper trains it with the identical recipe and leaves out the auxiliary tower (sec. 4.3).
    """

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.5) -> None:
        super().__init__(num_classes=num_classes, aux_logits=False, transform_input=False,
                         init_weights=True, dropout=drop_rate)
        fc = FullPrecisionLinear(self.fc.in_features, num_classes)  # fp32 logits under autocast, as Xception's
        fc.load_state_dict(self.fc.state_dict())  # keeps torchvision's init
        self.head = nn.Sequential(OrderedDict(pool=self.avgpool, flatten=nn.Flatten(1), dropout=self.dropout, fc=fc))
        del self.avgpool, self.dropout, self.fc
        self.num_classes, self.num_features = num_classes, fc.in_features
        self._register_load_state_dict_pre_hook(head_keys_of_before)

    def forward_features(self, x: Tensor) -> Tensor:
        for name in FEATURES:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head[:-1](x) if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def head_keys_of_before(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints written before the head existed name the classifier fc.*: read them as head.fc.*."""
    for key in [k for k in state_dict if k.startswith(prefix + "fc.")]:
        state_dict[prefix + "head." + key[len(prefix):]] = state_dict.pop(key)
