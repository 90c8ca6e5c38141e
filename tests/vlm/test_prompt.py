"""Token sequences and labels on concrete examples: exactly which positions are learned from."""

from __future__ import annotations

import pytest
import torch
from llava_helpers import chat, make_llava, tokenizer

from mmssl.vlm.prompt import IGNORE_INDEX, IMAGE_TOKEN_ID, PromptEncoder


def words(ids: list[int]) -> list[str]:
    """Ids as tokens, image positions as 'IMG', so expectations read like the sequence itself."""
    tok = tokenizer()
    return ["IMG" if i == IMAGE_TOKEN_ID else tok.convert_ids_to_tokens(i) for i in ids]


def learned(encoded) -> list[str]:
    """The label row: the token a position is trained on, '-' where the label is -100."""
    return ["-" if t == IGNORE_INDEX else words([t])[0] for t in encoded.labels]


def test_chat_labels_cover_only_answers_and_their_end_tokens():
    enc = PromptEncoder(tokenizer(), num_image_tokens=3, conversation="chat", system="A chat.")
    out = enc.encode(chat("What color is the shape?", "red", "Where is the shape?", "top left"))
    assert words(out.input_ids) == [
        "<s>", "a", "chat", ".",
        "user", ":", "IMG", "IMG", "IMG", "what", "color", "is", "the", "shape", "?", "assistant", ":",
        "red", "</s>",
        "user", ":", "where", "is", "the", "shape", "?", "assistant", ":",
        "top", "left", "</s>",
    ]  # fmt: skip
    assert learned(out) == [
        "-", "-", "-", "-",
        "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
        "red", "</s>",
        "-", "-", "-", "-", "-", "-", "-", "-", "-",
        "top", "left", "</s>",
    ]  # fmt: skip


def test_plain_stage1_layout_learns_the_caption():
    enc = PromptEncoder(tokenizer(), num_image_tokens=2, conversation="plain")
    out = enc.encode("a small red circle")
    # the caption ends with conv_llava_plain.sep, "\n", which this word-level tokenizer drops (a Llama
    # tokenizer keeps it as <0x0A>: tests/vlm/test_llava_reference.py); no </s> as in preprocess_plain
    assert words(out.input_ids) == ["<s>", "IMG", "IMG", "a", "small", "red", "circle"]
    assert learned(out) == ["-", "-", "-", "a", "small", "red", "circle"]
    # from a conversation, plain takes the first answer as the caption (LLaVA's preprocess_plain)
    assert enc.encode(chat("Describe.", "red blue")).input_ids[-3:] == enc.encode("red blue").input_ids[-3:]


def test_generation_prompt_ends_after_the_assistant_role():
    enc = PromptEncoder(tokenizer(), num_image_tokens=2, conversation="chat", system="")
    assert words(enc.prompt("Where is the shape?")) == [
        "<s>", "user", ":", "IMG", "IMG", "where", "is", "the", "shape", "?", "assistant", ":"
    ]  # fmt: skip


def test_padding_right_for_training_left_for_generation():
    enc = PromptEncoder(tokenizer(), num_image_tokens=1, conversation="plain")
    short, long = enc.encode("red"), enc.encode("a small red circle")
    right = enc.pad_batch([short, long])
    pad = tokenizer().pad_token_id
    assert right["input_ids"][0].tolist() == [*short.input_ids, pad, pad, pad]
    assert right["labels"][0].tolist() == [*short.labels, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert right["attention_mask"].tolist() == [[1] * 3 + [0] * 3, [1] * 6]
    left = enc.pad_batch([short, long], padding_side="left")
    assert left["input_ids"][0].tolist() == [pad, pad, pad, *short.input_ids]
    assert left["attention_mask"][0].tolist() == [0, 0, 0, 1, 1, 1]


def _batch(*samples: dict) -> dict:
    return {"image": torch.randn(len(samples), 3, 32, 32), "json": list(samples)}


@pytest.mark.parametrize(
    "bad, found",
    [
        (chat("What color is the shape?", "red", image=False), "sample 1: 0"),  # no <image>
        (chat("<image> What color is the shape?", "red", "<image> Where is the shape?", "top left", image=False),
         "sample 1: 8"),  # placeholders in two turns: 8 positions for 4 image tokens
    ],
)  # fmt: skip
def test_placeholder_count_mismatch_is_an_error_not_a_silent_loss(bad, found):
    model = make_llava(tokenizer())
    good = chat("What color is the shape?", "red")
    assert torch.isfinite(model(_batch(good, good))["loss"])
    with pytest.raises(ValueError, match=f"do not match the 4 image tokens.*{found}"):
        model(_batch(good, bad))


def test_truncation_inside_the_image_or_before_any_answer_is_an_error():
    # <image> in the second question: "<s> user : what color is the shape ? assistant : red </s> user :" is
    # 15 tokens, so max_length=17 keeps the first answer and cuts the image after 2 of its 4 positions.
    late_image = chat(
        "What color is the shape?", "red", "<image>\nWhere is the shape?", "top left", image=False
    )
    with pytest.raises(ValueError, match="sample 0: 2"):
        make_llava(tokenizer(), max_length=17)(_batch(late_image))
    sample = chat("What color is the shape?", "red")
    with pytest.raises(ValueError, match="no answer token"):  # image intact, answer cut off
        make_llava(tokenizer(), max_length=12)(_batch(sample))


def test_conversation_roles_must_alternate():
    enc = PromptEncoder(tokenizer(), num_image_tokens=1)
    with pytest.raises(ValueError, match="alternate human, gpt"):
        enc.encode({"conversations": [{"from": "human", "value": "<image> what"}]})
    with pytest.raises(ValueError, match="alternate human, gpt"):
        enc.encode([{"from": "gpt", "value": "red"}, {"from": "human", "value": "<image>"}])


def test_loss_is_cross_entropy_over_answer_tokens_only():
    """The decoder's loss equals a hand-computed next-token CE on the answer positions listed above."""
    model = make_llava(tokenizer(), train_decoder=True)
    batch = _batch(chat("What color is the shape?", "red", "Where is the shape?", "top left"),
                   chat("Where is the shape?", "blue"))  # fmt: skip
    out = model(batch)
    tokens = model.encode_batch(batch)
    embeds = model.embed(batch["image"], tokens["input_ids"])
    logits = model.decoder(inputs_embeds=embeds, attention_mask=tokens["attention_mask"]).logits
    targets, rows = [], []
    for b, row in enumerate(tokens["labels"]):
        for t in (row != IGNORE_INDEX).nonzero().flatten().tolist():
            rows.append(logits[b, t - 1])  # position t-1 predicts token t
            targets.append(row[t])
    assert len(targets) == 7 == out["answer_tokens"].item()  # "red </s>" "top left </s>" | "blue </s>"
    manual = torch.nn.functional.cross_entropy(torch.stack(rows), torch.stack(targets))
    torch.testing.assert_close(out["loss"], manual)
