"""MeanAveragePrecisionAtK against hand-computed cases, a brute-force reference, and a 2-process gloo run."""

import json
import re
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xception_pl.metrics import MeanAveragePrecisionAtK, TopLabelAccuracy, load_class_weights

MODES = ("per_class", "per_image")


def reference_ap(ranked_relevance, weights, num_positive_weights, k):
    """AP@K of one ranked list, written plainly: weights[i] scales the i-th item's gain."""
    hits, gain = 0, 0.0
    for rank, (rel, weight) in enumerate(zip(ranked_relevance[:k], weights[:k]), start=1):
        if rel:
            hits += 1
            gain += weight * hits / rank
    return gain / num_positive_weights


def reference_map(scores, target, k, mode, weights=None):
    """Brute force: sort every list by (-score, relevance): ties put the non-relevant first, and the stable sort
    leaves full ties in index order (lower class id first in per_image mode, as the metric does)."""
    num_images, num_classes = scores.shape
    weights = np.ones(num_classes) if weights is None else np.asarray(weights, dtype=np.float64)
    if mode == "per_class":
        total, weight_sum = 0.0, 0.0
        for c in range(num_classes):
            num_positives = int(target[:, c].sum())
            if num_positives == 0:
                continue
            order = sorted(range(num_images), key=lambda i: (-float(scores[i, c]), int(target[i, c])))
            ap = reference_ap([target[i, c] for i in order], [1.0] * num_images, min(k, num_positives), k)
            total += weights[c] * ap
            weight_sum += weights[c]
        return total / weight_sum
    aps = []
    for i in range(num_images):
        positive_weights = sorted((weights[c] for c in range(num_classes) if target[i, c]), reverse=True)
        best_gain = sum(positive_weights[:k])
        if best_gain == 0:
            continue
        order = sorted(range(num_classes), key=lambda c: (-float(scores[i, c]), int(target[i, c])))
        aps.append(reference_ap([target[i, c] for c in order], [weights[c] for c in order], best_gain, k))
    return sum(aps) / len(aps)


def streamed(preds, target, split_points, **metric_args):
    metric = MeanAveragePrecisionAtK(num_classes=preds.shape[1], **metric_args)
    for p, t in zip(preds.tensor_split(split_points), target.tensor_split(split_points)):
        metric.update(p, t)
    return metric.compute()


def random_case(seed, num_images=40, num_classes=12, ties=False):
    generator = torch.Generator().manual_seed(seed)
    preds = torch.randn(num_images, num_classes, generator=generator)
    if ties:
        preds = preds.round(decimals=1)  # many equal scores, some of them -0.0 vs +0.0
    target = torch.rand(num_images, num_classes, generator=generator) < 0.25
    target[:, :2] = False  # classes without positives
    target[:3] = False  # images without positives
    return preds, target


