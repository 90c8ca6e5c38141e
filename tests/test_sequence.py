"""The sequence transformer's attention (mmssl/sequence.py): the explicit bf16-on-CPU path against torch's
``F.scaled_dot_product_attention`` (an independent implementation), values and gradients, and the model's
outputs with either path. The model has no padding mask (every sequence is full length), so there is none to
test; the causal mask and the unmasked (BERT, one-token decoding) cases are."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmssl.sequence as S
from mmssl.sequence import SequenceTransformer, attention, explicit_attention


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


def sdpa_everywhere(monkeypatch):
    monkeypatch.setattr(S, "explicit_attention", lambda q, k, v, causal: F.scaled_dot_product_attention(
        q, k, v, is_causal=causal))  # fmt: skip


@pytest.mark.parametrize("causal", [True, False])
def test_model_step_in_bf16_autocast_matches_the_sdpa_model(causal, monkeypatch):
    """A training step under bf16 autocast through the explicit path against the same model on torch's SDPA:
    the logits and every gradient agree to bf16 precision."""
    torch.manual_seed(0)
    model = SequenceTransformer(16, 64, 64, 2, 4, causal=causal)
    torch.nn.init.normal_(model.head.weight, std=0.02)
    ids = torch.randint(0, 16, (3, 64))

    def step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids).float()
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        return logits, {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = step()
    sdpa_everywhere(monkeypatch)
    ref_logits, ref_grads = step()
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-2 * ref_logits.abs().max().item())
    for n, g in grads.items():
        rel = (g - ref_grads[n]).norm() / ref_grads[n].norm()
        assert rel < 0.05, f"{n}: relative gradient difference {rel:.3f}"


def test_cached_decoding_in_bf16_autocast_matches_the_full_pass():
    """``decode`` (a causal prefix pass, then one position at a time against the cache) under bf16 autocast
    gives the full forward's logits."""
    torch.manual_seed(1)
    model = SequenceTransformer(8, 32, 64, 2, 4, causal=True).eval()
    torch.nn.init.normal_(model.head.weight, std=0.05)
    ids = torch.randint(0, 8, (2, 32))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids).float()
        logits, cache = model.decode(ids[:, :20], 0)
        steps = [logits.float()]
        for t in range(20, 32):
            logits, cache = model.decode(ids[:, : t + 1], t, cache)
            steps.append(logits.float())
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=2e-2 * full.abs().max().item())
