"""Kernels one Polyak (EMA) update and one RMSpropTF step launch for Xception (ImageNet head, 22,855,952
parameters, channels_last), counted with torch.profiler.

    PYTHONPATH=. python benchmarks/update_kernels.py [--device cuda]

Both updates go through torch's multi-tensor (`_foreach_*`) ops in the shape of their CUDA fast path
(tests/unit/test_foreach_fast_path.py checks the conditions on CPU): on CUDA each op then launches one kernel
per chunk of tensors, where the per-tensor fallback launches at least one per tensor, i.e. at least the
"tensors" column per op. RMSpropTF runs as under fp16 (GradScaler's skip flag and loss scale handed over),
the Polyak update with the module's skip flag, as in training. On the CPU only the op calls are counted.
"""

from __future__ import annotations

import argparse  # a benchmark script, not part of the CLI

import torch
from torch.profiler import ProfilerActivity, profile

from xception_pl.ema import PolyakAveraging
from xception_pl.model import Xception
from xception_pl.optim import RMSpropTF


def counted(update, device: torch.device) -> tuple[int, int]:
    """(`_foreach_*` op calls, CUDA kernels launched) of one call of `update`, after a warm-up call."""
    update()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    foreach = sum(1 for e in events if e.name.startswith("aten::_foreach_"))
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return foreach, kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = Xception().to(device, memory_format=torch.channels_last)
    model(torch.randn(2, 3, 96, 96, device=device).to(memory_format=torch.channels_last)).sum().backward()

    optimizer = RMSpropTF(model.parameters(), lr=0.045, momentum=0.9, weight_decay=1e-5)
    optimizer.found_inf, optimizer.grad_scale = torch.zeros(1, device=device), torch.full((1,), 1024.0, device=device)
    rmsprop = counted(optimizer.step, device)

    average = Xception().to(device, memory_format=torch.channels_last)
    module = torch.nn.Module()
    module.net = model
    module.step_kept, module.global_batch_size = torch.ones((), device=device), 32
    ema = PolyakAveraging(decay=0.9999, reference_batch=32)
    ema._average_model = type("Averaged", (), {"module": average})()
    steps = iter(range(1, 10))
    trainer = type("Trainer", (), {})()

    def polyak() -> None:
        trainer.global_step = next(steps)
        with torch.no_grad():
            ema.on_train_batch_end(trainer, module)

    tensors = len(PolyakAveraging.tensors(model))
    polyak_counts = counted(polyak, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no kernel count)"
    print(f"Device: {name}; torch {torch.__version__}.\n")
    print("| update | tensors | `_foreach_*` calls | CUDA kernels launched |\n|---|---:|---:|---:|")
    for what, count, (calls, kernels) in (("RMSpropTF step (fp16: skip flag, loss scale)",
                                           sum(1 for p in model.parameters()), rmsprop),
                                          ("Polyak update (skip flag)", tensors, polyak_counts)):
        print(f"| {what} | {count} | {calls} | {kernels if device.type == 'cuda' else '-'} |")


if __name__ == "__main__":
    main()
