"""Pixel targets for MAE (He et al. 2021, §3): each masked patch's pixels, normalised per patch by default."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mmssl.ops import patchify, unpatchify


class PixelTarget(nn.Module):
    """(B, C, H, W) -> (B, L, p*p*C) in MAE's (p, q, c) patch layout.

    With ``normalize`` each patch is standardised by its own mean and (unbiased) variance with eps 1e-6,
    exactly as ``forward_loss`` with ``norm_pix_loss=True`` in the reference; MAE §3 reports it improves
    representations. The target is taken from the network input (normalised images), like the reference.
    """

    def __init__(self, patch_size: int, channels: int = 3, normalize: bool = True, eps: float = 1e-6):
        super().__init__()
        self.patch_size, self.channels, self.normalize, self.eps = patch_size, channels, normalize, eps
        self.out_dim = patch_size * patch_size * channels

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        with torch.autocast(images.device.type, enabled=False):
            patches = patchify(images.float(), self.patch_size)
            if not self.normalize:
                return patches
            mean = patches.mean(dim=-1, keepdim=True)
            var = patches.var(dim=-1, keepdim=True)
            return (patches - mean) / (var + self.eps) ** 0.5

    @torch.no_grad()
    def picture(self, images: Tensor, pred: Tensor, mask: Tensor, denormalize: Callable) -> dict[str, Tensor]:
        """[0, 1] images for original | masked | reconstruction, the paper's Figure 2 layout.

        Normalised predictions are mapped back with each patch's true mean and variance (the loss never sees
        them; this is only for looking). Visible patches in the reconstruction are the originals.
        """
        patches = patchify(images.float(), self.patch_size)
        pred = pred.float()
        if self.normalize:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + self.eps) ** 0.5
            pred = pred * std + mean
        m = mask.unsqueeze(-1)  # (B, L, 1), 1 = masked
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)

        def image(p: Tensor) -> Tensor:
            return unpatchify(p, self.patch_size, grid, self.channels)

        visible = image((1 - m).expand_as(patches))  # (B, C, H, W): 1 on visible pixels
        return {
            "original": denormalize(images),
            "masked": denormalize(images) * visible,  # masked patches drawn black
            # with normalised targets the prediction only carries each patch's shape: say where colour comes from
            ("recon. (true patch μ/σ)" if self.normalize else "reconstruction"): denormalize(
                image(patches * (1 - m) + pred * m)
            ),
        }
