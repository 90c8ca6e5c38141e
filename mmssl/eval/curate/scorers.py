"""Per-batch scorers for ``scoring.score_shards``: each maps a batch to per-sample values (B,), and optionally
``embedding`` (B, D) rows kept for deduplication.

* :class:`ClipScore`: the cosine similarity of the image and caption embeddings, DataComp's "CLIP score"
  (Gadre et al. 2023, *DataComp*, §3.4 baselines; LAION-5B filtered at 0.28 with OpenAI's ViT-B/32). Captions
  arrive tokenised by the training ``text_fn`` (an over-long caption is cut keeping the end token, as in training).
* :class:`AskVLM`: Ask-LLM (Sachdeva et al. 2024, *How to Train Data-Efficient LLMs*, §3: the score is the
  probability that the model answers "yes" to whether an example is good) for image-text pairs: a LLaVA
  chat model sees the image and a question holding the caption (:data:`DEFAULT_PROMPT`); the score is
  P(yes) / (P(yes) + P(no)) from the decoder's next-token distribution after the prompt (``p_yes`` and
  ``p_no``, over the whole vocabulary, are kept too).
* :class:`ImageEmbedding`: pooled image features of any encoder (``forward_pooled``), for deduplication only.
* :class:`HashOnly`: no model, only the hashes every row carries (``sha1`` of the pixels, ``phash``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmssl.vlm.llava import LLaVA
from mmssl.vlm.prompt import IGNORE_INDEX, IMAGE_TOKEN, Encoded

# The default Ask-VLM question; ``{caption}`` is replaced by the sample's caption. The chat template puts the
# image before it (``PromptEncoder.prompt``), so the model sees "<image>\nDoes the caption ... yes or no."
DEFAULT_PROMPT = 'Does the caption "{caption}" describe the picture? Answer yes or no.'


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class ClipScore:
    """Cosine similarity of normalised image and caption embeddings; the image embedding is kept."""

    name, needs_text = "clip_score", True

    def __init__(self, model: torch.nn.Module) -> None:
        # anything with encode_image / encode_text (objectives.clip.CLIP, an open_clip model)
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        device = _device(self.model)
        image = self.model.encode_image(batch["image"].to(device), normalize=True).float()  # (B, E)
        text = self.model.encode_text(batch["tokens"].to(device), normalize=True).float()  # (B, E)
        return {"clip_score": (image * text).sum(-1), "embedding": image}


class ImageEmbedding:
    """Pooled features of an encoder in the backbone contract (what linear probes and kNN read)."""

    name, needs_text = "embed", False

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.backbone = backbone.eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        images = batch["image"].to(_device(self.backbone))
        return {"embedding": self.backbone.forward_pooled(images).float()}  # (B, D)


class HashOnly:
    name, needs_text = "hash", False

    def __call__(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {}


class AskVLM:
    """P("yes") of a LLaVA chat model asked whether the caption describes the picture (see module docstring).

    ``prompt`` must hold ``{caption}``; ``answers`` are the (yes, no) words, each one token of the decoder's
    vocabulary as the training answers are tokenised (``PromptEncoder.tokens``). A caption that would make the
    prompt longer than ``llava.max_length`` is cut (training cuts over-long sequences at that length; here the
    caption is cut so that the question, after which the answer comes, stays whole).
    """

    name, needs_text = "vlm", True

    def __init__(self, model: LLaVA, prompt: str = DEFAULT_PROMPT, answers: tuple[str, str] = ("yes", "no")):
        if model.prompt.conversation != "chat":
            raise ValueError(
                f"the LLaVA model uses the {model.prompt.conversation!r} layout: it only captions and ignores "
                "questions; Ask-VLM needs an instruction-tuned (stage 2, conversation=chat) model"
            )
        if "{caption}" not in prompt:
            raise ValueError(f"--prompt must contain '{{caption}}', got {prompt!r}")
        self.model, self.prompt = model.eval(), prompt
        self.answer_ids = [self._answer_id(word) for word in answers]

    def _answer_id(self, word: str) -> int:
        tok = self.model.prompt.tokenizer
        ids = self.model.prompt.tokens(word)
        if len(ids) != 1 or ids[0] == tok.unk_token_id:
            shown = tok.convert_ids_to_tokens(ids)
            raise ValueError(
                f"answer {word!r} is not one token of the decoder's vocabulary (it tokenises as {shown}): the "
                "model cannot answer it; pass --answers with words it was trained to answer"
            )
        return ids[0]

    def prompt_ids(self, caption: str) -> list[int]:
        p = self.model.prompt
        caption = caption.replace(IMAGE_TOKEN, " ")  # the image goes where the template puts it, once
        ids = p.prompt(self.prompt.format(caption=caption))
        if len(ids) <= p.max_length:
            return ids
        budget = p.max_length - len(p.prompt(self.prompt.format(caption="")))
        if budget < 1:
            raise ValueError(f"the prompt without a caption is longer than llava.max_length={p.max_length}")
        words = p.tokens(caption)[:budget]
        while True:  # decoding and re-tokenising may merge differently; shorten until it fits
            ids = p.prompt(self.prompt.format(caption=p.tokenizer.decode(words)))
            if len(ids) <= p.max_length or not words:
                return ids
            words = words[:-1]

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        model = self.model
        encoded = [Encoded(ids, [IGNORE_INDEX] * len(ids)) for ids in map(self.prompt_ids, batch["caption"])]
        # left padding: every prompt ends at the last position, where the answer's distribution is read
        padded = model.prompt.pad_batch(encoded, padding_side="left")
        device = _device(model)
        ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
        embeds = model.embed(batch["image"].to(device), ids)  # (B, L, D)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each prompt counts from 0, as generate() sets it
        out = model.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1
        )
        logp = out.logits[:, -1].float().log_softmax(-1)  # (B, V) next-token distribution
        yes, no = logp[:, self.answer_ids[0]], logp[:, self.answer_ids[1]]
        return {"vlm": torch.sigmoid(yes - no), "p_yes": yes.exp(), "p_no": no.exp()}
