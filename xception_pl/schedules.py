"""Learning-rate schedules counted in training SAMPLES, not steps (sec. 4.2).

The paper decays the lr "by a rate of 0.94 every 2 epochs" (ImageNet) and "by a rate of
0.9 every 3,000,000 samples" (JFT). Counting samples keeps the schedule identical for
any number of devices, nodes or accumulation steps, and across a resume on a different
world size: the number of samples seen is saved, and each step adds the global batch.
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class SampleStepDecay(LRScheduler):
    """lr = lr0 * warmup * decay_rate ** floor(samples_seen / decay_every) (staircase, ours).

    Args:
        optimizer: the wrapped optimizer.
        decay_rate: multiplier per interval; 0.94 ImageNet, 0.9 JFT (sec. 4.2).
        decay_every_samples: interval in samples; 3,000,000 on JFT (sec. 4.2).
        decay_every_epochs: interval in epochs of the training set; 2 on ImageNet (sec. 4.2).
            Needs the training set size, which the module takes from the data.
        warmup_samples: linear warmup from 0 over this many samples (ours; 0 = off, as the paper).
    """

    # Set by the module from the running trainer; not part of the saved state.
    _RUN_FACTS = ("samples_per_step", "samples_per_epoch")

    def __init__(
        self,
        optimizer: Optimizer,
        decay_rate: float,
        decay_every_samples: int | None = None,
        decay_every_epochs: float | None = None,
        warmup_samples: int = 0,
    ) -> None:
        if (decay_every_samples is None) == (decay_every_epochs is None):
            raise ValueError("give exactly one of decay_every_samples and decay_every_epochs")
        if not 0.0 < decay_rate <= 1.0:
            raise ValueError(f"decay_rate={decay_rate} must be in (0, 1]")
        for name, value in (("decay_every_samples", decay_every_samples), ("decay_every_epochs", decay_every_epochs)):
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be positive")
        if warmup_samples < 0:
            raise ValueError(f"warmup_samples={warmup_samples} must be >= 0")
        self.decay_rate = decay_rate
        self.decay_every_samples = decay_every_samples
        self.decay_every_epochs = decay_every_epochs
        self.warmup_samples = warmup_samples
        self.samples_seen = 0
        self.samples_per_step = 0
        self.samples_per_epoch: int | None = None
        super().__init__(optimizer)

    def configure(self, samples_per_step: int, samples_per_epoch: int | None) -> None:
        """Facts of the running job: the global batch, and the training set size."""
        if self.decay_every_epochs is not None and not samples_per_epoch:
            raise ValueError("decay_every_epochs needs the training set size: give the data module a train set "
                             "(or train_size), or use decay_every_samples")
        self.samples_per_step = samples_per_step
        self.samples_per_epoch = samples_per_epoch

    @property
    def interval(self) -> float:
        if self.decay_every_samples is not None:
            return self.decay_every_samples
        if not self.samples_per_epoch:
            return math.inf  # not configured yet: lr0 until the module says how large an epoch is
        return self.decay_every_epochs * self.samples_per_epoch

    def factor(self, samples: int) -> float:
        warmup = min(1.0, samples / self.warmup_samples) if self.warmup_samples else 1.0
        return warmup * self.decay_rate ** math.floor(samples / self.interval)

    def step(self, epoch: None = None) -> None:
        # LRScheduler.__init__ calls step() once (last_epoch -1 -> 0) to set the initial lr.
        if self.last_epoch >= 0:
            self.samples_seen += self.samples_per_step
        super().step()

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.samples_seen) for base_lr in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k not in self._RUN_FACTS}
