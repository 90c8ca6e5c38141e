"""A GPT-2-style transformer over token sequences, as iGPT uses it (Chen et al., "Generative Pretraining from
Pixels", ICML 2020, §"Architecture"; reference: openai/image-gpt ``src/model.py``).

Why here and not in ``objectives/igpt.py``: the network knows nothing about images or palettes (tokens in,
logits and hidden states out), so it sits at L1 beside ``heads.py`` and could model any token sequence (VQ
codes, say); the objective owns what is iGPT-specific (quantisation, masking, losses, sampling, probing).

Where it follows the reference, and where it does not:

* Pre-norm blocks ``h + attn(norm(h))``, ``h + mlp(norm(h))``, a final norm, then logits (model.py
  ``block`` / ``ln_f``). The blocks are timm's ``Block`` (timm >= 1.0.26 for ``is_causal``) with timm's
  ``Attention`` parameters, through ``mmssl.attention.SelfAttention``: torch's fused
  ``scaled_dot_product_attention`` (flash attention on GPU), except in bf16 on CPU, where explicit batched
  matmuls and a softmax over chunks of the score matrix are 1.5-2.7x faster (measured there).
* The reference's "layer norm" (model.py ``norm``) divides by the root mean square without centring and has a
  gain but no bias: ``norm="rmsnorm"`` (default, eps 1e-5). ``"layernorm"`` gives the textbook GPT-2 one.
* No biases anywhere (model.py's q/k/v/c_proj and ``conv1d`` have none); MLP width 4d with
  ``gelu2(x) = x * sigmoid(1.702 x)`` (timm's ``QuickGELU``).
* Learned position embeddings for every position (``wpe``) and learned token embeddings (``wte``).
* Autoregressive mode: a learned start-of-sequence vector (``sos``) is prepended and the last token dropped,
  so the output at position t predicts token t from tokens < t; position embeddings are added after that
  shift, as in the reference. BERT mode: no ``sos``, no attention mask, and masked tokens' embeddings are
  zeroed before the position embedding is added (the paper: "we zero out the positions in M").
* Untied output projection (``wtet``), zero-initialised (the paper: "zero-initialize all projections
  producing logits"). Other initial values are model.py's: wte N(0, 0.02), wpe N(0, 0.01), sos N(0, 0.02),
  q/k/v N(0, 1/sqrt(d)), the attention output N(0, 1/sqrt(d * depth)) ("layer-dependent" as in Sparse
  Transformer), MLP N(0, 0.02).
* Sampling keeps a key/value cache (``decode``): each new token costs one position's work instead of a rerun
  of the whole prefix, as the reference's "naive sampler without caching" (run.py ``sample``) does.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import QuickGELU
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mmssl.attention import SelfAttention, attention
from mmssl.flops import blocks_flops, linear_flops

NORMS = {
    "rmsnorm": nn.RMSNorm,
    "layernorm": nn.LayerNorm,
}  # torch's RMSNorm: a fused kernel (2.5x timm's in fp32)


class SequenceTransformer(nn.Module):
    """Token ids (B, L) -> logits (B, L, vocab); ``hidden_states`` gives every layer's (B, L, D)."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        embed_dim: int = 512,
        depth: int = 24,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        causal: bool = True,
        norm: str = "rmsnorm",
        eps: float = 1e-5,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        self.vocab_size, self.seq_len, self.embed_dim = vocab_size, seq_len, embed_dim
        self.depth, self.causal = depth, causal
        self.tok_embed = nn.Embedding(vocab_size, embed_dim)  # wte
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, embed_dim))  # wpe
        self.sos = nn.Parameter(torch.zeros(embed_dim)) if causal else None
        norm_layer = partial(NORMS[norm], eps=eps)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=False,
                proj_bias=False,
                act_layer=QuickGELU,
                norm_layer=norm_layer,
                attn_layer=SelfAttention,
            )
            for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)  # ln_f
        self.head = nn.Linear(embed_dim, vocab_size, bias=False)  # wtet, untied from wte
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d = self.embed_dim
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        if self.sos is not None:
            nn.init.normal_(self.sos, std=0.02)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=1 / math.sqrt(d))
            nn.init.normal_(blk.attn.proj.weight, std=1 / math.sqrt(d * self.depth))
            nn.init.normal_(blk.mlp.fc1.weight, std=0.02)
            nn.init.normal_(blk.mlp.fc2.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()
        nn.init.zeros_(self.head.weight)

    def embed(self, ids: Tensor, keep: Tensor | None = None) -> Tensor:
        """ids (B, L), keep (B, L) bool (False = masked, BERT) -> input embeddings h^0 (B, L, D)."""
        B, L = ids.shape
        if L > self.seq_len:
            raise ValueError(f"sequence of {L} tokens is longer than the model's context ({self.seq_len})")
        x = self.tok_embed(ids)  # (B, L, D)
        if keep is not None:
            x = x * keep.unsqueeze(-1).to(x.dtype)
        if self.causal:
            x = torch.cat([self.sos.expand(B, 1, -1).to(x.dtype), x[:, :-1]], dim=1)
        return x + self.pos_embed[:, :L]

    def hidden_states(self, ids: Tensor, keep: Tensor | None = None, upto: int | None = None) -> list[Tensor]:
        """[h^0, h^1, ..., h^upto]: the embeddings then each block's output (B, L, D); blocks past ``upto``
        are not run."""
        upto = self.depth if upto is None else upto
        if not 0 <= upto <= self.depth:
            raise ValueError(f"layer {upto} out of range 0..{self.depth}")
        states = [self.embed(ids, keep)]
        for blk in self.blocks[:upto]:
            states.append(blk(states[-1], is_causal=self.causal))
        return states

    def forward(self, ids: Tensor, keep: Tensor | None = None) -> Tensor:
        """ids (B, L) -> logits (B, L, vocab). Causal: position t sees tokens < t and predicts token t."""
        x = self.embed(ids, keep)
        for blk in self.blocks:
            x = blk(x, is_causal=self.causal)
        return self.head(self.norm(x))

    def forward_flops(self) -> int:
        """Forward FLOPs for one full sequence (``mmssl/flops.py``): the blocks and the logits; the token
        embedding is a lookup."""
        return blocks_flops(self.seq_len, self.blocks) + linear_flops(
            self.seq_len, self.embed_dim, self.vocab_size
        )

    def decode(self, ids: Tensor, start: int, cache: list[tuple[Tensor, Tensor]] | None = None):
        """Causal decoding with a key/value cache: logits (B, T - start, V) of positions ``start..T-1`` of the
        (B, T) ``ids``, given ``cache`` for positions < ``start`` (None when ``start`` = 0); returns the cache
        for positions < T. Position t's output depends on ids[:, :t] only, so ids[:, -1] may be a placeholder.
        Either ``start`` = 0 (a prefix pass) or one new position at a time (no mask is then needed)."""
        if not self.causal:
            raise ValueError("decode is for the causal (autoregressive) transformer")
        T = ids.shape[1]
        if not (start == 0 or T - start == 1) or (start == 0) != (cache is None):
            raise ValueError(
                f"decode: a prefix from 0 without a cache, or one position with one (start {start})"
            )
        x = self.embed(ids)[:, start:]  # (B, n, D): the shifted input embeddings of the new positions
        new_cache = []
        for i, blk in enumerate(self.blocks):
            # timm's Block.forward, written out to reuse and extend the cached keys and values (no layer scale
            # or drop path here: timm's defaults, which this model uses)
            a, h = blk.attn, blk.norm1(x)
            B, n, D = h.shape
            q, k, v = a.qkv(h).reshape(B, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = a.q_norm(q), a.k_norm(k)
            if cache is not None:
                k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
            new_cache.append((k, v))
            out = attention(q, k, v, causal=cache is None)  # (B, H, n, hd)
            x = x + blk.ls1(a.proj(a.norm(out.transpose(1, 2).reshape(B, n, D))))
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return self.head(self.norm(x)), new_cache


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, V) logits -> (B,) ids: softmax(logits / temperature) over the ``top_k`` largest; 0 = argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
