"""Tiny LLaVA pieces for unit tests: a word-level tokenizer over a fixed corpus, a 2-layer Llama, a 2-block ViT."""

from __future__ import annotations

from functools import lru_cache

import torch

from mmssl.vlm.decoders import tiny_llama, word_tokenizer
from mmssl.vlm.llava import LLaVA
from mmssl.vlm.projector import Projector
from mmssl.vlm.prompt import PromptEncoder
from mmssl.vlm.vision import VisionTower, create_encoder

CORPUS = [
    "What color is the shape?",
    "Where is the shape?",
    "red blue",
    "top left",
    "a small red circle",
    "USER: ASSISTANT:",
    "A chat.",
]
VIT = {"source": "timm", "name": "vit_tiny_patch16_224",
       "kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}}  # fmt: skip


@lru_cache
def tokenizer():
    return word_tokenizer(CORPUS)


def make_llava(tokenizer, train_decoder: bool = False, conversation: str = "chat", **prompt) -> LLaVA:
    torch.manual_seed(0)
    vision = VisionTower(create_encoder(VIT), VIT, layer=-2)  # 2x2 patches -> 4 image tokens
    decoder = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    projector = Projector("mlp2x_gelu", vision.dim, 32)
    encoder = PromptEncoder(tokenizer, vision.num_tokens, conversation, **{"system": "", **prompt})
    return LLaVA(vision, projector, decoder, encoder, train_decoder=train_decoder)


def chat(*pairs: str, image: bool = True) -> dict:
    """A LLaVA-format sample: question, answer, question, answer, ... (``<image>`` in the first question)."""
    turns = []
    for i, text in enumerate(pairs):
        human = i % 2 == 0
        value = f"<image>\n{text}" if (i == 0 and image) else text
        turns.append({"from": "human" if human else "gpt", "value": value})
    return {"conversations": turns}
