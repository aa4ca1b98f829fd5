"""The lr schedule counts samples (sec. 4.2), and the JFT optimizer is TensorFlow's RMSprop."""

import math
from functools import partial

import pytest
import torch
from timm.optim import RMSpropTF

from xception_pl.schedules import SampleBudgetDecay, SampleCounts, SampleStepDecay, TorchShape, sample_budget

EPOCH = 12_811  # a small training set (ImageNet / 100) keeps the loops short


def lr_after(steps: int, per_device_batch: int, world_size: int, **schedule) -> float:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.045)
    scheduler = SampleStepDecay(optimizer, SampleCounts(per_device_batch * world_size, EPOCH), **schedule)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_imagenet_schedule_depends_on_samples_not_world_size(world_size):
    """x0.94 every 2 epochs (sec. 4.2), whatever the number of devices."""
    interval = 2 * EPOCH
    for samples, decays in [(0, 0), (interval - 256, 0), (interval, 1), (5 * interval + 1024, 5)]:
        steps = samples // (32 * world_size)
        seen = steps * 32 * world_size
        expected = 0.045 * 0.94 ** math.floor(seen / interval)
        assert lr_after(steps, 32, world_size, decay_rate=0.94, decay_every_epochs=2) == pytest.approx(expected)
        if seen == samples:
            assert expected == pytest.approx(0.045 * 0.94**decays)


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_jft_schedule_decays_every_3m_samples(world_size):
    steps = math.ceil(3_000_000 / (64 * world_size))  # the first step whose samples reach 3M
    before = lr_after(steps - 1, 64, world_size, decay_rate=0.9, decay_every_samples=3_000_000)
    after = lr_after(steps, 64, world_size, decay_rate=0.9, decay_every_samples=3_000_000)
    assert before == pytest.approx(0.045)
    assert after == pytest.approx(0.045 * 0.9)


def test_resume_on_another_world_size_keeps_the_sample_count():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = SampleStepDecay(optimizer, SampleCounts(2 * 100), decay_rate=0.5, decay_every_samples=1000)  # 2 x 100
    for _ in range(4):
        scheduler.step()
    state = scheduler.state_dict()
    assert state["samples_seen"] == 800 and "samples_per_step" not in state

    resumed = SampleStepDecay(torch.optim.SGD([parameter], lr=1.0), SampleCounts(8 * 100),  # now 8 devices
                              decay_rate=0.5, decay_every_samples=1000)
    resumed.load_state_dict(state)
    resumed.step()
    assert resumed.samples_seen == 1600
    assert resumed.get_last_lr() == [0.5]


def test_linear_warmup_is_ours_and_off_by_default():
    assert lr_after(1, 100, 1, decay_rate=0.9, decay_every_samples=10_000) == pytest.approx(0.045)
    assert lr_after(1, 100, 1, decay_rate=0.9, decay_every_samples=10_000, warmup_samples=400) == pytest.approx(
        0.045 * 100 / 400)


@pytest.mark.parametrize("kwargs, message", [
    (dict(decay_rate=0.9), "exactly one of"),
    (dict(decay_rate=0.9, decay_every_samples=10, decay_every_epochs=1), "exactly one of"),
    (dict(decay_rate=1.5, decay_every_samples=10), "decay_rate=1.5"),
    (dict(decay_rate=0.9, decay_every_samples=-1), "decay_every_samples=-1 must be positive"),
])
def test_bad_schedule_arguments_are_rejected(kwargs, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        SampleStepDecay(optimizer, SampleCounts(32, EPOCH), **kwargs)


def test_epoch_decay_needs_the_training_set_size():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="needs the training set size"):
        SampleStepDecay(optimizer, SampleCounts(32, per_epoch=None), decay_rate=0.94, decay_every_epochs=2)


