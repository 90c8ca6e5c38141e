"""CLIP data: open_clip's train/eval transforms without flips, captions tokenised in the workers, and bad
captions (empty, blank, missing, non-UTF-8, over-long) handled with a counted reason."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from mmssl.data.demo import encode
from mmssl.data.shards import SampleDecoder, eval_pipeline, write_shards
from mmssl.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CaptionTokens, clip_view, eval_view


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32", context_length=16)


def test_views_match_open_clip_transforms():
    """clip_view == open_clip.image_transform(is_train=True) (RandomResizedCrop(scale=(0.9, 1)), bicubic, no
    flip) to 2 grey levels; eval_view(crop_pct=1) == image_transform(is_train=False) (resize shorter side,
    centre crop) exactly."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    train = open_clip.image_transform(32, is_train=True, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    level = 1 / 255 / min(OPENAI_CLIP_STD)  # the train resize is torch's uint8 bicubic, PIL's in open_clip
    for seed in range(4):
        torch.manual_seed(seed)
        expected = train(img)
        torch.manual_seed(seed)
        diff = (clip_view(32)(img)["image"] - expected).abs()
        assert diff.max() <= 2.01 * level and diff.mean() < 0.05 * level, (seed, diff.max() / level)
    val = open_clip.image_transform(32, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    ours = eval_view(32, crop_pct=1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)(img)["image"]
    assert torch.allclose(ours, val(img), atol=1e-6)


def test_clip_view_never_mirrors():
    """Captions say "left" and "right": a picture red on the left stays red on the left in every draw."""
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :32, 0] = 255  # left half red
    pixels[:, 32:, 2] = 255  # right half blue
    view = clip_view(32, mean=(0, 0, 0), std=(1, 1, 1))
    for seed in range(50):
        torch.manual_seed(seed)
        x = view(Image.fromarray(pixels))["image"]
        assert x[0, :, :4].mean() > 0.9 and x[2, :, -4:].mean() > 0.9, seed


def test_caption_tokens_are_one_dim_with_the_end_token_kept(tokenizer):
    to_tokens = CaptionTokens(tokenizer)
    short = to_tokens("A small red circle at the top left")
    assert short.shape == (16,) and short.dtype == torch.int64
    assert short[0] == tokenizer.sot_token_id and tokenizer.eot_token_id in short.tolist()
    assert short[(short == tokenizer.eot_token_id).nonzero()[0, 0] + 1 :].eq(0).all()  # zero padding
    assert torch.equal(short, to_tokens("a small red circle at the top left"))  # lower-cased
    long = to_tokens(" ".join(["a small red circle at the top left"] * 10))
    # open_clip truncates to the context length and puts the end token last; the text tower pools at the
    # highest token id, which is the end token, so an over-long caption is encoded from its first 15 tokens.
    assert long.shape == (16,) and long[-1] == tokenizer.eot_token_id and long.argmax() == 15
    assert torch.equal(long[1:8], short[1:8])


def test_bad_captions_are_skipped_with_counted_reasons(tmp_path, tokenizer, caplog):
    jpg = encode(Image.new("RGB", (16, 16), (200, 30, 30)))
    rows = [
        {"__key__": "ok", "jpg": jpg, "txt": "a small red square at the center", "cls": 1},
        {"__key__": "long", "jpg": jpg, "txt": "a red square " * 100, "cls": 1},
        {"__key__": "empty", "jpg": jpg, "txt": "", "cls": 1},
        {"__key__": "blank", "jpg": jpg, "txt": " \n\t ", "cls": 1},
        {"__key__": "nocaption", "jpg": jpg, "cls": 1},
        {"__key__": "latin1", "jpg": jpg, "txt": "caf\xe9 au lait".encode("latin-1"), "cls": 1},
    ]
    write_shards(rows, tmp_path, "s")
    decoder = SampleDecoder(require_text=True)
    pipe = eval_pipeline([str(tmp_path / "s-000000.tar")], eval_view(16), 8, rank=0, world_size=1,
                         decoder=decoder, text_fn=CaptionTokens(tokenizer))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mmssl.data.shards"):
        (batch,) = list(pipe)
    assert batch["tokens"].shape == (2, 16) and batch["tokens"].dtype == torch.int64
    assert batch["caption"][0] == "a small red square at the center" and len(batch["caption"]) == 2
    assert batch["image"].shape == (2, 3, 16, 16) and batch["label"].tolist() == [1, 1]
    assert decoder.failures == Counter({"empty text": 2, "missing text key 'txt'": 1, "non-UTF-8 text": 1})
    assert all(key in caplog.text for key in ("'empty'", "'blank'", "'nocaption'", "'latin1'"))
    # without require_text (image-only methods) a missing or empty caption is no reason to drop the picture
    assert SampleDecoder()({"__key__": "k", "jpg": jpg, "txt": b""})["caption"] == ""
