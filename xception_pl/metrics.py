"""MAP@K for multi-label evaluation at JFT scale (Chollet, CVPR 2017, sec. 4.1 and 4.4, Table 2)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

# Fills a class's running top K before K images are seen: below every real key, and odd, so it reads as non-relevant.
_EMPTY_KEY = torch.iinfo(torch.int64).min + 1


def ranking_keys(preds: Tensor, relevant: Tensor) -> Tensor:
    """One int64 per (score, relevance): larger key = ranked earlier; equal scores put the non-relevant first."""
    # Compare in float32; + 0.0 turns -0.0 into +0.0 (equal scores, equal keys) and copies, so preds stays intact.
    bits = (preds.float() + 0.0).view(torch.int32)
    bits ^= (bits >> 31) & 0x7FFFFFFF  # flip the magnitude bits of negatives: now int32 order = float order
    keys = bits.long()
    keys.mul_(2)
    keys += ~relevant  # low bit 1 marks non-relevant
    return keys


def relevance(keys: Tensor) -> Tensor:
    """Invert the low bit of ranking_keys: 1 for a relevant (image, class) pair, else 0."""
    return 1 - (keys & 1)


def merge_top_k(stacked: Tensor) -> Tensor:
    """Exact top-K keys [C, K] from n running top-K tensors [n, C, K] (processes, or forward's global + batch)."""
    n, num_classes, k = stacked.shape
    return stacked.permute(1, 0, 2).reshape(num_classes, n * k).topk(k, dim=1, sorted=False).values


def load_class_weights(class_weights: str | os.PathLike | Sequence[float] | Tensor | None, num_classes: int) -> Tensor:
    """Class weights as float64 [num_classes], from a file, a sequence, a tensor, or uniform (None)."""
    if class_weights is None:
        return torch.ones(num_classes, dtype=torch.float64)
    if isinstance(class_weights, (str, os.PathLike)):
        source = f"class weights file {os.fspath(class_weights)!r}"
        weights = torch.tensor(_read_weights_file(Path(class_weights), num_classes, source), dtype=torch.float64)
    else:
        source = "class_weights"
        weights = torch.as_tensor(class_weights, dtype=torch.float64).cpu()
    if weights.shape != (num_classes,):
        raise ValueError(
            f"{source} gives {weights.numel()} weights (shape {tuple(weights.shape)}) but num_classes={num_classes}: "
            "give exactly one weight per class, in class-id order."
        )
    bad = ~torch.isfinite(weights) | (weights < 0)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise ValueError(
            f"{source} has weight {weights[first].item()} for class {first}: weights must be finite and >= 0."
        )
    if weights.sum() == 0:
        raise ValueError(f"{source} has only zero weights: give at least one class a positive weight.")
    return weights


def _read_weights_file(path: Path, num_classes: int, source: str) -> list[float]:
    """JSON list, JSON object {class_id: weight} covering every class, or one weight per line (line i = class i)."""
    fix = (
        f"write a JSON list of {num_classes} numbers, a JSON object {{class_id: weight}} naming every class "
        f"0..{num_classes - 1}, or a text file with one number per line (line i is class i)."
    )
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"cannot read {source} ({err}): pass an existing file; {fix}") from err
    if text.lstrip().startswith(("[", "{")):
        try:
            parsed = json.loads(text)
            if isinstance(parsed, dict):
                by_class = {int(class_id): float(weight) for class_id, weight in parsed.items()}
                missing = sorted(set(range(num_classes)) - by_class.keys())
                extra = sorted(by_class.keys() - set(range(num_classes)))
                if missing or extra:
                    raise ValueError(f"missing class ids {missing[:5]}, unknown class ids {extra[:5]}")
                return [by_class[c] for c in range(num_classes)]
            return [float(weight) for weight in parsed]
        except (ValueError, TypeError) as err:
            raise ValueError(f"cannot parse {source} as JSON weights ({err}): {fix}") from err
    weights = []
    for line_number, line in enumerate(text.strip().splitlines(), start=1):
        try:
            weights.append(float(line))
        except ValueError as err:
            raise ValueError(f"{source}, line {line_number}: {line!r} is not a number: {fix}") from err
    return weights


