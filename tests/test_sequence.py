"""The sequence transformer (mmssl/sequence.py) with its attention's explicit bf16-on-CPU path against the same
model on torch's ``F.scaled_dot_product_attention``: values and gradients of a step, and cached decoding
(the attention itself: tests/test_attention.py). The model has no padding mask (every sequence is full length), so there is none to
test; the causal mask and the unmasked (BERT, one-token decoding) cases are."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmssl.attention as S
from mmssl.sequence import SequenceTransformer


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
