"""mmssl/vlm/decoders.py: the decoder's attention (``ATTENTION``) against transformers' own SDPA attention on the
same Llama weights: identical outside bf16-on-CPU, as close to an fp32 run as SDPA in bf16, padding included,
and what it leaves alone (eager models, the saved config)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import mmssl.vlm.decoders as D
from mmssl.vlm.decoders import ATTENTION, tiny_llama, use_mmssl_attention, word_tokenizer

WORDS = "the a red green blue circle square triangle is on left right top bottom of image".split()


@pytest.fixture(scope="module")
def pair():
    tok = word_tokenizer([" ".join(WORDS)])
    torch.manual_seed(0)
    ours = tiny_llama(tok, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    ours.config.num_key_value_heads = 4
    peer = LlamaForCausalLM(ours.config.__class__(**{**ours.config.to_dict(), "attn_implementation": "sdpa"}))
    peer.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, len(tok), (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as LLaVA training batches
    mask[2, 5:] = 0
    return ours, peer, ids, mask


def run(model, ids, mask, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    labels = ids.masked_fill(mask == 0, -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logits * mask[..., None], grads


def test_models_take_it_and_the_saved_config_does_not_carry_it(pair, tmp_path):
    ours, peer, *_ = pair
    assert ours.config._attn_implementation == ATTENTION and peer.config._attn_implementation == "sdpa"
    ours.save_pretrained(tmp_path)
    assert ATTENTION not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    eager = LlamaForCausalLM(
        ours.config.__class__(**{**ours.config.to_dict(), "attn_implementation": "eager"})
    )
    assert use_mmssl_attention(eager).config._attn_implementation == "eager"  # eager stays eager


@pytest.mark.parametrize("padded", [True, False])
def test_fp32_is_transformers_sdpa_exactly(pair, padded):
    ours, peer, ids, mask = pair
    mask = mask if padded else torch.ones_like(mask)
    (lo, go), (lp, gp) = run(ours, ids, mask, False), run(peer, ids, mask, False)
    assert torch.equal(lo, lp) and torch.equal(go, gp)


@pytest.mark.parametrize("padded", [True, False])
def test_bf16_takes_the_explicit_path_and_is_as_close_to_fp32_as_sdpa(pair, padded, monkeypatch):
    ours, peer, ids, mask = pair
    mask = mask if padded else torch.ones_like(mask)
    calls = []
    explicit = D.explicit_attention
    monkeypatch.setattr(D, "explicit_attention", lambda *a, **k: calls.append(k["mask"]) or explicit(*a, **k))
    fp32_logits, fp32_grads = run(peer, ids, mask, False)
    (lo, go), (lp, gp) = run(ours, ids, mask, True), run(peer, ids, mask, True)
    assert (
        len(calls) == 2 and (calls[0] is not None) == padded
    )  # both layers; the padding mask when there is one
    for ours_x, peer_x, exact in ((lo, lp, fp32_logits), (go, gp, fp32_grads)):
        ours_err, peer_err = (ours_x - exact).norm() / exact.norm(), (peer_x - exact).norm() / exact.norm()
        assert ours_err < 2 * peer_err + 1e-3, (ours_err, peer_err)
