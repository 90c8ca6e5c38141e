"""Analytic FLOP counts of transformer forward passes, for the MFU that ``throughput.py`` logs.

How counting works: one multiply-accumulate is 2 FLOPs, and only matrix products count (linear layers,
convolutions, attention scores and values), as ``torch.utils.flop_counter.FlopCounterMode`` and the usual MFU
accounting (PaLM, Appendix B; nanoGPT ``estimate_mfu``) do. Norms, activations, softmax, embedding lookups and
the element-wise work of targets and losses are left out: they are a few percent of a ViT and not what the
peak-FLOPs figure of a GPU measures. Per transformer block on ``N`` tokens of width ``D``, attention width
``A`` (= D in timm's ViTs) and MLP width ``H`` (timm: ``int(mlp_ratio * D)``):

* q, k, v and output projections: 2 x (3 D A + A D) N  (= 2 x 4 N D^2 when A = D)
* attention scores Q K^T and the weighted values: 2 x 2 N^2 A, counted in full even when causal (as the flop
  counter and nanoGPT do, although a causal kernel may skip half)
* MLP: 2 x 2 N D H

A training step costs 3x its forward (the backward computes gradients for inputs and weights: 2x), the
convention of Kaplan et al. 2020 §2.1 and PaLM's MFU; parts without gradients (a frozen encoder, a
no-grad target) would cost 1x, and the patch embedding needs no input gradient, so this slightly overcounts
(well under 1% for a ViT). Objectives expose their count through an optional ``flops_per_sample()`` (see
``objectives/base.py``); the tests check the forward counts against ``FlopCounterMode``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

TRAIN_PER_FORWARD = 3  # forward + backward (2x forward): Kaplan et al. 2020 §2.1, PaLM Appendix B


def linear_flops(tokens: int, in_dim: int, out_dim: int) -> int:
    """A linear layer (or a patch-embedding convolution seen as one) applied to ``tokens`` vectors."""
    return 2 * tokens * in_dim * out_dim


def attention_flops(tokens: int, attn_dim: int) -> int:
    """Q K^T and A V over all heads: 2 x 2 N^2 A."""
    return 2 * 2 * tokens * tokens * attn_dim


def linears_flops(tokens: int, module: nn.Module) -> int:
    """Every ``nn.Linear`` inside ``module`` applied to ``tokens`` vectors."""
    return sum(
        linear_flops(tokens, m.in_features, m.out_features)
        for m in module.modules()
        if isinstance(m, nn.Linear)
    )


def blocks_flops(tokens: int, blocks: Iterable[nn.Module]) -> int:
    """timm ``Block`` modules on ``tokens`` tokens each: their linear layers (qkv, proj, MLP) plus attention;
    widths are read from the layers, so any ``mlp_ratio`` or head size counts right."""
    return sum(
        linears_flops(tokens, b) + attention_flops(tokens, b.attn.qkv.out_features // 3) for b in blocks
    )
