"""Pure tensor functions shared by the objectives: patchify, sin-cos embeddings, masking, token gather.

Layouts follow the MAE reference code (facebookresearch/mae, ``models_mae.py`` and ``util/pos_embed.py``) so
that weights and targets are interchangeable with it and with ``transformers``' ViTMAE.
"""

from __future__ import annotations

import math
import random

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


def block_masking(
    batch_size: int,
    grid: tuple[int, int],
    num_masked: int,
    min_block: int = 16,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> Tensor:
    """Block-wise masking (BEiT §2.5, ``beit/masking_generator.py``; MaskFeat §4.1 for images) -> (B, h*w) float,
    1 = masked, patches in raster order.

    Rectangles are added until ``num_masked`` patches are covered: each block draws an area uniformly in
    [``min_block``, remaining] (capped by ``max_block``), a log-uniform aspect ratio in
    [``min_aspect``, 1 / ``min_aspect``], and a random position; it is accepted only if it covers at least one
    new patch and no more new patches than remain, else it is redrawn (up to ``attempts`` times, after which
    the reference stops short). So a mask never exceeds ``num_masked`` and may stop less than one block
    short of it. Deterministic given ``generator`` (on any device; torch's global CPU RNG when None).
    """
    h, w = grid
    if not 0 <= num_masked <= h * w:
        raise ValueError(f"block_masking: num_masked={num_masked} outside [0, {h * w}] for a {h}x{w} grid")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"block_masking: min_aspect must be in (0, 1], got {min_aspect}")
    max_block = num_masked if max_block is None else max_block
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    # One integer from the torch generator seeds Python's RNG: the per-block draws are scalar and many, and
    # torch's per-call overhead would dominate; the mask still follows torch's seeding (lit.py's step seed).
    device = generator.device if generator is not None else None
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator, device=device)))
    masks = []
    for _ in range(batch_size):
        mask = [[0] * w for _ in range(h)]
        count = 0
        while count < num_masked:
            added = _add_block(mask, rng, min_block, min(num_masked - count, max_block), log_aspect, attempts)
            if added == 0:
                break
            count += added
        masks.append(mask)
    return torch.tensor(masks, dtype=torch.float32).reshape(batch_size, h * w)


def _add_block(
    mask: list[list[int]],
    rng: random.Random,
    min_block: int,
    max_new: int,
    log_aspect: tuple[float, float],
    attempts: int,
) -> int:
    """One block of :func:`block_masking`, drawn in place; returns the number of newly masked patches."""
    h, w = len(mask), len(mask[0])
    for _ in range(attempts):
        area = rng.uniform(min_block, max_new)
        aspect = math.exp(rng.uniform(*log_aspect))
        bh = int(round(math.sqrt(area * aspect)))
        bw = int(round(math.sqrt(area / aspect)))
        if bw < w and bh < h:  # strict, as in the reference: a block never spans the whole grid side
            top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
            new = bh * bw - sum(sum(row[left : left + bw]) for row in mask[top : top + bh])
            if 0 < new <= max_new:
                for row in mask[top : top + bh]:
                    row[left : left + bw] = [1] * bw
                return new
    return 0
