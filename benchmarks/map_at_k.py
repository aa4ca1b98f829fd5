"""MAP@100 at JFT scale: FastEval14k-sized input (14,000 images x 17,000 classes, paper sec. 4.1) on one CPU process.

Times update + compute of MeanAveragePrecisionAtK in both modes against a full-matrix baseline that stores every
score and sorts each ranked list once, and reports each variant's peak RSS; every variant runs in a fresh
subprocess so that ru_maxrss is its own. Prints a markdown table for benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/map_at_k.py     # or without PYTHONPATH after pip install -e .
"""

import json
import resource
import subprocess
import sys
import time

import torch

from xception_pl.metrics import MeanAveragePrecisionAtK, ranking_keys, relevance

NUM_IMAGES, NUM_CLASSES = 14_000, 17_000  # FastEval14k, JFT (sec. 4.1)
NUM_PRESENT, LABELS_PER_IMAGE = 6_000, 36.5  # classes present in FastEval14k, labels per image (sec. 4.1)
BATCH_SIZE, K = 256, 100
VARIANTS = ("data only", "streaming per_class", "streaming per_image", "full matrix per_class", "full matrix per_image")


def batches():
    """Seeded random logits with some signal (positives score 3 higher), and ~36.5 labels per image."""
    generator = torch.Generator().manual_seed(0)
    present = torch.randperm(NUM_CLASSES, generator=generator)[:NUM_PRESENT]
    for start in range(0, NUM_IMAGES, BATCH_SIZE):
        n = min(BATCH_SIZE, NUM_IMAGES - start)
        target = torch.zeros(n, NUM_CLASSES, dtype=torch.bool)
        target[:, present] = torch.rand(n, NUM_PRESENT, generator=generator) < LABELS_PER_IMAGE / NUM_PRESENT
        yield torch.randn(n, NUM_CLASSES, generator=generator) + 3.0 * target, target


def class_weights() -> torch.Tensor:
    return torch.rand(NUM_CLASSES, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def full_matrix_map(scores: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, mode: str) -> float:
    """The naive way: all scores in memory, each list sorted whole (stable: full ties keep index order)."""
    ranks = torch.arange(1, K + 1, dtype=torch.float64)
    if mode == "per_class":
        aps = []
        for cols in torch.arange(NUM_CLASSES).split(1000):  # 1000 classes at a time bounds the sort's buffers
            keys = ranking_keys(scores[:, cols], target[:, cols]).sort(dim=0, descending=True, stable=True).values
            rel = relevance(keys[:K]).double()  # [K, 1000]
            positives = target[:, cols].sum(0)
            aps.append((rel.cumsum(0) / ranks[:, None] * rel).sum(0) / positives.clamp(min=1, max=K))
        counted = weights * target.any(0)  # not target.sum(0): that would make an int64 copy of the matrix
        return ((counted * torch.cat(aps)).sum() / counted.sum()).item()
    ap_sum, num_images = 0.0, 0
    for rows in torch.arange(NUM_IMAGES).split(BATCH_SIZE):
        keys = ranking_keys(scores[rows], target[rows])
        top_classes = keys.sort(dim=1, descending=True, stable=True).indices[:, :K]
        rel = target[rows].gather(1, top_classes).double()
        gain = (weights[top_classes] * rel.cumsum(1) / ranks * rel).sum(1)
        best_gain = (weights * target[rows]).sort(dim=1, descending=True).values[:, :K].sum(1)
        ap_sum += (gain[best_gain > 0] / best_gain[best_gain > 0]).sum().item()
        num_images += int((best_gain > 0).sum())
    return ap_sum / num_images


def run_variant(variant: str) -> dict:
    torch.set_num_threads(1)
    mode = variant.rsplit(" ", 1)[-1]
    if variant.startswith("streaming"):
        metric = MeanAveragePrecisionAtK(NUM_CLASSES, k=K, mode=mode, class_weights=class_weights())
    elif variant.startswith("full matrix"):
        scores = torch.empty(NUM_IMAGES, NUM_CLASSES)
        target = torch.empty(NUM_IMAGES, NUM_CLASSES, dtype=torch.bool)
    update_s, start, value = 0.0, 0, float("nan")
    for preds, labels in batches():
        tic = time.perf_counter()
        if variant.startswith("streaming"):
            metric.update(preds, labels)
        elif variant.startswith("full matrix"):
            scores[start : start + len(preds)] = preds
            target[start : start + len(preds)] = labels
        update_s += time.perf_counter() - tic
        start += len(preds)
    tic = time.perf_counter()
    if variant.startswith("streaming"):
        value = metric.compute().item()
    elif variant.startswith("full matrix"):
        value = full_matrix_map(scores, target, class_weights(), mode)
    compute_s = time.perf_counter() - tic
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"variant": variant, "update_s": update_s, "compute_s": compute_s, "value": value, "peak_rss_mib": peak_rss}


def main() -> None:
    if len(sys.argv) == 2:
        print(json.dumps(run_variant(sys.argv[1])))
        return
    rows = []
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, variant], capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.splitlines()[-1]))
        print(f"done: {variant}", file=sys.stderr)
    print(f"{NUM_IMAGES} images x {NUM_CLASSES} classes, batch {BATCH_SIZE}, K={K}, weighted, 1 torch thread")
    print("| variant | update (s) | compute (s) | total (s) | MAP@100 | peak RSS (MiB) | over data only (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:  # rows[0], data only, is the floor: imports (torch, torchmetrics) and one batch
        total = row["update_s"] + row["compute_s"]
        print(
            f"| {row['variant']} | {row['update_s']:.2f} | {row['compute_s']:.2f} | {total:.2f} | {row['value']:.6f} "
            f"| {row['peak_rss_mib']:.0f} | {row['peak_rss_mib'] - rows[0]['peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