# Hand case, K = 2, four images, three classes.
# class 0: ranked images 0 (0.9, neg), 1 (0.8, pos): P = 2 -> AP = (1/2) / min(2, 2) = 0.25
# class 1: images 1 and 2 tie at 0.6; the non-relevant 2 ranks first, relevant 1 second -> AP = (1/2) / 1 = 0.5
# class 2: no positive -> left out, whatever its weight
HAND_PREDS = torch.tensor([[0.9, 0.2, 0.5], [0.8, 0.6, 0.5], [0.7, 0.6, 0.5], [0.1, 0.3, 0.5]])
HAND_TARGET = torch.tensor([[0, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize(
    ("class_weights", "expected"),
    [(None, (0.25 + 0.5) / 2), ([3.0, 1.0, 100.0], (3 * 0.25 + 1 * 0.5) / 4)],  # 0.375, 1.25 / 4 = 0.3125
)
def test_per_class_hand_case_weights_and_pessimistic_ties(class_weights, expected):
    metric = MeanAveragePrecisionAtK(num_classes=3, k=2, class_weights=class_weights)
    metric.update(HAND_PREDS, HAND_TARGET)
    assert metric.compute().item() == pytest.approx(expected)


def test_per_class_is_invariant_to_the_sign_of_scores():
    metric = MeanAveragePrecisionAtK(num_classes=3, k=2)
    metric.update(HAND_PREDS - 5.0, HAND_TARGET)  # logits below 0 still rank (RetrievalMAP would drop them)
    assert metric.compute().item() == pytest.approx(0.375)


# Hand case, one image ranked by class: scores [0.5, 0.9, 0.1, 0.7, 0.3], positives {0, 3, 4},
# weights [1, 1, 1, 2, 4]. Ranking: c1 (neg), c3 (pos), c0 (pos), c4 (pos), c2 (neg). A second image has no
# positive and is left out.
# K = 3, uniform:  (1/2 + 2/3) / min(3, 3) = 7/18
# K = 3, weighted: (2 * 1/2 + 1 * 2/3) / (4 + 2 + 1) = (5/3) / 7 = 5/21
# K = 2, uniform:  (1/2) / min(2, 3) = 1/4
# K = 2, weighted: (2 * 1/2) / (4 + 2) = 1/6   (Z = the two largest positive weights)
@pytest.mark.parametrize(
    ("k", "class_weights", "expected"),
    [(3, None, 7 / 18), (3, [1, 1, 1, 2, 4], 5 / 21), (2, None, 1 / 4), (2, [1, 1, 1, 2, 4], 1 / 6)],
)
def test_per_image_hand_case(k, class_weights, expected):
    metric = MeanAveragePrecisionAtK(num_classes=5, k=k, mode="per_image", class_weights=class_weights)
    preds = torch.tensor([[0.5, 0.9, 0.1, 0.7, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5]])
    target = torch.tensor([[1, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    metric.update(preds, target)
    assert metric.compute().item() == pytest.approx(expected)


def test_top_label_accuracy_hand_case():
    # Image 0: top class 1 (0.9) is a positive. Image 1: classes 0 and 2 tie at 0.8, the non-relevant class 2
    # ranks first: wrong. Image 2: no positive, left out. Image 3 (second batch): top class 0 is negative.
    # acc1 = 1 / 3.
    metric = TopLabelAccuracy()
    metric.update(torch.tensor([[0.1, 0.9, 0.2], [0.8, -1.0, 0.8], [0.5, 0.1, 0.1]]),
                  torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]]))
    metric.update(torch.tensor([[-0.5, -2.0, -3.0]]), torch.tensor([[0, 1, 1]]))
    assert metric.compute().item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [3, 100])  # fewer and more than the 40 images / 12 classes
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_brute_force_reference_for_any_batch_split(mode, seed, ties, k, weighted):
    preds, target = random_case(seed, ties=ties)
    weights = torch.rand(12, generator=torch.Generator().manual_seed(seed + 100)) if weighted else None
    if weighted:
        weights[5] = 0.0
    expected = reference_map(preds.numpy(), target.numpy(), k, mode, None if weights is None else weights.numpy())
    for split_points in ([], [1, 2, 17], list(range(1, 40, 4))):
        value = streamed(preds, target, split_points, k=k, mode=mode, class_weights=weights)
        assert value.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_forward_accumulates_like_update(mode):
    preds, target = random_case(seed=5, ties=True)
    metric = MeanAveragePrecisionAtK(num_classes=12, k=6, mode=mode)
    for p, t in zip(preds.split(7), target.split(7)):
        metric(p, t)  # full_state_update=False: merges each batch's state through merge_top_k / sum
    assert torch.equal(metric.compute(), streamed(preds, target, [], k=6, mode=mode))


@pytest.mark.parametrize("mode", MODES)
def test_target_dtypes_agree_and_preds_are_left_intact(mode):
    preds, target = random_case(seed=3, ties=True)
    original = preds.clone()
    dtypes = (torch.bool, torch.int64, torch.float32)
    values = [streamed(preds, target.to(dtype), [10], k=5, mode=mode) for dtype in dtypes]
    assert values[0] == values[1] == values[2]
    assert torch.equal(preds, original)


def test_update_rejects_bad_inputs():
    metric = MeanAveragePrecisionAtK(num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.rand(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="multi-hot"):
        metric.update(torch.rand(2, 3), torch.full((2, 3), 2))
    metric.update(torch.tensor([[float("nan"), 0.0, 0.0]]), torch.zeros(1, 3))  # said at compute, on every rank
    with pytest.raises(ValueError, match="1 images have NaN scores"):
        metric.compute()


# --- DDP: 2 gloo processes with uneven shards must give the 1-process value ------------------------------


def ddp_case():
    preds, target = random_case(seed=7, num_images=19, num_classes=9, ties=True)
    weights = torch.arange(1.0, 10.0)
    return preds, target, weights


def ddp_metrics(weights):
    return {
        f"{mode}_{weighted}": MeanAveragePrecisionAtK(9, k=k, mode=mode, class_weights=weights if weighted else None)
        for mode in MODES
        for weighted in (False, True)
        for k in [4]
    }


def ddp_worker(rank, port, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    preds, target, weights = ddp_case()
    shard, batch_size = (slice(0, 7), 2) if rank == 0 else (slice(7, 19), 5)  # 4 vs 3 update calls
    results = {}
    for name, metric in ddp_metrics(weights).items():
        for p, t in zip(preds[shard].split(batch_size), target[shard].split(batch_size)):
            metric.update(p, t)
        results[name] = metric.compute()  # syncs: torch.distributed is initialized
    lonely = MeanAveragePrecisionAtK(9, k=4)  # rank 0 sees no sample at all
    if rank == 1:
        lonely.update(preds, target)
    results["per_class_empty_rank"] = lonely.compute()
    nan_on_one_rank = MeanAveragePrecisionAtK(9, k=4)  # every rank reaches the same decision, none waits
    nan_on_one_rank.update(preds[shard] * (float("nan") if rank == 1 else 1.0), target[shard])
    try:
        nan_on_one_rank.compute()
    except ValueError as error:
        results["nan_error"] = str(error)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_processes_with_uneven_shards_equal_one_process(tmp_path):
    from tests.helpers import free_port  # here, not at the top: spawned workers re-import this module

    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    preds, target, weights = ddp_case()
    expected = {}
    for name, metric in ddp_metrics(weights).items():
        metric.update(preds, target)
        expected[name] = metric.compute()
    expected["per_class_empty_rank"] = expected["per_class_False"]
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results.pop("nan_error").startswith("12 images have NaN scores")  # rank 1's 12 images, on both
        for name, value in expected.items():
            if name.startswith("per_class"):
                assert torch.equal(results[name], value), name  # the top-K merge is exact
            else:
                torch.testing.assert_close(results[name], value, rtol=0, atol=1e-7)  # float64 sums, reordered


# --- class weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("weights.json", "[0.5, 2, 0, 1.25]"),
        ("weights.json", json.dumps({"3": 1.25, "0": 0.5, "2": 0, "1": 2})),
        ("weights.txt", "0.5\n2\n0\n1.25\n"),
    ],
)
def test_weights_file_formats(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    expected = torch.tensor([0.5, 2.0, 0.0, 1.25], dtype=torch.float64)
    assert torch.equal(load_class_weights(str(path), 4), expected)
    assert torch.equal(load_class_weights(expected.tolist(), 4), expected)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("short.json", "[1, 2, 3]", "one weight per class"),
        ("short.txt", "1\n2\n3\n4\n5\n", "one weight per class"),
        ("negative.txt", "1\n-2\n3\n4\n", "for class 1: weights must be finite and >= 0"),
        ("nan.json", "[1, NaN, 3, 4]", "must be finite"),
        ("zeros.json", "[0, 0, 0, 0]", "only zero weights"),
        ("words.txt", "1\n2\nheavy\n4\n", "line 3: 'heavy' is not a number"),
        ("broken.json", "[1, 2,", "cannot parse"),
        ("missing.json", '{"0": 1, "1": 1, "3": 1}', r"missing class ids \[2\]"),
        ("nested.json", "[[1, 2], [3, 4]]", "cannot parse"),
    ],
)
def test_bad_weights_file_raises_naming_file_and_fix(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))) as error:
        MeanAveragePrecisionAtK(num_classes=4, class_weights=str(path))
    assert re.search(message, str(error.value)), str(error.value)


def test_missing_weights_file_raises(tmp_path):
    with pytest.raises(ValueError, match="cannot read .*nope.json"):
        load_class_weights(str(tmp_path / "nope.json"), 4)
