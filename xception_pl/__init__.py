"""xception_pl: train Xception (Chollet, CVPR 2017) with PyTorch Lightning."""

from xception_pl.model import Xception

__all__ = ["Xception"]
