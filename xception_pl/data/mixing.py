"""Mixup and CutMix: a training batch mixed with itself on the device, with soft targets (ours; the paper has neither).

The data module runs them in `on_after_batch_transfer`, on the device and after the [-1, 1] scaling, so the same
code serves decode_device cpu and cuda. One part of the list per batch, drawn uniformly (torchvision's
references/classification: RandomChoice([MixUp, CutMix])). Image i is mixed with image B-1-i (the batch reversed,
timm's pairing) at one ratio lam ~ Beta(alpha, alpha) per batch; every draw is on the host, so nothing waits for
the device. Configured as a list:

    data:
      init_args:
        mixing:
          - class_path: xception_pl.data.mixing.Mixup
            init_args: {alpha: 0.2}
          - class_path: xception_pl.data.mixing.CutMix
            init_args: {alpha: 1.0}

Targets mix with the images: one-hot class vectors (single-label), or the multi-hot label vectors (multi-label, so
a class both images have keeps weight 1). The batch keeps its hard "target" for the metrics; the loss reads
"soft_target" (module.py). Ours rather than torchvision's v2.MixUp/CutMix or timm's Mixup: those take class ids
only, and JFT-style targets are multi-hot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class BatchMix:
    """Mixes images and their target vectors with the batch reversed, with probability p."""

    def __init__(self, alpha: float, p: float = 1.0) -> None:
        if alpha <= 0 or not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(self).__name__}(alpha={alpha}, p={p}): alpha must be > 0 and p in [0, 1]")
        self.alpha, self.p = alpha, p

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """images float [B, 3, H, W], targets float [B, C] -> the mixed pair."""
        if float(torch.rand(())) >= self.p:
            return images, targets
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        images, lam = self.mix(images, lam)
        return images, lam * targets + (1.0 - lam) * targets.flip(0)

    def mix(self, images: Tensor, lam: float) -> tuple[Tensor, float]:
        """The mixed images and the weight of each image's own target in them."""
        raise NotImplementedError


class Mixup(BatchMix):
    """Mixup (Zhang et al., ICLR 2018): lam x image + (1 - lam) x its partner; torchvision's recipe uses alpha 0.2,
    timm's 0.8."""

    def __init__(self, alpha: float = 0.2, p: float = 1.0) -> None:
        super().__init__(alpha, p)

    def mix(self, images: Tensor, lam: float) -> tuple[Tensor, float]:
        return images.mul(lam).add_(images.flip(0), alpha=1.0 - lam), lam


class CutMix(BatchMix):
    """CutMix (Yun et al., ICCV 2019): a box of area (1 - lam) of the image, at a uniform centre and clipped to the
    image, is pasted from its partner; lam is then the area the image keeps (the paper's and timm's correction)."""

    def __init__(self, alpha: float = 1.0, p: float = 1.0) -> None:
        super().__init__(alpha, p)

    def mix(self, images: Tensor, lam: float) -> tuple[Tensor, float]:
        height, width = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        y0, y1 = max(cy - round(height * cut / 2), 0), min(cy + round(height * cut / 2), height)
        x0, x1 = max(cx - round(width * cut / 2), 0), min(cx + round(width * cut / 2), width)
        mixed = images.clone()
        mixed[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
        return mixed, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def target_vectors(target: Tensor, num_classes: int, multilabel: bool) -> Tensor:
    """float [B, C]: one-hot class ids, or the multi-hot vectors as they are."""
    return target.float() if multilabel else F.one_hot(target, num_classes).float()