class MeanAveragePrecisionAtK(Metric):
    """Class-weighted MAP@K over multi-label scores, streamed in O(num_classes x K) memory.

    The paper (sec. 4.1) scores JFT models on FastEval14k (14,000 images, ~6,000 of 17,000 classes present,
    36.5 labels per image) with "Mean Average Precision for top 100 predictions (MAP@100)", and "we weight the
    contribution of each class" by how common the class is. It does not say whether the top 100 are ranked per
    class or per image, nor how ties or weights enter AP; those are our choices, below.

    AP@K of one ranked list, rel_k in {0, 1} at rank k and P positives in the whole list:
    ``AP@K = (1 / min(K, P)) * sum_{k <= K} precision@k * rel_k``, precision@k = (relevant in top k) / k.

    - ``mode="per_class"`` (default): each class ranks all images seen by its score; classes with P = 0 are left
      out; ``MAP@K = sum_c w_c AP_c / sum_c w_c`` over the classes left in.
    - ``mode="per_image"``: each image ranks the classes; images with no positive are left out; the result is the
      plain mean over images of ``AP_i = sum_{k <= K} w_{c_k} * precision@k * rel_k / Z_i``, where Z_i is the sum
      of the min(K, P_i) largest weights among the image's positive classes. Z_i is the best numerator a ranking
      can reach, so AP_i is in [0, 1], and with uniform weights Z_i = min(K, P_i): the unweighted AP@K. Images
      whose positives all weigh 0 are left out too.

    Ties: scores are compared as float32; among equal scores the non-relevant item ranks first (pessimistic).
    In per_class mode items with equal (score, relevance) are interchangeable, so the top K of a union is the
    top K of the parts' top K: batch splits and the DDP merge in ``compute`` (gather every rank's [C, K] state,
    re-select the top K) are exact, whatever the order images arrive in. In per_image mode each image is ranked
    whole inside one update; there classes with equal (score, relevance) can differ in weight, and the lower
    class id ranks first. ``update`` never communicates, so ranks may see different numbers of batches.

    Weights (``class_weights``): None (uniform), a sequence or tensor of num_classes values >= 0, or a path to a
    JSON list, a JSON object {class_id: weight} naming every class, or a text file with one weight per line.

    Why not ``torchmetrics.retrieval.RetrievalMAP``: it keeps every (image, class) pair until compute (14,000 x
    17,000 scores, targets and int64 indexes: about 3 GB), normalises by the relevant items retrieved rather
    than min(K, P), and recent releases (1.9, installed here) count every pair with score <= 0 as non-relevant,
    which is wrong for logits.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(
        self,
        num_classes: int,
        k: int = 100,
        mode: Literal["per_class", "per_image"] = "per_class",
        class_weights: str | Sequence[float] | Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1 or k < 1:
            raise ValueError(f"num_classes and k must be >= 1, got num_classes={num_classes}, k={k}.")
        if mode not in ("per_class", "per_image"):
            raise ValueError(f"mode must be 'per_class' or 'per_image', got {mode!r}.")
        self.num_classes, self.k, self.mode = num_classes, k, mode
        self.register_buffer("class_weights", load_class_weights(class_weights, num_classes), persistent=False)
        # NaN scores cannot be ranked. Counted here and raised in compute, after the sync, so every rank makes the
        # same decision (raised in update, one rank would stop while the others wait in the sync).
        self.add_state("nan_images", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        if mode == "per_class":
            empty = torch.full((num_classes, k), _EMPTY_KEY, dtype=torch.int64)
            self.add_state("top_k_keys", empty, dist_reduce_fx=merge_top_k)  # [C, K], unsorted
            self.add_state("num_positives", torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")
        else:
            self.add_state("ap_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("num_images", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds: [N, C] scores of any sign; target: [N, C] multi-hot in {0, 1}."""
        if preds.ndim != 2 or preds.shape != target.shape or preds.shape[1] != self.num_classes:
            raise ValueError(
                f"expected preds and target of shape [N, {self.num_classes}], "
                f"got {tuple(preds.shape)} and {tuple(target.shape)}."
            )
        self.nan_images += torch.isnan(preds).any(1).sum()
        if target.dtype != torch.bool and not ((target == 0) | (target == 1)).all():
            raise ValueError("target must be multi-hot: every entry 0 or 1.")
        relevant = target.bool()
        keys = ranking_keys(preds, relevant)
        if self.mode == "per_class":
            self.top_k_keys = torch.cat([self.top_k_keys, keys.T], dim=1).topk(self.k, dim=1, sorted=False).values
            self.num_positives += relevant.sum(0)
        else:
            self._update_per_image(keys, relevant)

    def _update_per_image(self, keys: Tensor, relevant: Tensor) -> None:
        k = min(self.k, self.num_classes)
        # Tied (score, relevance) pairs of different classes weigh differently: the lower class id ranks first.
        # Keys span about 2^33, so keys * num_classes stays inside int64 for any num_classes below 2^29.
        class_ids = torch.arange(self.num_classes, device=keys.device)
        top_classes = (keys * self.num_classes + (self.num_classes - 1 - class_ids)).topk(k, dim=1).indices
        rel = relevant.gather(1, top_classes).double()  # [N, k], best first
        precision = rel.cumsum(1) / torch.arange(1, k + 1, dtype=torch.float64, device=rel.device)
        gain = (self.class_weights[top_classes] * precision * rel).sum(1)
        # Z_i: the top-k weights among positives; non-positives are 0, so they only fill in when P_i < k.
        best_gain = (self.class_weights * relevant).topk(k, dim=1, sorted=False).values.sum(1)
        counted = best_gain > 0
        self.ap_sum += (gain[counted] / best_gain[counted]).sum()
        self.num_images += counted.sum()

    def compute(self) -> Tensor:
        if self.nan_images > 0:  # the same on every rank: states are synced before compute
            raise ValueError(f"{int(self.nan_images)} images have NaN scores: scores must be comparable to rank them "
                             "(non-finite weights or inputs; check the last checkpoint and the data).")
        if self.mode == "per_image":
            if self.num_images == 0:
                rank_zero_warn("MeanAveragePrecisionAtK: no image with a (weighted) positive label; returning 0.")
                return torch.zeros((), device=self.ap_sum.device)
            return (self.ap_sum / self.num_images).float()
        rel = relevance(self.top_k_keys.sort(dim=1, descending=True).values).double()  # [C, K], best first
        precision = rel.cumsum(1) / torch.arange(1, self.k + 1, dtype=torch.float64, device=rel.device)
        ap = (precision * rel).sum(1) / self.num_positives.clamp(min=1, max=self.k)
        weights = self.class_weights * (self.num_positives > 0)
        if weights.sum() == 0:
            rank_zero_warn("MeanAveragePrecisionAtK: no class with a positive label and weight > 0; returning 0.")
            return torch.zeros((), device=rel.device)
        return ((weights * ap).sum() / weights.sum()).float()


class TopLabelAccuracy(Metric):
    """Multi-label acc1: the fraction of images whose top-scoring class is a positive (precision@1).

    Ranked as in MeanAveragePrecisionAtK (float32 scores, ties put the non-relevant first); images with no
    positive are left out, as in its per_image mode. torchmetrics' multilabel accuracies threshold every
    class instead of looking at the top one, and RetrievalPrecision(top_k=1) has RetrievalMAP's costs.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds: [N, C] scores of any sign; target: [N, C] multi-hot in {0, 1}."""
        if preds.ndim != 2 or preds.shape != target.shape:
            shapes = f"{tuple(preds.shape)} and {tuple(target.shape)}"
            raise ValueError(f"expected preds and target of shape [N, C], got {shapes}.")
        relevant = target.bool()
        top_class = ranking_keys(preds, relevant).argmax(1, keepdim=True)
        self.correct += relevant.gather(1, top_class).sum()  # an image without positive is never correct
        self.num_images += relevant.any(1).sum()

    def compute(self) -> Tensor:
        return self.correct / self.num_images.clamp(min=1)
