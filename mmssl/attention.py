"""Self-attention for every timm transformer block mmssl builds (ViT backbones, the MAE decoder, the iGPT
sequence model): timm's ``Attention`` parameters and state-dict keys, with the attention product chosen by
device and dtype. torch's fused ``scaled_dot_product_attention`` (flash attention on GPU) everywhere except
in bf16 on CPU, where torch's CPU flash kernel is the slow part of a step (its backward most of all) and
explicit batched matmuls with a softmax are 1.1-2.7x faster (the measurements below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor

# Score elements (batch x heads x queries x keys) per chunk of ``explicit_attention``: 2**20 bf16 scores are
# 2 MiB, the size of this CPU's L2 (2 x 1 MiB), so a chunk's scores stay in cache from the matmul through the
# softmax to the product with the values. Measured (fwd + bwd, bf16, 1 thread, AMD EPYC with AVX-512 BF16,
# 2026-12-02, ms; flash = torch's CPU flash kernel; chunk 2**18 / 2**20 / 2**22 / unchunked):
#   B4  H8 L256  d16:  flash 12.4  explicit  8.6 /  7.9 /   9.4 /  9.9
#   B16 H8 L256  d16:  flash 50.3  explicit 26.9 / 20.3 /  33.8 /  31.5
#   B64 H8 L256  d16:  flash 197   explicit 89.3 / 72.2 / 108   / 196
#   B16 H8 L256  d64:  flash 90.7  explicit 35.0 / 34.0 /  32.7 /  38.0
#   B2  H8 L1024 d16:  flash 38.6  explicit 30.0 / 37.5 /  31.1 /  85.9   (one (batch, head) row per chunk)
#   B4  H8 L1024 d64:  flash 185   explicit 101  / 97.6 / 126   / 211
# In fp32 flash stays ahead (B4 H8 L256 d16: 7.6 vs 13.5; B2 H8 L1024 d16: 46.5 vs 68.2), so fp32 keeps it.
# Splitting causal queries in two halves (chunk 2**20, same runs, one unsplit / split): B4 H8 L256 d16 8.9 / 6.2,
# B16 H8 L256 d16 28.3 / 20.8, B2 H8 L1024 d16 47.6 / 33.6, B4 H8 L1024 d64 113 / 101.
# Whole timm ViT blocks (fwd + bwd, bf16 autocast, 2 threads, 2026-12-03, ms, flash / explicit): MAE ViT-B
# encoder block B8 L50 D768 H12 43.0 / 37.8, MAE decoder block B8 L197 D512 H16 84.6 / 59.9; in fp32 101.2 / 103.2
# and 181.5 / 184.9. The MAE ViT-B/16 bf16 training step went from 1.156 to 1.007 s (transformers' ViTMAE 1.123).
EXPLICIT_CHUNK = 2**20


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(hd), causal mask) v for (B, H, Lq, hd) queries and (B, H, Lk, hd) keys and values,
    what ``F.scaled_dot_product_attention(q, k, v, is_causal=causal)`` computes (a causal mask aligned at the
    top left). bf16 on CPU takes ``explicit_attention`` (the measurements above ``EXPLICIT_CHUNK``);
    everything else SDPA."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return explicit_attention(q, k, v, causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    chunk: int = EXPLICIT_CHUNK,
    mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """``attention`` as batched matmuls and a softmax, over groups of (batch, head) rows holding at most
    ``chunk`` scores (at least one row). Scale and mask ride in the first product (``baddbmm``: alpha = the
    scale, the mask an additive -inf bias), so no extra pass over the scores forward or backward. Causal: the
    first half of the queries is multiplied with the first half of the keys only (the rest is masked anyway),
    a quarter of the score work saved (1.1-1.45x on this attention, measured beside ``EXPLICIT_CHUNK``). The
    scores are rounded to the inputs' dtype before the softmax, as an unfused bf16 attention (timm's
    non-fused path, transformers' eager ImageGPT under autocast) does; the softmax accumulates in fp32.

    ``mask`` (broadcastable to (B, H, Lq, Lk); boolean, True where a query may attend, or an additive float bias)
    replaces ``causal``, as SDPA's ``attn_mask``; a boolean one masks with the dtype's lowest value rather than
    -inf, as transformers' eager attention does, so a query that may attend nowhere (left padding) averages
    the values instead of turning into NaN. ``scale`` defaults to 1 / sqrt(hd)."""
    B, H, Lq, hd = q.shape
    Lk = k.shape[2]
    q, k, v = q.reshape(B * H, Lq, hd), k.reshape(B * H, Lk, hd), v.reshape(B * H, Lk, hd)
    causal = causal and mask is None
    # (first query, end query, keys seen): causal query i sees keys 0..i
    blocks = [(0, Lq // 2, min(Lq // 2, Lk)), (Lq // 2, Lq, Lk)] if causal and Lq > 1 else [(0, Lq, Lk)]
    rows = max(1, chunk // (Lq * Lk))
    if mask is not None:  # one bias per (batch, head) row, split with the rows below
        if mask.dtype == torch.bool:
            mask = torch.zeros((), dtype=q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
        full = mask.to(q.dtype).expand(B, H, Lq, Lk).reshape(B * H, Lq, Lk)
        per_chunk = [[c] for c in full.split(rows)]
    else:  # the same biases for every chunk
        biases = [q.new_zeros(b - a, n) for a, b, n in blocks]
        if causal:
            for (a, _, _), bias in zip(blocks, biases, strict=True):
                bias.fill_(float("-inf")).triu_(a + 1)
        per_chunk = [biases] * -(-B * H // rows)
    alpha = hd**-0.5 if scale is None else scale
    out = []
    for qc, kc, vc, chunk_biases in zip(q.split(rows), k.split(rows), v.split(rows), per_chunk, strict=True):
        for (a, b, n), bias in zip(blocks, chunk_biases, strict=True):
            p = torch.baddbmm(bias, qc[:, a:b], kc[:, :n].transpose(1, 2), alpha=alpha).softmax(-1)
            out.append(torch.bmm(p, vc[:, :n]))  # (rows, b - a, hd)
    blocked = [torch.cat(out[i : i + len(blocks)], 1) for i in range(0, len(out), len(blocks))]
    return torch.cat(blocked).view(B, H, Lq, hd)


class SelfAttention(Attention):
    """timm's ``Attention`` (the same parameters and state-dict keys, so weights move to and from
    ``timm.create_model`` unchanged) whose product is :func:`attention`. With an attention mask or attention
    dropout it calls SDPA with them, as timm's fused path does; q/k norms, the output norm and the sigmoid
    gate are timm's."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop.p if self.training else 0.0
        if attn_mask is None and dropout == 0.0:
            x = attention(q, k, v, is_causal)
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal
            )
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def use_self_attention(module: torch.nn.Module) -> int:
    """Give every timm ``Attention`` inside ``module`` (a model from ``timm.create_model``) the product of
    :class:`SelfAttention`, in place; parameters, buffers and state-dict keys stay as they are. Only modules
    of exactly timm's class change (subclasses such as differential or RoPE attention compute something
    else). Returns how many changed."""
    changed = 0
    for m in module.modules():
        if type(m) is Attention:
            m.__class__ = SelfAttention
            changed += 1
    return changed
