"""xception_pl: train Xception (Chollet, CVPR 2017) with PyTorch Lightning.

    trainer = L.Trainer(max_epochs=2, **trainer_parts("runs/mine"))   # what the CLI's runs get (wiring.py)
    trainer.fit(XceptionModule(num_classes=data.num_classes, ...), data)
"""

from xception_pl.model import Xception

__all__ = ["Xception", "XceptionModule", "trainer_parts"]


def __getattr__(name: str):  # the module and the run's parts import Lightning: only when asked for
    if name == "XceptionModule":
        from xception_pl.module import XceptionModule

        return XceptionModule
    if name == "trainer_parts":
        from xception_pl.wiring import trainer_parts

        return trainer_parts
    raise AttributeError(f"module 'xception_pl' has no attribute {name!r}")
