"""Pure loss functions."""

from __future__ import annotations

from torch import Tensor


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error per patch, averaged over masked patches only (MAE §3: "loss only on masked patches").

    pred, target: (B, L, D); mask: (B, L) with 1 = masked. Computed in fp32.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()
