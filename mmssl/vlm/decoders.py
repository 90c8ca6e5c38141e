"""Language decoders from ``transformers``: the only mmssl module that imports transformers or tokenizers.

A decoder is any causal LM saved in a local folder with its tokenizer (``save_pretrained``), loaded with
``local_files_only=True``: nothing is ever downloaded. For the demo and tests, :func:`word_tokenizer` builds a
tiny word-level tokenizer from a corpus (the ``tokenizers`` library's WordLevel model and trainer) and
:func:`tiny_llama` a randomly initialised Llama of any size from a ``LlamaConfig``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


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
    return LlamaForCausalLM(config)


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
    return model, tokenizer
