"""Is a masked-modelling model (MAE, MaskFeat) better than guessing? Its held-out masked-patch MSE beside two
baselines that need no model (issue 14 item 10):

* *best constant*: the per-dimension mean of the masked patches' targets over the whole set, the best any
  prediction can do that ignores the image (its MSE is the targets' per-dimension variance). A model that only
  learned the dataset's mean HOG or pixel stops here.
* *nearest visible copy*: every masked patch takes the target of the visible patch nearest to it on the patch
  grid (Euclidean distance between patch centres; the mean of the equally near ones), the simplest use of
  context. Beating it means the model predicts more than "the texture next door continues".

Also reported: predicting zeros (the raw scale of the targets). All in float64, streamed over batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from mmssl.objectives.masked import MaskedModeling


def nearest_visible_copy(target: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """target (B, L, D), mask (B, L) with 1 = masked, patches in raster order of ``grid`` -> (B, L, D): each
    patch gets the mean target of the visible patches nearest to it (a visible patch: its own target).
    An image with no visible patch gets zeros."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).to(target.device, torch.float64)  # (L, 2)
    dist = torch.cdist(centres, centres)  # (L, L)
    dist = dist.expand(len(mask), -1, -1).masked_fill(mask.bool()[:, None, :], float("inf"))  # (B, L, L)
    nearest = (dist == dist.amin(dim=2, keepdim=True)) & dist.isfinite()  # (B, L, L): ties all count
    weights = nearest.to(target.dtype)
    weights = weights / weights.sum(dim=2, keepdim=True).clamp_min(1)
    return weights @ target  # (B, L, D)


class MaskedBaselines:
    """Accumulates (target, prediction, mask) batches; :meth:`compute` gives the MSE per masked element of the
    model, the best constant, the nearest visible copy and zeros, and ``patches``, the masked patch count."""

    def __init__(self) -> None:
        self.n = 0  # masked patches
        self.sums: dict[str, Tensor | float] = {"model": 0.0, "copy": 0.0, "zeros": 0.0}
        self.first = self.second = None  # per-dimension sum and sum of squares of the masked targets

    @torch.no_grad()
    def update(self, target: Tensor, pred: Tensor, mask: Tensor, grid: tuple[int, int]) -> None:
        target, pred = target.double(), pred.double()  # (B, L, D)
        m = mask.bool()  # (B, L)
        copy = nearest_visible_copy(target, mask, grid)
        masked = target[m]  # (N, D)
        self.n += len(masked)
        self.sums["model"] += (pred[m] - masked).square().sum().item()
        self.sums["copy"] += (copy[m] - masked).square().sum().item()
        self.sums["zeros"] += masked.square().sum().item()
        first, second = masked.sum(dim=0), masked.square().sum(dim=0)  # (D,)
        self.first = first if self.first is None else self.first + first
        self.second = second if self.second is None else self.second + second

    def compute(self) -> dict[str, float]:
        if not self.n:
            raise ValueError("MaskedBaselines: no masked patch was seen")
        elements = self.n * len(self.first)
        mean = self.first / self.n  # (D,): the best constant
        constant = (self.second - self.n * mean.square()).sum().item()  # sum of squared deviations from it
        report = {k: v / elements for k, v in self.sums.items()}
        return {**report, "constant": constant / elements, "patches": self.n}


def reports_on(objective: nn.Module) -> bool:
    """Whether :func:`masked_report` applies: a masked-modelling objective (MAE, MaskFeat)."""
    return isinstance(objective, MaskedModeling)


@torch.no_grad()
def masked_report(
    objective: nn.Module, batches: Iterable[dict[str, Tensor]], generator: torch.Generator
) -> dict[str, float]:
    """A :class:`~mmssl.objectives.masked.MaskedModeling` objective in eval mode over ``batches``, masks drawn
    from ``generator`` (never the global one), against the baselines. Adds ``below_constant`` and
    ``below_copy``: how far below each baseline the model's loss is, as a fraction (0.15 = 15 % below)."""
    was_training = objective.training
    objective.eval()
    acc = MaskedBaselines()
    grid = objective.backbone.grid_size
    try:
        for batch in batches:
            out = objective(batch, generator=generator)
            acc.update(objective.target(batch["image"]), out["pred"], out["mask"], grid)
    finally:
        objective.train(was_training)
    report = acc.compute()
    report["below_constant"] = 1 - report["model"] / report["constant"]
    report["below_copy"] = 1 - report["model"] / report["copy"]
    return report