def test_a_schedule_without_its_sample_counts_is_refused():
    """It would never decay: the counts are a required argument, given by the module when it builds it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match="samples"):
        SampleStepDecay(optimizer, decay_rate=0.9, decay_every_samples=10)


def test_rmsprop_is_tensorflows():
    """Two steps by hand: ms = decay*ms + (1-decay)*g^2 (ms starts at 1, as TF);
    mom = momentum*mom + lr*g/sqrt(ms + eps) (eps inside the sqrt, lr inside the buffer); w -= mom."""
    lr, decay, momentum, eps = 0.001, 0.9, 0.9, 1.0
    w = torch.nn.Parameter(torch.tensor([0.5, -2.0]))
    optimizer = RMSpropTF([w], lr=lr, alpha=decay, momentum=momentum, eps=eps)
    expected, ms, mom = w.detach().clone(), torch.ones(2), torch.zeros(2)
    for g in (torch.tensor([0.3, -1.2]), torch.tensor([-0.7, 0.4])):
        w.grad = g.clone()
        optimizer.step()
        ms = decay * ms + (1 - decay) * g**2
        mom = momentum * mom + lr * g / torch.sqrt(ms + eps)
        expected -= mom
    torch.testing.assert_close(w.detach(), expected)


def shaped_lr_after(steps: int, global_batch: int, shape, **kwargs) -> float:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.045)
    scheduler = TorchShape(optimizer, SampleCounts(global_batch), shape=shape, **kwargs)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_a_torch_scheduler_is_stepped_in_samples_on_any_world_size(world_size):
    """CosineAnnealingLR's T_max counts samples: after s samples the lr is torch's closed form at s."""
    budget, global_batch = 64_000, 32 * world_size
    cosine = partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=budget, eta_min=0.001)
    for samples in (0, 16_000, 32_000, 64_000):
        samples -= samples % global_batch  # those of whole steps
        expected = 0.001 + (0.045 - 0.001) * (1 + math.cos(math.pi * samples / budget)) / 2
        assert shaped_lr_after(samples // global_batch, global_batch, cosine) == pytest.approx(expected)


def test_sample_step_decay_is_torchs_step_lr_in_samples():
    step_lr = partial(torch.optim.lr_scheduler.StepLR, step_size=3_000_000, gamma=0.9)
    for steps in (0, 46_874, 46_875, 100_000):  # 46,875 x 64 = 3M samples: the first decay
        assert shaped_lr_after(steps, 64, step_lr) == pytest.approx(
            lr_after(steps, 64, 1, decay_rate=0.9, decay_every_samples=3_000_000))


def test_a_shape_warms_up_in_samples_and_lambda_lr_reads_samples():
    constant = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda samples: 1.0 if samples < 1000 else 0.5)
    assert shaped_lr_after(1, 100, constant, warmup_samples=400) == pytest.approx(0.045 * 100 / 400)
    assert shaped_lr_after(10, 100, constant, warmup_samples=400) == pytest.approx(0.045 * 0.5)


def test_a_stateful_torch_scheduler_is_refused_with_the_ones_that_work():
    with pytest.raises(ValueError, match="MultiplicativeLR keeps state between steps.*CosineAnnealingLR"):
        shaped_lr_after(1, 32, partial(torch.optim.lr_scheduler.MultiplicativeLR, lr_lambda=lambda step: 0.9))


def test_a_torch_shape_resumes_on_another_world_size_at_its_sample_count():
    parameter = torch.nn.Parameter(torch.zeros(1))
    linear = partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.0, total_iters=1000)
    scheduler = TorchShape(torch.optim.SGD([parameter], lr=1.0), SampleCounts(200), shape=linear)
    for _ in range(2):
        scheduler.step()
    resumed = TorchShape(torch.optim.SGD([parameter], lr=1.0), SampleCounts(100), shape=linear)
    resumed.load_state_dict(scheduler.state_dict())
    resumed.step()
    assert resumed.get_last_lr() == [pytest.approx(0.5)]  # 400 + 100 of 1000 samples


def budget_lrs(per_step: int, steps: int, **schedule) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.8)
    scheduler = SampleBudgetDecay(optimizer, SampleCounts(per_step, per_run=schedule.pop("per_run", None)), **schedule)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("decay, middle", [("cosine", 0.1 + 0.9 * 0.5), ("linear", 0.1 + 0.9 * 0.5),
                                           ("cosine-quarter", 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)])
def test_budget_decay_warms_up_then_falls_to_its_floor_at_the_budget(decay, middle):
    """lr0 0.8, warm-up 1,000 samples, budget 11,000 (the decay spans 10,000), floor 0.1; 100 samples a step."""
    quarter = decay.endswith("quarter")
    lrs = budget_lrs(100, 150, decay=decay.split("-")[0], max_samples=11_000, floor=0.1, warmup_samples=1_000)
    at = {samples: lrs[samples // 100] for samples in (0, 500, 1_000, 3_500, 6_000, 11_000, 15_000)}
    assert at[0] == 0.0 and at[500] == pytest.approx(0.4) and at[1_000] == pytest.approx(0.8)  # warm-up
    assert at[3_500 if quarter else 6_000] == pytest.approx(0.8 * middle)  # p = 1/4 (cosine) or 1/2
    assert at[11_000] == pytest.approx(0.08) and at[15_000] == pytest.approx(0.08)  # the floor, and after
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after the warm-up


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_budget_decay_is_the_same_at_a_sample_count_on_any_world_size_and_after_a_resume(world_size):
    per_step = 25 * world_size
    reference = budget_lrs(25, 400, max_samples=10_000, warmup_samples=1_000)
    steps = 4_000 // per_step
    assert budget_lrs(per_step, steps, max_samples=10_000, warmup_samples=1_000)[-1] == pytest.approx(reference[160])

    parameter = torch.nn.Parameter(torch.zeros(1))
    before = SampleBudgetDecay(torch.optim.SGD([parameter], lr=0.8), SampleCounts(per_step), max_samples=10_000)
    for _ in range(steps):
        before.step()
    resumed = SampleBudgetDecay(torch.optim.SGD([parameter], lr=0.8), SampleCounts(100),  # 4 x 25, other devices
                                max_samples=10_000)
    resumed.load_state_dict(before.state_dict())
    for _ in range(20):
        resumed.step()
    assert resumed.samples_seen == 6_000
    assert resumed.get_last_lr()[0] == pytest.approx(0.8 * (1 + math.cos(math.pi * 0.6)) / 2)


def test_the_budget_is_the_trainers_epochs_of_the_training_set_or_its_steps():
    import lightning as L

    trainer = L.Trainer(max_epochs=90, logger=False, enable_checkpointing=False)
    assert sample_budget(trainer, 12_811, per_step=256) == 90 * 12_811  # epochs x train_size: no world size in it
    trainer = L.Trainer(max_epochs=90, max_steps=1_000, logger=False, enable_checkpointing=False)
    assert sample_budget(trainer, 12_811, per_step=256) == 256_000  # max_steps ends the fit first
    assert budget_lrs(100, 1, per_run=1_000, decay="linear")[-1] == pytest.approx(0.8 * 0.9)  # the default budget
    with pytest.raises(ValueError, match="needs a budget: give max_samples"):
        budget_lrs(100, 1)
    with pytest.raises(ValueError, match="longer than warmup_samples"):
        budget_lrs(100, 1, max_samples=1_000, warmup_samples=1_000)
