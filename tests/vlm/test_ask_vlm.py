"""Ask-VLM scores (mmssl/eval/curate/scorers.py): P(yes) from a LLaVA chat model's next-token distribution,
batched with left padding, against transformers' own generate() one sample at a time; long captions cut so the
question stays whole; models and answers that cannot work are refused by name."""

from __future__ import annotations

import pytest
import torch
from llava_helpers import CORPUS, make_llava

from mmssl.eval.curate.scorers import DEFAULT_PROMPT, AskVLM
from mmssl.vlm.decoders import word_tokenizer

CAPTIONS = ["a small red circle", "red", "a small red circle at the top left", "blue circle blue"]


def _tokenizer():
    return word_tokenizer([*CORPUS, DEFAULT_PROMPT, "yes no", *CAPTIONS])


def test_batched_scores_equal_generate_first_step_per_sample():
    model = make_llava(_tokenizer())
    scorer = AskVLM(model)
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = scorer({"image": images, "caption": CAPTIONS})
    yes, no = scorer.answer_ids
    lengths = {len(scorer.prompt_ids(c)) for c in CAPTIONS}
    assert len(lengths) > 1  # prompts of different lengths: the batch is really padded
    for i, caption in enumerate(CAPTIONS):
        ids = torch.tensor([scorer.prompt_ids(caption)])
        out = model.decoder.generate(
            inputs_embeds=model.embed(images[i : i + 1], ids), attention_mask=torch.ones_like(ids),
            max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=model.prompt.pad,
        )  # fmt: skip
        p = out.logits[0][0].float().softmax(-1)  # (V,) the unprocessed next-token distribution
        torch.testing.assert_close(got["p_yes"][i], p[yes], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got["p_no"][i], p[no], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got["vlm"][i], p[yes] / (p[yes] + p[no]), rtol=1e-4, atol=1e-6)


def test_a_long_caption_is_cut_and_the_question_kept_whole():
    model = make_llava(_tokenizer())
    scorer = AskVLM(model)
    empty = scorer.prompt_ids("")
    model.prompt.max_length = len(empty) + 3  # room for three caption words
    ids = scorer.prompt_ids("a small red circle at the top left " * 5)
    assert len(ids) == model.prompt.max_length
    tail = len(model.prompt.tokens('" describe the picture? Answer yes or no.')) + len(
        model.prompt.tokens("ASSISTANT:")
    )
    assert ids[-tail:] == empty[-tail:]  # the question and the answer cue survive
    assert scorer.prompt_ids("a small red") == ids  # the caption's first three words
    scores = scorer(
        {"image": torch.randn(1, 3, 32, 32), "caption": ["a small red circle at the top left " * 5]}
    )
    assert 0 < scores["vlm"].item() < 1


def test_refuses_a_captioning_model_and_answers_outside_the_vocabulary():
    tok = _tokenizer()
    with pytest.raises(ValueError, match="'plain' layout"):
        AskVLM(make_llava(tok, conversation="plain"))
    with pytest.raises(ValueError, match="'maybe' is not one token"):
        AskVLM(make_llava(tok), answers=("maybe", "no"))
    with pytest.raises(ValueError, match="must contain '{caption}'"):
        AskVLM(make_llava(tok), prompt="Is this good?")
    with pytest.raises(
        ValueError, match="'yes' is not one token"
    ):  # the stock shapes vocabulary has no yes/no
        AskVLM(make_llava(word_tokenizer(CORPUS)))
