"""Inception V3 without its auxiliary tower: the paper's baseline in Tables 1-3 (sec. 4.3)."""

from torchvision.models import Inception3

from xception_pl.model import FullPrecisionLinear


class InceptionV3(Inception3):
    """torchvision's Inception V3 (Szegedy et al. 2016) with our constructor: `num_classes` first, as Xception.

    The paper trains it with the identical recipe and leaves out the auxiliary tower (sec. 4.3).
    """

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.5) -> None:
        super().__init__(num_classes=num_classes, aux_logits=False, transform_input=False,
                         init_weights=True, dropout=drop_rate)
        fc = FullPrecisionLinear(self.fc.in_features, num_classes)  # fp32 logits under autocast, as Xception's
        fc.load_state_dict(self.fc.state_dict())  # keeps torchvision's init
        self.fc = fc
