"""Language decoders from ``transformers``: the only mmssl module that imports transformers or tokenizers.

A decoder is any causal LM saved in a local folder with its tokenizer (``save_pretrained``), loaded with
``local_files_only=True``: nothing is ever downloaded. For the demo and tests, :func:`word_tokenizer` builds a
tiny word-level tokenizer from a corpus (the ``tokenizers`` library's WordLevel model and trainer) and
:func:`tiny_llama` a randomly initialised Llama of any size from a ``LlamaConfig``.

Both give the decoder :data:`ATTENTION` (:func:`use_mmssl_attention`): transformers' SDPA attention except in
bf16 on CPU, where it is ``mmssl.attention.explicit_attention``, as for the timm blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mmssl.attention import explicit_attention

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
ATTENTION = "mmssl_sdpa"  # the name registered with transformers' AttentionInterface below


def _attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' attention-function contract (``AttentionInterface``): (B, H, L, hd) queries, keys and values
    in, ((B, L, H, hd) output, weights) out. bf16 on CPU without a cache offset, dropout or softcap runs
    ``explicit_attention`` (faster than torch's CPU flash kernel there, see ``mmssl/attention.py``) with the
    mask transformers built for SDPA (``sdpa_mask``, registered under the same name); anything else is
    transformers' own SDPA function, unchanged."""
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # Llama's rotary embedding leaves q and k in fp32 under autocast; autocast would cast them for SDPA
        query, key, value = (x.to(torch.get_autocast_dtype("cpu")) for x in (query, key, value))
    explicit = (
        query.device.type == "cpu"
        and query.dtype == torch.bfloat16
        and dropout == 0.0
        and kwargs.get("softcap") is None
        and key.shape[2] == query.shape[2]  # no KV cache: causal aligned at the top left, as in training
    )
    if not explicit:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
            **kwargs,
        )  # fmt: skip
    groups = getattr(module, "num_key_value_groups", 1)  # grouped-query attention: kv heads serve `groups`
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = causal and query.shape[2] > 1
    out = explicit_attention(query, key, value, causal, mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_mmssl_attention(model: PreTrainedModel) -> PreTrainedModel:
    """Switch a transformers model that uses SDPA attention to :data:`ATTENTION`, in place (the weights and the
    saved config are unchanged: transformers does not serialise the attention choice). Models on another
    implementation (eager, flash attention) keep it."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(ATTENTION)
    return model


def word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer whose vocabulary is every word and punctuation mark in ``texts``.

    Words split as ``\\w+|[^\\w\\s]+`` (the Whitespace pre-tokenizer); decoding joins tokens with spaces and
    removes the space before punctuation. Ids 0-3 are ``<pad> <unk> <s> </s>``.
    """
    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS.values()), min_frequency=1)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def tiny_llama(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for CPU tests; the vocabulary and special ids match ``tokenizer``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return use_mmssl_attention(LlamaForCausalLM(config))


def save_decoder(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Model (safetensors) + config + tokenizer into ``folder``, loadable with :func:`load_decoder`; the
    weights come from ``state_dict`` when given (e.g. gathered from FSDP shards)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    return folder


def load_decoder(folder: str | Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(causal LM in fp32, tokenizer) from a local folder; never touches the network."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"llava.decoder={str(folder)!r}: no transformers model folder (config.json) there; "
            "make one with tools/make_decoder.py or save_pretrained()"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # fp32 master weights whatever the file holds; Lightning's precision setting decides the compute dtype
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return use_mmssl_attention(model), tokenizer
