"""Learning-rate schedules counted in training SAMPLES, not steps (sec. 4.2).

The paper decays the lr "by a rate of 0.94 every 2 epochs" (ImageNet) and "by a rate of
0.9 every 3,000,000 samples" (JFT). Counting samples keeps the schedule identical for
any number of devices, nodes or accumulation steps, and across a resume on a different
world size: the number of samples seen is saved, and each step adds the global batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleCounts:
    """What a schedule counted in samples needs of the running job; the module gives it when it builds the
    schedule (the config gives the rest)."""

    per_step: int  # the global batch: per-device batch x devices x nodes x accumulation
    per_epoch: int | None = None  # the training set; decay_every_epochs needs it
    skipped_steps: Callable[[], int] | None = None  # reads the steps skipped so far (a device count)


SampleScheduleCallable = Callable[[Optimizer, SampleCounts], LRScheduler]  # what model.lr_scheduler builds


class SampleStepDecay(LRScheduler):
    """lr = lr0 * warmup * decay_rate ** floor(samples_seen / decay_every) (staircase, ours).

    Args:
        optimizer: the wrapped optimizer.
        samples: the global batch, the training set size and a reader of the skipped steps (given by
            the module, not the config).
        decay_rate: multiplier per interval; 0.94 ImageNet, 0.9 JFT (sec. 4.2).
        decay_every_samples: interval in samples; 3,000,000 on JFT (sec. 4.2).
        decay_every_epochs: interval in epochs of the training set; 2 on ImageNet (sec. 4.2).
        warmup_samples: linear warmup from 0 over this many samples (ours; 0 = off, as the paper).
    """

    # The recipe comes from the config, also on resume (a config edit takes effect); facts of the running
    # job come from the module. Neither is restored from a checkpoint: only the progress is.
    _CONFIG = ("decay_rate", "decay_every_samples", "decay_every_epochs", "warmup_samples", "base_lrs")
    _RUN_FACTS = ("samples", "skipped_before", "factor_now",
                  "samples_per_step", "samples_per_epoch", "skipped_steps")  # the last three: older checkpoints

    def __init__(
        self,
        optimizer: Optimizer,
        samples: SampleCounts,
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
        if decay_every_epochs is not None and not samples.per_epoch:
            raise ValueError("decay_every_epochs needs the training set size: give the data module a train set "
                             "(or train_size), or use decay_every_samples")
        self.samples = samples
        self.decay_rate = decay_rate
        self.decay_every_samples = decay_every_samples
        self.decay_every_epochs = decay_every_epochs
        self.warmup_samples = warmup_samples
        self.samples_seen = 0  # by every optimizer step, skipped ones included
        self.samples_skipped = 0  # by the steps skipped for a non-finite loss
        self.skipped_before = 0  # samples_skipped before this run (restored from a checkpoint)
        self.factor_now: float | None = None
        super().__init__(optimizer)

    @property
    def interval(self) -> float:
        if self.decay_every_samples is not None:
            return self.decay_every_samples
        return self.decay_every_epochs * self.samples.per_epoch

    def factor(self, samples: int) -> float:
        warmup = min(1.0, samples / self.warmup_samples) if self.warmup_samples else 1.0
        return warmup * self.decay_rate ** math.floor(samples / self.interval)

    def step(self, epoch: None = None) -> None:
        # LRScheduler.__init__ calls step() once (last_epoch -1 -> 0) to set the initial lr.
        if self.last_epoch >= 0:
            self.samples_seen += self.samples.per_step
        super().step()

    def samples_trained(self) -> int:
        """Samples of the steps that updated the weights. The skip count lives on the device; it is read
        only when the lr would change at the uncorrected count (a decay boundary, or warmup), so a
        steady-state step never waits for the host, and the lr is exact at every step."""
        trained = self.samples_seen - self.samples_skipped
        if self.samples.skipped_steps is not None and self.factor(trained) != self.factor_now:
            self.count_skipped()
            trained = self.samples_seen - self.samples_skipped
        return trained

    def count_skipped(self) -> None:
        self.samples_skipped = self.skipped_before + self.samples.skipped_steps() * self.samples.per_step

    def get_lr(self) -> list[float]:
        self.factor_now = self.factor(self.samples_trained())
        return [base_lr * self.factor_now for base_lr in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        if self.samples.skipped_steps is not None:  # exact in the checkpoint
            self.count_skipped()
        state = super().state_dict()
        progress = {k: v for k, v in state.items() if k not in self._CONFIG + self._RUN_FACTS}
        return {**progress, "config": {k: state[k] for k in self._CONFIG}}  # "config": to report edits only

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config", {k: state_dict[k] for k in self._CONFIG if k in state_dict})
        edits = [f"{k}={getattr(self, k)} (checkpoint: {v})" for k, v in saved.items() if getattr(self, k) != v]
        if edits:
            log.warning("the config's lr schedule replaces the checkpoint's: %s", ", ".join(edits))
        unsaved = self._CONFIG + self._RUN_FACTS + ("config",)
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in unsaved})
        self.skipped_before = self.samples_skipped
