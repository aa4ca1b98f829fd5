"""Learning-rate schedules counted in training SAMPLES, not steps (sec. 4.2).

The paper decays the lr "by a rate of 0.94 every 2 epochs" (ImageNet) and "by a rate of
0.9 every 3,000,000 samples" (JFT). Counting samples keeps the schedule identical for
any number of devices, nodes or accumulation steps, and across a resume on a different
world size: the number of samples seen is saved, and each step adds the global batch.

`SampleSchedule` does the counting (and the warm-up, ours); a schedule is its `shape`, the lr at a
sample count: `SampleStepDecay` is the paper's, `SampleBudgetDecay` today's (warm-up, then cosine or linear
decay to a floor at the end of a budget of samples), and `TorchShape` takes any of torch's own schedulers
whose lr is a function of its step count, evaluated at the sample count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import lightning as L
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LambdaLR, LRScheduler, OneCycleLR, _enable_get_lr_call

log = logging.getLogger(__name__)


def samples_per_step(trainer: L.Trainer, batch_size: int) -> int:
    """The global batch: per-device batch x devices x nodes x accumulation (the one place it is computed)."""
    return batch_size * trainer.world_size * trainer.accumulate_grad_batches


def sample_budget(trainer: L.Trainer, train_size: int | None, per_step: int) -> int | None:
    """The samples a fit trains on: trainer.max_epochs x the training set (the same on any world size), or
    max_steps x the global batch when that ends the fit first; None when neither is set."""
    budgets = []
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and train_size:
        budgets.append(trainer.max_epochs * train_size)
    if trainer.max_steps is not None and trainer.max_steps > 0:
        budgets.append(trainer.max_steps * per_step)
    return min(budgets) if budgets else None


def samples_seen(trainer: L.Trainer, per_step: int) -> int:
    """Samples of the optimizer steps taken so far in the run (resumes included, on any world size): the
    schedule's count when it is a SampleSchedule (restored from the checkpoint), else global steps x per_step
    (the global batch; exact unless the world size changed on a resume)."""
    for config in trainer.lr_scheduler_configs:
        if isinstance(config.scheduler, SampleSchedule):
            return config.scheduler.samples_seen
    return trainer.global_step * per_step


@dataclass(frozen=True)
class SampleCounts:
    """What a schedule counted in samples needs of the running job; the module gives it when it builds the
    schedule (the config gives the rest)."""

    per_step: int  # the global batch: samples_per_step
    per_epoch: int | None = None  # the training set; decay_every_epochs needs it
    skipped_steps: Callable[[], int] | None = None  # reads the steps skipped so far (a device count)
    per_run: int | None = None  # the fit's budget (sample_budget); SampleBudgetDecay's default


SampleScheduleCallable = Callable[[Optimizer, SampleCounts], LRScheduler]  # what model.lr_scheduler builds
ShapeCallable = Callable[[Optimizer], LRScheduler]  # one of torch's schedulers, given its optimizer


class SampleSchedule(LRScheduler):
    """lr = warm-up(samples) x shape(samples), stepped every optimizer step with the global batch.

    The samples are those of the steps that updated the weights (a step skipped for a non-finite loss does
    not count). That count lives on the device; the host reads it only when the lr would move by more than
    READ_TOLERANCE (relative) since the last read: at each decay of a staircase (exact there), every warm-up step,
    and every 1 % of a smooth shape; so a steady step never waits for the host.

    Subclasses give `shape(samples) -> lrs` and list their config in `_CONFIG`.
    """

    READ_TOLERANCE = 0.01  # ours
    # The recipe comes from the config, also on resume (a config edit takes effect); facts of the running
    # job come from the module. Neither is restored from a checkpoint: only the progress is.
    _CONFIG: tuple[str, ...] = ("warmup_samples", "base_lrs")
    _NOT_SAVED = ("samples", "skipped_before", "lrs_at_read", "shape_scheduler",
                  "factor_now", "samples_per_step", "samples_per_epoch", "skipped_steps")  # the last 4: older ones

    def __init__(self, optimizer: Optimizer, samples: SampleCounts, warmup_samples: int = 0) -> None:
        if warmup_samples < 0:
            raise ValueError(f"warmup_samples={warmup_samples} must be >= 0")
        self.samples = samples
        self.warmup_samples = warmup_samples
        self.samples_seen = 0  # by every optimizer step, skipped ones included
        self.samples_skipped = 0  # by the steps skipped for a non-finite loss
        self.skipped_before = 0  # samples_skipped before this run (restored from a checkpoint)
        self.lrs_at_read: list[float] | None = None
        super().__init__(optimizer)

    def shape(self, samples: int) -> list[float]:
        raise NotImplementedError

    def lrs(self, samples: int) -> list[float]:
        warmup = min(1.0, samples / self.warmup_samples) if self.warmup_samples else 1.0
        return [warmup * lr for lr in self.shape(samples)]

    def step(self, epoch: None = None) -> None:
        # LRScheduler.__init__ calls step() once (last_epoch -1 -> 0) to set the initial lr.
        if self.last_epoch >= 0:
            self.samples_seen += self.samples.per_step
        super().step()

    def get_lr(self) -> list[float]:
        lrs = self.lrs(self.samples_seen - self.samples_skipped)
        if self.samples.skipped_steps is not None and self.moved(lrs):
            self.count_skipped()
            lrs = self.lrs(self.samples_seen - self.samples_skipped)
            self.lrs_at_read = lrs
        return lrs

    def moved(self, lrs: list[float]) -> bool:
        return self.lrs_at_read is None or any(
            abs(new - old) > self.READ_TOLERANCE * abs(old) for new, old in zip(lrs, self.lrs_at_read))

    def count_skipped(self) -> None:
        self.samples_skipped = self.skipped_before + self.samples.skipped_steps() * self.samples.per_step

    def state_dict(self) -> dict[str, Any]:
        if self.samples.skipped_steps is not None:  # exact in the checkpoint
            self.count_skipped()
        state = super().state_dict()
        progress = {k: v for k, v in state.items() if k not in self._CONFIG + self._NOT_SAVED}
        return {**progress, "config": {k: state[k] for k in self._CONFIG}}  # "config": to report edits only

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config", {k: state_dict[k] for k in self._CONFIG if k in state_dict})
        edits = [f"{k}={getattr(self, k)} (checkpoint: {v})" for k, v in saved.items() if getattr(self, k, v) != v]
        if edits:
            log.warning("the config's lr schedule replaces the checkpoint's: %s", ", ".join(edits))
        unsaved = self._CONFIG + self._NOT_SAVED + ("config",)
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in unsaved})
        self.skipped_before = self.samples_skipped
        self.lrs_at_read = None


class SampleStepDecay(SampleSchedule):
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

    _CONFIG = ("decay_rate", "decay_every_samples", "decay_every_epochs", *SampleSchedule._CONFIG)
    READ_TOLERANCE = 0.0  # the lr moves only at a decay: read there, exactly

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
        if decay_every_epochs is not None and not samples.per_epoch:
            raise ValueError("decay_every_epochs needs the training set size: give the data module a train set "
                             "(or train_size), or use decay_every_samples")
        self.decay_rate = decay_rate
        self.decay_every_samples = decay_every_samples
        self.decay_every_epochs = decay_every_epochs
        self.interval = decay_every_samples or decay_every_epochs * samples.per_epoch
        super().__init__(optimizer, samples, warmup_samples)

    def shape(self, samples: int) -> list[float]:
        return [lr * self.decay_rate ** math.floor(samples / self.interval) for lr in self.base_lrs]


class SampleBudgetDecay(SampleSchedule):
    """Linear warm-up, then cosine (Loshchilov & Hutter, ICLR 2017) or linear decay to `floor` x lr0 at the end of
    a budget of samples (ours, as timm's and torchvision's recipes and FFCV's linear ramp; not in the paper):

        lr = lr0 x warmup(s) x (floor + (1 - floor) x f(p)),  p = (s - warmup_samples) / (budget - warmup_samples)

    with f(p) = (1 + cos(pi p)) / 2 or 1 - p, p clipped to [0, 1]: the lr stays at the floor after the budget.

    Args:
        optimizer: the wrapped optimizer.
        samples: the global batch, the training set and the fit's budget (given by the module).
        decay: "cosine" or "linear".
        max_samples: the budget in samples; default: the trainer's, max_epochs x the training set (or
            max_steps x the global batch when that ends the fit first). In samples, so the same on any world size.
        floor: the final lr as a fraction of each group's lr0 (0: decay to zero).
        warmup_samples: linear warm-up from 0 over this many samples; the decay starts after it.
    """

    _CONFIG = ("decay", "max_samples", "budget", "floor", *SampleSchedule._CONFIG)

    def __init__(self, optimizer: Optimizer, samples: SampleCounts, decay: Literal["cosine", "linear"] = "cosine",
                 max_samples: int | None = None, floor: float = 0.0, warmup_samples: int = 0) -> None:
        if decay not in ("cosine", "linear"):
            raise ValueError(f"decay={decay!r}: choose cosine or linear")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor={floor} must be in [0, 1] (a fraction of the optimizer's lr)")
        budget = max_samples or samples.per_run
        if budget is None:
            raise ValueError("SampleBudgetDecay needs a budget: give max_samples, or the trainer max_epochs (with "
                             "the data's train_size) or max_steps")
        if budget <= warmup_samples:
            raise ValueError(f"the budget of {budget:,} samples must be longer than warmup_samples={warmup_samples:,}")
        self.decay, self.max_samples, self.budget, self.floor = decay, max_samples, budget, floor
        super().__init__(optimizer, samples, warmup_samples)

    def shape(self, samples: int) -> list[float]:
        progress = min(1.0, max(0.0, (samples - self.warmup_samples) / (self.budget - self.warmup_samples)))
        falling = (1.0 + math.cos(math.pi * progress)) / 2.0 if self.decay == "cosine" else 1.0 - progress
        return [lr * (self.floor + (1.0 - self.floor) * falling) for lr in self.base_lrs]


class TorchShape(SampleSchedule):
    """Any of torch's schedulers whose lr is a function of its step count, with the step count in samples:

        lr_scheduler:
          class_path: xception_pl.schedules.TorchShape
          init_args:
            warmup_samples: 12800
            shape:
              class_path: torch.optim.lr_scheduler.CosineAnnealingLR
              init_args: {T_max: 128116700, eta_min: 0.0}   # T_max in samples: 100 ImageNet epochs

    The closed forms torch gives (StepLR, MultiStepLR, ConstantLR, LinearLR, ExponentialLR, CosineAnnealingLR,
    PolynomialLR) and the schedulers whose get_lr reads only the step count (LambdaLR, OneCycleLR, CyclicLR)
    are evaluated at the sample count; the others keep state between steps and are refused.
    """

    STATELESS = (LambdaLR, OneCycleLR, CyclicLR)  # get_lr is a function of last_epoch alone

    def __init__(self, optimizer: Optimizer, samples: SampleCounts, shape: ShapeCallable,
                 warmup_samples: int = 0) -> None:
        self.shape_scheduler = shape(optimizer)  # sets each group's initial_lr, read by our base_lrs
        if not (hasattr(self.shape_scheduler, "_get_closed_form_lr") or isinstance(self.shape_scheduler,
                                                                                  self.STATELESS)):
            raise ValueError(f"{type(self.shape_scheduler).__name__} keeps state between steps, so it cannot be "
                             "evaluated at a sample count: use one with a closed form (CosineAnnealingLR, "
                             "LinearLR, MultiStepLR, ExponentialLR, PolynomialLR, ...) or LambdaLR")
        super().__init__(optimizer, samples, warmup_samples)

    def shape(self, samples: int) -> list[float]:
        scheduler = self.shape_scheduler
        scheduler.last_epoch = samples
        if hasattr(scheduler, "_get_closed_form_lr"):
            return list(scheduler._get_closed_form_lr())
        with _enable_get_lr_call(scheduler):
            return list(scheduler.get_lr())
