"""Mixup and CutMix (data/mixing.py): the mixed targets sum to 1 and carry the mixed pixels' share."""

import pytest
import torch

from xception_pl.data.mixing import CutMix, Mixup, target_vectors


def constant_images(batch: int = 6, size: int = 32) -> torch.Tensor:
    """Image i is filled with the value i: a pixel says which image it came from."""
    return torch.arange(batch, dtype=torch.float)[:, None, None, None].expand(batch, 3, size, size).clone()


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_targets_are_the_area_each_image_keeps(seed):
    torch.manual_seed(seed)
    images, labels = constant_images(), torch.tensor([0, 1, 2, 3, 4, 5])
    mixed, targets = CutMix(alpha=1.0)(images, target_vectors(labels, 6, multilabel=False))
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    for i in range(6):
        own = (mixed[i] == i).float().mean()  # the pixels still image i's
        torch.testing.assert_close(targets[i, i], own)
        torch.testing.assert_close(targets[i, 5 - i], 1 - own)  # the rest: its partner's, the batch reversed
        assert ((mixed[i] == i) | (mixed[i] == 5 - i)).all()
    box = (mixed[0] != 0).all(0)  # one rectangle: its bounding box is all pasted
    rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
    if len(rows):
        assert box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_mixup_mixes_pixels_and_targets_at_one_ratio():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 8, 8)
    mixed, targets = Mixup(alpha=0.2)(images, target_vectors(torch.tensor([1, 0, 2, 2]), 3, multilabel=False))
    lam = float(targets[0, 1])  # image 0 (class 1) mixed with image 3 (class 2)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    torch.testing.assert_close(targets, torch.tensor([[0, lam, 1 - lam], [lam, 0, 1 - lam], [1 - lam, 0, lam],
                                                      [0, 1 - lam, lam]]))
    torch.testing.assert_close(targets.sum(1), torch.ones(4))


def test_multilabel_vectors_mix_and_a_shared_label_keeps_weight_one():
    torch.manual_seed(1)
    hot = torch.tensor([[1.0, 1, 0, 0], [0, 1, 0, 1]])
    _, targets = Mixup(alpha=1.0)(torch.randn(2, 3, 8, 8), target_vectors(hot, 4, multilabel=True))
    lam = float(targets[0, 0])
    torch.testing.assert_close(targets, torch.tensor([[lam, 1, 0, 1 - lam], [1 - lam, 1, 0, lam]]))


def test_p_zero_leaves_the_batch_and_bad_arguments_are_refused():
    images, targets = torch.randn(2, 3, 8, 8), torch.eye(2)
    assert CutMix(p=0.0)(images, targets) == (images, targets)
    with pytest.raises(ValueError, match=r"Mixup\(alpha=0, p=1.0\): alpha must be > 0"):
        Mixup(alpha=0)
