"""mmssl/attention.py: the explicit bf16-on-CPU attention against torch's ``F.scaled_dot_product_attention``
(an independent implementation), values and gradients; ``SelfAttention`` against timm's own ``Attention``
with the same weights (fused and unfused, masks, dropout, gates, q/k norms); and which models take it."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

import mmssl.attention as A
from mmssl.attention import SelfAttention, attention, explicit_attention, use_self_attention
from mmssl.backbones import create_backbone
from mmssl.heads import MAEDecoder


def qkv(B, H, Lq, Lk, hd, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, hd, generator=g, dtype=dtype).requires_grad_() for L in (Lq, Lk, Lk)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "chunk", [1, 3 * 24 * 24, 2**20]
)  # one row per chunk, 3 rows (uneven split), one chunk
def test_explicit_attention_equals_sdpa_with_gradients(causal, chunk):
    q, k, v = qkv(2, 4, 24, 24, 16)
    grad = torch.randn(2, 4, 24, 16)
    ours = explicit_attention(q, k, v, causal, chunk=chunk)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g_ours = torch.autograd.grad(ours, (q, k, v), grad)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("Lq", "Lk"), [(1, 9), (5, 9), (9, 3), (7, 7)])
def test_explicit_attention_with_unequal_or_odd_lengths_equals_sdpa(causal, Lq, Lk):
    """One new position against cached keys (``decode``), a block of queries, more queries than keys (the causal
    mask aligned at the top left, as SDPA's), odd lengths (uneven causal query blocks)."""
    q, k, v = qkv(3, 2, Lq, Lk, 8, seed=Lq)
    torch.testing.assert_close(
        explicit_attention(q, k, v, causal, chunk=Lq * Lk),
        F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("chunk", [1, 2**20])
def test_explicit_attention_with_a_mask_and_scale_equals_sdpa(kind, chunk):
    """A per-batch padding mask on top of a causal one (what transformers builds for SDPA, shape (B, 1, L, L)),
    boolean or additive, and a scale of the caller's, values and gradients."""
    q, k, v = qkv(3, 2, 10, 10, 8, seed=3)
    keep = (
        torch.ones(10, 10, dtype=torch.bool).tril()
        & (torch.arange(10) < torch.tensor([[10], [7], [4]]))[:, None, None, :]
    )  # (3, 1, 10, 10): sample 1 has 7 real tokens, sample 2 has 4
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    ours = explicit_attention(q, k, v, False, chunk=chunk, mask=mask, scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(ref)
    for a, b in zip(
        torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_query_that_may_attend_nowhere_averages_instead_of_nan():
    q, k, v = qkv(1, 1, 4, 4, 8, seed=4)
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    keep[..., 0, :] = False  # e.g. a left-padding position
    out = explicit_attention(q, k, v, False, mask=keep)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 0], v[0, 0].mean(0))


def test_bf16_on_cpu_takes_the_explicit_path_and_is_as_close_to_fp32_as_sdpa():
    q, k, v = qkv(4, 8, 64, 64, 16)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    fp32 = attention(q, k, v, True)  # fp32: torch's SDPA, bit for bit
    assert torch.equal(fp32, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    ours = attention(qb, kb, vb, True)
    assert torch.equal(ours, explicit_attention(qb, kb, vb, True))
    sdpa = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
    err_ours, err_sdpa = ((x.double() - exact).abs().mean().item() for x in (ours, sdpa))
    assert err_ours < 2 * err_sdpa  # bf16 rounding of the scores; a wrong mask or scale would be ~100x


def timm_twin(attn: SelfAttention, fused: bool) -> Attention:
    """timm's Attention with ``attn``'s weights, its fused (SDPA) or unfused (matmul + softmax) path."""
    ref = Attention.__new__(Attention)
    ref.__dict__ = {**attn.__dict__, "_modules": dict(attn._modules)}
    ref.fused_attn = fused
    return ref


def make(dim=64, heads=4, **kwargs) -> SelfAttention:
    torch.manual_seed(0)
    norm = partial(nn.LayerNorm, eps=1e-6)
    return SelfAttention(dim, heads, qkv_bias=True, norm_layer=norm, **kwargs)


@pytest.mark.parametrize(
    "kwargs", [{}, {"qk_norm": True, "scale_norm": True, "gated": True}], ids=["plain", "norms+gate"]
)
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_equals_timm_attention_in_fp32_and_bf16(kwargs, causal):
    """fp32: exactly timm's fused path (both SDPA). bf16 autocast on CPU: our explicit product against timm's
    unfused one (the same bf16 roundings but for where the scale is applied), within bf16 precision, and the
    input gradients too."""
    attn = make(**kwargs)
    x = torch.randn(3, 20, 64, requires_grad=True)
    ours = attn(x, is_causal=causal)
    assert torch.equal(ours, timm_twin(attn, fused=True)(x, is_causal=causal))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = attn(x, is_causal=causal).float()
        ref = timm_twin(attn, fused=False)(x, is_causal=causal).float()
    torch.testing.assert_close(ours, ref, rtol=0, atol=3e-2 * ref.abs().max().item())
    (g_ours,) = torch.autograd.grad(ours.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert (g_ours - g_ref).norm() / g_ref.norm() < 0.05


def test_self_attention_with_a_mask_or_dropout_is_timms_sdpa(monkeypatch):
    """An attention mask or attention dropout goes to SDPA with them, as timm's fused path: identical
    outputs (dropout under the same seed), and the explicit path is not taken even in bf16."""
    attn = make(attn_drop=0.25)
    ref = timm_twin(attn, fused=True)
    x = torch.randn(2, 10, 64)
    mask = torch.rand(10, 10) > 0.3
    mask.fill_diagonal_(True)
    attn.eval(), ref.eval()
    assert torch.equal(attn(x, attn_mask=mask), ref(x, attn_mask=mask))
    attn.train(), ref.train()
    torch.manual_seed(5)
    ours = attn(x)
    torch.manual_seed(5)
    assert torch.equal(ours, ref(x))
    monkeypatch.setattr(A, "explicit_attention", None)  # would raise if called
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x)
        attn.eval()
        attn(x, attn_mask=mask)


def test_vit_backbones_and_the_mae_decoder_take_it_and_keep_timms_weights(monkeypatch):
    """Every attention layer of a ViT backbone and of the MAE decoder is a SelfAttention; the backbone's state
    dict still loads into a plain timm model, which then gives the same features; in bf16 on CPU the explicit
    product runs."""
    backbone = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    decoder = MAEDecoder(192, (4, 4), 192, embed_dim=64, depth=2, num_heads=4)
    for model in (backbone, decoder):
        kinds = {type(m) for m in model.modules() if isinstance(m, Attention)}
        assert kinds == {SelfAttention}
    plain = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2
    )
    assert not any(isinstance(m, SelfAttention) for m in plain.modules())
    plain.load_state_dict(backbone.model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone.model(images), plain(images), rtol=1e-5, atol=1e-5)

    calls = []
    monkeypatch.setattr(A, "explicit_attention", lambda *a: calls.append(1) or F.scaled_dot_product_attention(
        *a[:3], is_causal=a[3]))  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        backbone.forward_tokens(images)
    assert len(calls) == 2  # one per block


def test_use_self_attention_changes_only_timms_own_class():
    class Rope(Attention):  # a subclass computes something else: left alone
        pass

    model = nn.Sequential(Attention(32, 4), Rope(32, 4), nn.Linear(32, 32))
    keys = list(model.state_dict())
    assert use_self_attention(model) == 1
    assert type(model[0]) is SelfAttention and type(model[1]) is Rope
    assert list(model.state_dict()) == keys
