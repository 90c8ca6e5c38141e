"""LLaVA: visual instruction tuning (Liu et al. 2023, "Visual Instruction Tuning"; LLaVA-1.5: Liu et al. 2023,
"Improved Baselines with Visual Instruction Tuning").

A frozen vision encoder gives patch tokens (``vision.VisionTower``), a projector maps them into the decoder's
embedding space (``projector.Projector``), and the projected tokens replace the ``<image>`` positions of the
text's input embeddings; the causal decoder is trained with next-token cross-entropy on answer tokens only
(``prompt.PromptEncoder`` builds the labels). Two stages (§4.2):

1. feature alignment: only the projector trains (``train_decoder=False``), on captions (``plain``);
2. instruction tuning: projector and decoder train (``train_decoder=True``), on conversations (``chat``).

The vision encoder never trains. Batches are the data contract: ``image`` (B, 3, H, W) plus ``caption`` (list
of captions) for ``plain`` or ``json`` (list of dicts with LLaVA ``conversations``) for ``chat``, and optionally
``has_image`` (B,) bool: False marks a text-only conversation whose ``image`` is a dummy, encoded with the
others but never spliced (the reference's zero image and ``cur_image_features[0:0]``), so every trainable
parameter stays in the graph. Tokenisation happens here, on the model side: the tokenizer belongs to the
decoder, and data stays model-free.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmssl.vlm.projector import Projector
from mmssl.vlm.prompt import IGNORE_INDEX, IMAGE_TOKEN_ID, Encoded, PromptEncoder
from mmssl.vlm.vision import VisionTower


def splice_image_features(
    input_ids: Tensor,
    text_embeds: Tensor,
    image_features: Tensor,
    image_token_id: int = IMAGE_TOKEN_ID,
    has_image: Tensor | None = None,
) -> Tensor:
    """Put each sample's image tokens at its placeholder positions, in order.

    ``input_ids`` (B, L) with ``image_token_id`` at image positions; ``text_embeds`` (B, L, D) the decoder's
    embeddings of those ids (whatever sits at image positions is replaced); ``image_features`` (B, N, D);
    ``has_image`` (B,) bool, None: all True. A sample with an image must hold exactly N image positions, one
    without none: anything else (no ``<image>``, a placeholder in a text-only sample, a sequence cut inside
    the image) raises, naming the samples, instead of training on misplaced features.
    """
    B, N = image_features.shape[:2]
    if has_image is None:
        has_image = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    has_image = has_image.to(device=input_ids.device, dtype=torch.bool)
    is_image = input_ids == image_token_id  # (B, L)
    counts = is_image.sum(1)
    bad = (counts != has_image.long() * N).nonzero().flatten().tolist()
    if bad:
        found = ", ".join(
            f"sample {i}: {counts[i].item()}" + ("" if has_image[i] else " (no image)") for i in bad[:8]
        )
        raise ValueError(
            f"image placeholder positions do not match the {N} image tokens per image ({found}); each "
            f"sample with an image needs exactly one '<image>' in its text (expanded to {N} positions) and "
            "must not be truncated inside it (llava.max_length); a sample without one (has_image false: a "
            "text-only conversation) needs none"
        )
    # Dummy images' features drop out here but stay in the graph: their parameters get zero gradients
    source = image_features[has_image].to(text_embeds.dtype)  # (B_image, N, D)
    return text_embeds.masked_scatter(is_image.unsqueeze(-1), source)


class LLaVA(nn.Module):
    def __init__(
        self,
        vision: VisionTower,
        projector: Projector,
        decoder: nn.Module,
        prompt: PromptEncoder,
        train_decoder: bool = False,
        image_processing: dict[str, Any] | None = None,
    ):
        super().__init__()
        if projector.in_dim != vision.dim:
            raise ValueError(
                f"projector takes {projector.in_dim}-d features, the vision tower gives {vision.dim}"
            )
        width = decoder.get_input_embeddings().embedding_dim
        if projector.out_dim != width:
            raise ValueError(f"projector gives {projector.out_dim}-d tokens, the decoder embeds {width}-d")
        if prompt.num_image_tokens != vision.num_tokens:
            raise ValueError(
                f"prompt expands <image> to {prompt.num_image_tokens} positions, the vision tower gives "
                f"{vision.num_tokens} tokens"
            )
        self.vision, self.projector, self.decoder, self.prompt = vision, projector, decoder, prompt
        self.train_decoder = train_decoder
        # How images were prepared (size, mean, std): saved with the parts so that chat prepares them alike.
        self.image_processing = dict(image_processing or {})
        # Stage 1 (§4.2): only the projector; stage 2: projector + decoder; the encoder never.
        self.vision.requires_grad_(False)
        self.projector.requires_grad_(True)
        self.decoder.requires_grad_(train_decoder)

    def embed(self, images: Tensor, input_ids: Tensor, has_image: Tensor | None = None) -> Tensor:
        """(B, 3, H, W), (B, L) -> decoder input embeddings (B, L, D) with the images spliced in; ``has_image``
        (B,) marks the real images (None: all)."""
        image_tokens = self.projector(self.vision(images))  # (B, N, D)
        text = self.decoder.get_input_embeddings()(input_ids.clamp(min=0))  # placeholders embed as id 0
        return splice_image_features(input_ids, text, image_tokens, has_image=has_image)

    def encode_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        key = "caption" if self.prompt.conversation == "plain" else "json"
        if key not in batch:
            raise KeyError(
                f"llava.conversation={self.prompt.conversation!r} reads the batch key {key!r} "
                f"({'captions: .txt' if key == 'caption' else 'conversations: .json'} in the shards), "
                f"but the batch has only {sorted(batch)}"
            )
        encoded = [self.prompt.encode(sample) for sample in batch[key]]
        empty = [i for i, e in enumerate(encoded) if all(t == IGNORE_INDEX for t in e.labels)]
        if empty:
            raise ValueError(
                f"samples {empty[:8]} have no answer token to learn from (empty answers, or all cut by "
                f"llava.max_length={self.prompt.max_length}): the loss would silently skip them"
            )
        device = batch["image"].device
        return {k: v.to(device) for k, v in self.prompt.pad_batch(encoded).items()}

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        tokens = self.encode_batch(batch)
        embeds = self.embed(batch["image"], tokens["input_ids"], batch.get("has_image"))
        out = self.decoder(
            inputs_embeds=embeds, attention_mask=tokens["attention_mask"], labels=tokens["labels"]
        )
        # Next-token accuracy on answer tokens: position t predicts label t + 1 (as the loss does).
        target = tokens["labels"][:, 1:]
        supervised = target != IGNORE_INDEX
        hits = (out.logits[:, :-1].argmax(-1) == target) & supervised
        image_positions = (tokens["input_ids"] == IMAGE_TOKEN_ID).sum()
        return {
            "loss": out.loss,
            "token_acc": hits.sum() / supervised.sum(),
            "answer_tokens": supervised.sum().float(),
            "tokens": (tokens["attention_mask"].sum() - image_positions).float(),  # text tokens, no padding
        }

    @torch.no_grad()
    def generate(self, images: Tensor, questions: list[str], max_new_tokens: int = 16) -> list[str]:
        """Greedy answers, one per (image, question); batched with left padding."""
        encoded = self.prompt.pad_batch([self._prompt_only(q) for q in questions], padding_side="left")
        ids = encoded["input_ids"].to(images.device)
        embeds = self.embed(images, ids)
        tok = self.prompt.tokenizer
        out = self.decoder.generate(
            inputs_embeds=embeds,
            attention_mask=encoded["attention_mask"].to(images.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=self.prompt.pad,
        )
        texts = [text.strip() for text in tok.batch_decode(out, skip_special_tokens=True)]
        if self.prompt.conversation == "plain":  # stage 1 learned to end a caption with a newline, not </s>
            texts = [text.split("\n")[0].strip() for text in texts]
        return texts

    def _prompt_only(self, question: str) -> Encoded:
        ids = self.prompt.prompt(question)
        return Encoded(ids, [IGNORE_INDEX] * len(ids))
