"""Token sequences and labels for LLaVA training and generation (Liu et al. 2023, §4.2 and LLaVA-1.5).

Two layouts, as in the reference (llava/train/train.py and conversation.py):

* ``plain`` (stage 1, feature alignment; ``preprocess_plain``): ``<s> <image> caption\\n``: the caption ends
  with ``conv_llava_plain.sep``, a newline, not ``</s>``; only the caption and that newline carry labels.
* ``chat`` (stage 2, instruction tuning; ``--version v1``, the ``conv_vicuna_v1`` template):
  ``<s> system USER: <image>\\n q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT: a2 </s> ...``; only the answers
  and their end tokens carry labels: system text, questions, role markers and image positions are -100.

A turn holding ``<image>`` gets it once, at its start, followed by a newline, wherever the data put it
(``preprocess_multimodal``); a conversation without ``<image>`` is text-only (part of the 665K mix) and gets
no image positions at all.

Sequences are built by concatenating separately tokenised pieces, so every label comes from a known token
span (the reference re-tokenises prefixes of the joined string to find its masks, which drifts whenever a
tokenizer merges across a boundary). Each ``<image>`` placeholder becomes ``num_image_tokens`` copies of
``IMAGE_TOKEN_ID``, a negative id no vocabulary uses (the reference's ``IMAGE_TOKEN_INDEX``); the model
splices image features into exactly those positions (``llava.splice_image_features``).

The tokenizer is any ``transformers`` tokenizer (duck-typed here, so this module needs no transformers
import): called with ``add_special_tokens=False``, with ``bos_token_id``/``eos_token_id``/``pad_token_id``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX
IGNORE_INDEX = -100  # the label torch's cross_entropy (and transformers' loss) skips
USER, ASSISTANT = "USER:", "ASSISTANT:"  # Vicuna v1 roles
# conversation.py conv_vicuna_v1, which --version v1 selects (conv_templates["v1"]); conv_llava_v1 (the
# "curious human" wording) is the template of --version llava_v1, which the LLaVA-1.5 scripts do not use.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PLAIN_SEP = "\n"  # conv_llava_plain.sep: what preprocess_plain appends to every caption
CONVERSATIONS = ("plain", "chat")


@dataclass(frozen=True)
class Encoded:
    """One sample: token ids (``IMAGE_TOKEN_ID`` at image positions) and labels of the same length."""

    input_ids: list[int]
    labels: list[int]


class PromptEncoder:
    """Conversations or captions -> :class:`Encoded`; lists of those -> padded tensors."""

    def __init__(
        self,
        tokenizer,
        num_image_tokens: int,
        conversation: str = "chat",
        system: str = VICUNA_SYSTEM,
        max_length: int = 2048,  # LLaVA-1.5 model_max_length
    ):
        if conversation not in CONVERSATIONS:
            raise ValueError(f"llava.conversation: must be one of {CONVERSATIONS}, got {conversation!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the decoder's tokenizer has no eos token: answers could never end")
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.conversation = conversation
        self.system = system
        self.max_length = max_length
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (tokenizer.unk_token_id or self.eos)  # LLaVA: pad = unk

    def tokens(self, text: str) -> list[int]:
        """Text (may hold ``<image>``) -> ids, each placeholder expanded to ``num_image_tokens`` positions."""
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids += [IMAGE_TOKEN_ID] * self.num_image_tokens
            if piece.strip():
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def _finish(self, spans: list[tuple[list[int], bool]]) -> Encoded:
        """(ids, supervised) spans -> Encoded, truncated to ``max_length`` as the reference does. Image
        positions never carry a label (the reference labels its spliced image features IGNORE_INDEX)."""
        ids = [t for span, _ in spans for t in span]
        labels = [t if sup and t != IMAGE_TOKEN_ID else IGNORE_INDEX for span, sup in spans for t in span]
        return Encoded(ids[: self.max_length], labels[: self.max_length])

    def encode(self, sample: dict | str) -> Encoded:
        """A caption (``plain``) or a LLaVA ``conversations`` list / a dict holding one (``chat``)."""
        if self.conversation == "plain":
            # preprocess_plain: "<image>" + caption + sep, the question dropped; the caption is tokenised
            # together with its newline, as the reference tokenises the chunk after the image
            caption = sample if isinstance(sample, str) else _first_answer(sample)
            return self._finish(
                [(self.bos + self.tokens(IMAGE_TOKEN), False), (self.tokens(caption + PLAIN_SEP), True)]
            )
        turns = sample.get("conversations") if isinstance(sample, dict) else sample
        spans = [(self.bos + self.tokens(self.system), False)]
        for question, answer in _pairs(turns):
            question, answer = image_first(question), image_first(answer)
            spans.append((self.tokens(USER) + self.tokens(question) + self.tokens(ASSISTANT), False))
            spans.append((self.tokens(answer) + [self.eos], True))
        return self._finish(spans)

    def prompt(self, question: str = "") -> list[int]:
        """Ids that end where the model should start answering (``chat``: after ``ASSISTANT:``).

        The image goes first, then a newline and the question, as the reference's evaluation (``model_vqa.py``:
        ``DEFAULT_IMAGE_TOKEN + '\\n' + qs``) and its training data; ``plain`` ignores the question: a stage-1
        model only describes the image.
        """
        if self.conversation == "plain":
            return self.bos + self.tokens(IMAGE_TOKEN)
        question = image_first(IMAGE_TOKEN + question)
        return (
            self.bos
            + self.tokens(self.system)
            + self.tokens(USER)
            + self.tokens(question)
            + self.tokens(ASSISTANT)
        )

    def pad_batch(self, samples: list[Encoded], padding_side: str = "right") -> dict[str, Tensor]:
        """-> ``input_ids``, ``labels`` (-100 on padding), ``attention_mask``: (B, L_max).

        Training pads on the right; batched generation pads on the left so every prompt ends at the last
        position.
        """
        length = max(len(s.input_ids) for s in samples)
        ids = torch.full((len(samples), length), self.pad, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            where = slice(length - n, length) if padding_side == "left" else slice(0, n)
            ids[i, where] = torch.tensor(s.input_ids, dtype=torch.long)
            labels[i, where] = torch.tensor(s.labels, dtype=torch.long)
            mask[i, where] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def image_first(text: str) -> str:
    """``preprocess_multimodal``: text holding ``<image>`` gets it once, at its start, then a newline."""
    if IMAGE_TOKEN not in text:
        return text
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


def _pairs(turns) -> list[tuple[str, str]]:
    """LLaVA turns (human, gpt, human, gpt, ...) -> [(question, answer)], or a clear error."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"a conversation must be a non-empty list of turns, got {str(turns)[:120]!r}")
    roles = [t.get("from") if isinstance(t, dict) else None for t in turns]
    expected = ["human", "gpt"] * (len(turns) // 2)
    if len(turns) % 2 or roles != expected:
        raise ValueError(
            f"conversation turns must alternate human, gpt, ... and end with gpt; got roles {roles} "
            f"in {str(turns)[:160]!r}"
        )
    return [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def _first_answer(sample: dict | list) -> str:
    turns = sample.get("conversations") if isinstance(sample, dict) else sample
    return _pairs(turns)[0][1]
