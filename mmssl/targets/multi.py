"""Several targets predicted at once (MaskFeat, Wei et al. 2022, Table 13: pixel colours + HOG, "two separate
linear heads", the losses summed).

The targets are concatenated along the feature axis, so the masked-modelling head that maps every token to
``out_dim`` values is one linear head per target side by side (the rows of one ``nn.Linear`` are independent);
the loss is the sum over targets of each one's masked MSE (its own mean over its own feature size), not one MSE
over the concatenation, which would weigh a target by its width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mmssl.losses import masked_mse


class MultiTarget(nn.Module):
    """name -> target module (each ``(B, 3, H, W) -> (B, L, D_i)`` with ``out_dim``); ``(B, L, sum D_i)`` out."""

    def __init__(self, targets: dict[str, nn.Module]):
        super().__init__()
        if not targets:
            raise ValueError("MultiTarget needs at least one target")
        self.targets = nn.ModuleDict(targets)
        self.dims = [t.out_dim for t in targets.values()]
        self.out_dim = sum(self.dims)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return torch.cat([t(images).float() for t in self.targets.values()], dim=-1)  # (B, L, sum D_i)

    def losses(self, pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """name -> masked MSE of that target's slice of ``pred`` and ``target`` (B, L, sum D_i); mask (B, L)."""
        pairs = zip(pred.split(self.dims, dim=-1), target.split(self.dims, dim=-1), strict=True)
        return {name: masked_mse(p, t, mask) for name, (p, t) in zip(self.targets, pairs, strict=True)}

    @torch.no_grad()
    def picture(self, images: Tensor, pred: Tensor, mask: Tensor, denormalize: Callable) -> dict[str, Tensor]:
        pictures = {}
        for (name, target), p in zip(self.targets.items(), pred.split(self.dims, dim=-1), strict=True):
            drawn = target.picture(images, p, mask, denormalize)
            pictures.update({f"{name}: {key}": value for key, value in drawn.items()})
        return pictures
