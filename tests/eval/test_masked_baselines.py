"""The masked-modelling baselines of ``mmssl.eval.masked``: the nearest visible copy on hand-made grids, and the
best constant equal to the targets' per-dimension variance computed directly (numpy, all batches at once)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmssl.eval.masked import MaskedBaselines, nearest_visible_copy


def test_nearest_visible_copy_takes_the_nearest_and_averages_ties():
    # 3x3 grid, one image; values = patch index. Masked: the centre (4) and the top-left corner (0).
    target = torch.arange(9, dtype=torch.float64).view(1, 9, 1)
    mask = torch.zeros(1, 9)
    mask[0, [0, 4]] = 1
    copy = nearest_visible_copy(target, mask, (3, 3))[0, :, 0]
    assert copy[0] == pytest.approx((1 + 3) / 2)  # right and below, both at distance 1
    assert copy[4] == pytest.approx((1 + 3 + 5 + 7) / 4)  # the four edge neighbours at distance 1
    visible = [i for i in range(9) if i not in (0, 4)]
    assert copy[visible].tolist() == [float(i) for i in visible]  # visible patches keep their own
    # a masked patch with no visible neighbour at distance 1 reaches further: mask all but the corner 8
    mask = torch.ones(1, 9)
    mask[0, 8] = 0
    assert nearest_visible_copy(target, mask, (3, 3))[0, :, 0].tolist() == [8.0] * 9


def test_nearest_visible_copy_is_per_image_on_a_non_square_grid():
    target = torch.randn(2, 6, 3, dtype=torch.float64)  # 2x3 grid
    mask = torch.tensor([[1, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    copy = nearest_visible_copy(target, mask, (2, 3))
    torch.testing.assert_close(copy[0], target[0, 1].expand(6, 3))  # the only visible patch of image 0
    torch.testing.assert_close(copy[1], target[1, 0].expand(6, 3))


def test_baselines_match_a_direct_computation_over_all_batches():
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        target = torch.rand(4, 16, 5, generator=gen)
        pred = torch.rand(4, 16, 5, generator=gen)
        mask = (torch.rand(4, 16, generator=gen) < 0.4).float()
        batches.append((target, pred, mask))
    acc = MaskedBaselines()
    for t, p, m in batches:
        acc.update(t, p, m, (4, 4))
    report = acc.compute()
    masked = np.concatenate([t[m.bool()].numpy() for t, _, m in batches]).astype(np.float64)
    preds = np.concatenate([p[m.bool()].numpy() for _, p, m in batches]).astype(np.float64)
    assert report["patches"] == len(masked)
    assert report["constant"] == pytest.approx(masked.var(axis=0).mean(), rel=1e-12)
    assert report["model"] == pytest.approx(((preds - masked) ** 2).mean(), rel=1e-12)
    assert report["zeros"] == pytest.approx((masked**2).mean(), rel=1e-12)
    # the constant is the best fixed prediction: the mean beats it nudged either way
    for nudge in (-0.01, 0.01):
        assert ((masked - masked.mean(axis=0) - nudge) ** 2).mean() > report["constant"]


def test_no_masked_patch_is_an_error():
    with pytest.raises(ValueError, match="no masked patch"):
        MaskedBaselines().compute()
