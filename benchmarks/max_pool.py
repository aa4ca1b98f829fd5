"""Xception's four "same" max-pools (Figure 5, TensorFlow padding): ours, which pools with its own padding
and ceil_mode, against timm's MaxPool2dSame, which first writes a -inf-padded copy of the activation (what
xception_pl used before). Forward + backward of each pool at its 299 px input shape, then the whole
network's inference forward with either pool; same run, same inputs, channels_last, interleaved.
Prints a markdown table for benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/max_pool.py [--device cuda] [--batch 32] [--dtype bfloat16]
"""

import argparse  # a benchmark script, not part of the CLI
import copy
import statistics
import time
from collections.abc import Callable

import torch
from timm.layers.pool2d_same import MaxPool2dSame as PadThenPool

from xception_pl import Xception
from xception_pl.model import MaxPool2dSame

SHAPES = ((128, 147), (256, 74), (728, 37), (1024, 19))  # (channels, side) entering each stride-2 module at 299


def time_ms(run: Callable[[], object], cuda: bool) -> float:
    """Wall time of run() in ms, the device synchronised before and after."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def forward_backward(pool: torch.nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    pool(x).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--network-repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"device {args.device}, batch {args.batch}, {args.dtype}, median of {args.repeats}, forward + backward\n")
    print("| input | pad-then-pool ms | ours ms | ours / pad-then-pool |\n|---|---:|---:|---:|")
    totals = [0.0, 0.0]
    for channels, side in SHAPES:
        x = torch.randn(args.batch, channels, side, side, device=args.device, dtype=getattr(torch, args.dtype))
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        pools = PadThenPool(3, 2), MaxPool2dSame(3, 2)
        [forward_backward(pool, x) for pool in pools]  # warm-up
        # interleaved, so that load from elsewhere on the machine falls on both
        pairs = [[time_ms(lambda: forward_backward(pool, x), x.is_cuda) for pool in pools]
                 for _ in range(args.repeats)]
        baseline, ours = (statistics.median(column) for column in zip(*pairs))
        totals = [totals[0] + baseline, totals[1] + ours]
        print(f"| {channels}x{side}x{side} | {baseline:.2f} | {ours:.2f} | {ours / baseline:.2f} |")
    print(f"| all four | {totals[0]:.2f} | {totals[1]:.2f} | {totals[1] / totals[0]:.2f} |")

    ours = Xception().eval().to(args.device, getattr(torch, args.dtype), memory_format=torch.channels_last)
    baseline = copy.deepcopy(ours)
    for module in baseline.modules():
        for name, child in module.named_children():
            if isinstance(child, MaxPool2dSame):
                setattr(module, name, PadThenPool(3, 2))
    images = torch.randn(args.batch, 3, 299, 299, device=args.device, dtype=getattr(torch, args.dtype))
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), baseline(images), rtol=0, atol=0)  # also the warm-up
        pairs = [[time_ms(lambda: network(images), images.is_cuda) for network in (baseline, ours)]
                 for _ in range(args.network_repeats)]
    baseline_ms, ours_ms = (statistics.median(column) for column in zip(*pairs))
    print(f"| whole network, inference forward (median of {args.network_repeats}) | {baseline_ms:.1f} | "
          f"{ours_ms:.1f} | {ours_ms / baseline_ms:.2f} |")


if __name__ == "__main__":
    main()
