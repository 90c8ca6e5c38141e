"""Pure tensor functions shared by the objectives: patchify, sin-cos embeddings, masking, token gather.

Layouts follow the MAE reference code (facebookresearch/mae, ``models_mae.py`` and ``util/pos_embed.py``) so
that weights and targets are interchangeable with it and with ``transformers``' ViTMAE.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in raster order, each laid out (p, q, c) as in MAE."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); the inverse of :func:`patchify`."""
    h, w = grid
    return rearrange(
        patches, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=patch_size, q=patch_size, c=channels
    )


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(N,) positions -> (N, dim) as [sin(pos * omega), cos(pos * omega)], omega = 1 / 10000^(2i/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE util/pos_embed.py) -> (1, prefix + h*w, dim), float32.

    Half the channels encode the column and half the row; like the reference, the first half uses the
    *column* index (it builds ``np.meshgrid(grid_w, grid_h)`` and embeds ``grid[0]`` first).
    Prefix tokens (CLS) get zeros.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dim must be divisible by 4, got {dim}")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    emb = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=emb.dtype), emb])
    return emb.float().unsqueeze(0)


def random_masking(noise: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by argsort of noise (MAE §3, ``random_masking`` in models_mae.py).

    noise: (B, L) uniform noise; small values are kept. Returns
    ids_keep (B, L_keep), ids_restore (B, L) and mask (B, L) with 1 = masked (removed), 0 = visible.
    """
    B, L = noise.shape
    len_keep = int(L * (1 - mask_ratio))  # the reference truncates, e.g. 196 * 0.25 -> 49
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(B, L, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """tokens (B, L, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
