"""The Polyak average's update and RMSpropTF's step reach torch's multi-tensor kernels in the shape their fast path
takes on CUDA (one launch per chunk of tensors, not one per tensor): in every `_foreach_*` call, the i-th tensors
of all its lists have the same size and strides (but in size-1 dimensions), dtype and device, and are dense;
a weight is a Python number or one 0-dim tensor. These are torch's own conditions
(ATen/native/ForeachUtils.h, `check_fast_path_restrictions`); a list of 0-dim weights beside full tensors, or
gradients viewed with other strides than the parameters' channels_last, send CUDA to its per-tensor fallback.
Checked on CPU by recording the calls (CPU always runs tensor by tensor)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from xception_pl.ema import PolyakAveraging
from xception_pl.optim import RMSpropTF, dense


class ForeachCalls(TorchDispatchMode):
    """Records every `_foreach_*` call's tensor lists and tensor scalars."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[list[Tensor]], list[Tensor]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "_foreach_" in func.__name__:
            values = [*args, *(kwargs or {}).values()]
            lists = [list(v) for v in values if isinstance(v, (list, tuple)) and v and isinstance(v[0], Tensor)]
            scalars = [v for v in values if isinstance(v, Tensor)]
            self.calls.append((func.__name__, lists, scalars))
        return func(*args, **(kwargs or {}))

    def slow_paths(self) -> list[str]:
        """The calls CUDA would run tensor by tensor, with why."""
        found = []
        for name, lists, scalars in self.calls:
            for i, tensors in enumerate(zip(*lists)):
                first = tensors[0]
                if any(t.shape != first.shape or strides(t) != strides(first) or t.dtype != first.dtype
                       or t.device != first.device or not dense(t) for t in tensors):
                    found.append(f"{name}: tensors {i} differ: {[(tuple(t.shape), t.stride()) for t in tensors]}")
                    break
            found += [f"{name}: a weight of shape {tuple(s.shape)}" for s in scalars if s.dim() != 0]
        return found


def strides(t: Tensor) -> list[int]:
    """The strides torch compares: those of dimensions longer than 1."""
    return [stride for size, stride in zip(t.shape, t.stride()) if size != 1]


def network() -> nn.Module:
    """Convolutions (channels_last, as Xception trains), BatchNorm (its integer counter too) and a linear layer."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.Flatten(),
                         nn.Linear(64, 5)).to(memory_format=torch.channels_last)


def gradients(model: nn.Module) -> None:
    model(torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)).square().sum().backward()


def test_rmsprop_tf_with_a_skip_flag_and_a_loss_scale_calls_only_fast_path_shapes():
    model = network()
    gradients(model)
    assert model[0].weight.grad.is_contiguous(memory_format=torch.channels_last)
    optimizer = RMSpropTF(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    optimizer.found_inf, optimizer.grad_scale = torch.zeros(1), torch.full((1,), 4.0)  # what GradScaler hands over
    with ForeachCalls() as calls:
        optimizer.step()
    assert len(calls.calls) > 5 and calls.slow_paths() == []


def test_rmsprop_tf_skips_a_non_finite_step_without_a_trace():
    model = network()
    gradients(model)
    optimizer = RMSpropTF(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.step()  # states exist
    before = [p.detach().clone() for p in model.parameters()] + [
        s.clone() for state in optimizer.state.values() for s in state.values()]
    model[0].weight.grad[0, 0, 0, 0] = float("nan")
    optimizer.found_inf, optimizer.grad_scale = torch.ones(1), None
    optimizer.step()
    after = [p.detach() for p in model.parameters()] + [s for state in optimizer.state.values() for s in state.values()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_the_polyak_update_with_the_modules_skip_flag_calls_only_fast_path_shapes():
    module = L.LightningModule()
    module.net = network()
    average = network()
    average.load_state_dict(module.net.state_dict())
    module.step_kept, module.global_batch_size = torch.ones(()), 4
    ema = PolyakAveraging(decay=0.9, reference_batch=4)
    ema._average_model = type("Averaged", (), {"module": average})()
    trainer = type("Trainer", (), {"global_step": 1})()
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(1.0)
    with ForeachCalls() as calls:
        ema.on_train_batch_end(trainer, module)
    assert calls.calls and calls.slow_paths() == []
    weight = 1.0 - min(0.9, 1.0 / 10.0)  # TensorFlow's warm-up at t = 0: decay 0.1
    expected = module.net[0].weight - 1.0 + weight * 1.0
    torch.testing.assert_close(average[0].weight, expected)
