"""LLaVA-1.5 as its reference code prepares data (haotian-liu/LLaVA llava/train/train.py, conversation.py,
mm_utils.py; scripts/v1_5/pretrain.sh and finetune.sh): the stage-1 ``plain`` layout, the ``v1`` template's
system prompt, where ``<image>`` goes, text-only conversations, and each stage's image preparation.

The reference's steps are written out here in plain torch/Python, independently of mmssl's code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llava_helpers import make_llava, tokenizer
from PIL import Image

from mmssl import config as C
from mmssl.config.objectives import LlavaConfig
from mmssl.data.demo import encode
from mmssl.data.shards import SampleDecoder, eval_pipeline, write_shards
from mmssl.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, llava_view
from mmssl.factory import build_datamodule
from mmssl.factory.objectives import build_views
from mmssl.vlm.decoders import word_tokenizer
from mmssl.vlm.prompt import IGNORE_INDEX, IMAGE_TOKEN_ID, PromptEncoder

# conversation.py conv_vicuna_v1, the template of --version v1 (conv_templates["v1"]) in finetune.sh
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class CharTokenizer:
    """A Llama-like tokenizer at character level: every character is a token (so "\\n" is one, as Llama's
    <0x0A>), and ``<s>`` is prepended unless ``add_special_tokens=False``."""

    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3

    class Out(dict):
        @property
        def input_ids(self) -> list[int]:
            return self["input_ids"]

    def __call__(self, text: str, add_special_tokens: bool = True) -> Out:
        ids = [ord(c) + 4 for c in text]
        return self.Out(input_ids=([self.bos_token_id] if add_special_tokens else []) + ids)


def tokenizer_image_token(prompt: str, tokenizer, bos: bool = True) -> list[int]:
    """mm_utils.py ``tokenizer_image_token``: tokenise the chunks between ``<image>``s, keep one <s>, put one
    IMAGE_TOKEN_INDEX between chunks. ``bos``: the tokenizer adds <s> itself (Llama's add_bos_token)."""
    encode = (
        tokenizer if bos else (lambda s: {"input_ids": [tokenizer.bos_token_id] + tokenizer(s)["input_ids"]})
    )
    chunks = [encode(chunk)["input_ids"] for chunk in prompt.split("<image>")]
    ids = [chunks[0][0]]  # the <s> of the first chunk
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_ID)
        ids.extend(chunk[1:])
    return ids


def expand_image(ids: list[int], labels: list[int], n: int) -> tuple[list[int], list[int]]:
    """llava_arch.py ``prepare_inputs_labels_for_multimodal``: each image index becomes the n image features,
    labelled IGNORE_INDEX."""
    out_ids, out_labels = [], []
    for t, lab in zip(ids, labels, strict=True):
        if t == IMAGE_TOKEN_ID:
            out_ids += [IMAGE_TOKEN_ID] * n
            out_labels += [IGNORE_INDEX] * n
        else:
            out_ids.append(t)
            out_labels.append(lab)
    return out_ids, out_labels


def preprocess_multimodal(value: str) -> str:
    """train.py ``preprocess_multimodal``: a sentence holding <image> gets it (once) at its start."""
    if "<image>" in value:
        value = "<image>\n" + value.replace("<image>", "").strip()
        value = value.strip()
    return value


# ---------------------------------------------------------------- 1. stage 1: the plain layout


@pytest.mark.parametrize("caption", ["a small red circle", "two lines\nof caption "])
def test_plain_layout_is_preprocess_plain(caption):
    """``preprocess_plain``: "<image>" + caption + conv_llava_plain.sep ("\\n", not </s>), tokenised with
    tokenizer_image_token; labels hidden over the tokens of "<image>" alone (<s> and the image)."""
    tok, n = CharTokenizer(), 3
    conversation = "<image>" + caption + "\n"
    ids = tokenizer_image_token(conversation, tok)
    masked = len(tokenizer_image_token("<image>", tok))
    labels = [IGNORE_INDEX] * masked + ids[masked:]
    expected_ids, expected_labels = expand_image(ids, labels, n)

    enc = PromptEncoder(tok, num_image_tokens=n, conversation="plain")
    # the caption is the first answer; the question is dropped (source[0]['value'] = DEFAULT_IMAGE_TOKEN)
    sample = {
        "conversations": [{"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": caption}]
    }
    for given in (caption, sample):
        out = enc.encode(given)
        assert out.input_ids == expected_ids
        assert out.labels == expected_labels
    assert tok.eos_token_id not in out.input_ids


# ---------------------------------------------------------------- 2 and 4. stage 2: the v1 template


def v1_prompt(turns: list[dict], system: str) -> str:
    """conversation.py ``Conversation.get_prompt`` for SeparatorStyle.TWO (sep " ", sep2 "</s>") after
    ``preprocess_multimodal``: system, then "USER: q ASSISTANT: a</s>" per round."""
    seps = [" ", "</s>"]
    out = system + seps[0]
    for i, turn in enumerate(turns):
        role = "USER" if turn["from"] == "human" else "ASSISTANT"
        out += role + ": " + preprocess_multimodal(turn["value"]) + seps[i % 2]
    return out


CHATS = {
    "image first": [("<image>\nWhat color is the shape?", "red"), ("Where is the shape?", "top left")],
    "image after the question": [("What color is the shape?\n<image>", "red")],
    "image mid-text, twice": [("What <image> color is <image> the shape?", "blue")],
    "text only": [("What color is a ripe tomato?", "red"), ("And the sky?", "blue")],
}


@pytest.mark.parametrize("name", list(CHATS))
def test_chat_sequence_is_the_v1_template_with_image_first(name):
    """The ids of ``preprocess_v1`` (``--version v1``: conv_vicuna_v1) on the joined prompt, image expanded: the
    system prompt is Vicuna v1's ("curious user"), ``<image>`` moves to the start of its turn, and a text-only
    conversation has no image positions. mmssl tokenises piece by piece; a word-level tokenizer makes the
    two agree token for token."""
    turns = [t for q, a in CHATS[name] for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    texts = [VICUNA_V1_SYSTEM, "USER: ASSISTANT:", *(t["value"].replace("<image>", " ") for t in turns)]
    tok, n = word_tokenizer(texts), 2
    ids = tokenizer_image_token(v1_prompt(turns, VICUNA_V1_SYSTEM), tok, bos=False)
    expected, _ = expand_image(ids, ids, n)
    out = PromptEncoder(tok, num_image_tokens=n, conversation="chat").encode({"conversations": turns})
    assert out.input_ids == expected
    assert tok.convert_ids_to_tokens(out.input_ids[1:6]) == ["a", "chat", "between", "a", "curious"]
    assert out.input_ids.count(IMAGE_TOKEN_ID) == (0 if name == "text only" else n)


def test_generation_prompt_puts_the_image_first_as_the_reference_eval():
    """model_vqa.py: ``qs = DEFAULT_IMAGE_TOKEN + '\\n' + qs``, then the v1 prompt ending in "ASSISTANT:"."""
    question = "Where is the shape?"
    tok = word_tokenizer([VICUNA_V1_SYSTEM, "USER: ASSISTANT:", question])
    enc = PromptEncoder(tok, num_image_tokens=2, conversation="chat")
    reference = VICUNA_V1_SYSTEM + " USER: <image>\n" + question + " ASSISTANT:"
    expected, _ = expand_image(*[tokenizer_image_token(reference, tok, bos=False)] * 2, 2)
    assert enc.prompt(question) == expected
    assert enc.prompt(question + " <image>") == expected


# ---------------------------------------------------------------- 4. text-only samples in a batch


def _chat(question: str, answer: str) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def test_text_only_sample_trains_beside_image_samples_without_image_tokens():
    """The reference gives a text-only sample a zero image that is encoded but not spliced
    (``cur_image_features[0:0]``); here the batch's ``has_image`` flag says which images are dummies."""
    model = make_llava(tokenizer(), train_decoder=True)
    model.train()
    with_image = _chat("<image>\nWhat color is the shape?", "red")
    text_only = _chat("What color is the shape?", "blue")
    images = torch.randn(2, 3, 32, 32)
    batch = {"image": images, "json": [with_image, text_only], "has_image": torch.tensor([True, False])}
    out = model(batch)
    # the text-only sample's logits are the decoder's on its text alone: no image feature reaches it
    tokens = model.encode_batch(batch)
    assert (tokens["input_ids"][1] == IMAGE_TOKEN_ID).sum() == 0
    alone = model.decoder(input_ids=tokens["input_ids"][1:2], attention_mask=tokens["attention_mask"][1:2])
    embeds = model.embed(images, tokens["input_ids"], batch["has_image"])
    logits = model.decoder(inputs_embeds=embeds, attention_mask=tokens["attention_mask"]).logits
    torch.testing.assert_close(logits[1, : alone.logits.shape[1]], alone.logits[0], atol=1e-5, rtol=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())


def test_all_text_only_batch_still_gives_the_projector_a_gradient():
    """As the reference's ``[0:0]`` slice: every trainable parameter takes part in the graph (DDP needs it)."""
    model = make_llava(tokenizer(), train_decoder=True)
    batch = {"image": torch.randn(2, 3, 32, 32), "json": [_chat("What color is the shape?", "red")] * 2,
             "has_image": torch.tensor([False, False])}  # fmt: skip
    model(batch)["loss"].backward()
    assert all(p.grad is not None for p in model.projector.parameters())


def test_image_and_flag_must_agree():
    model = make_llava(tokenizer())
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="sample 0: 4.*no image"):  # placeholder, but the sample has no image
        model(
            {
                "image": images,
                "json": [_chat("<image>\nWhat color?", "red")],
                "has_image": torch.tensor([False]),
            }
        )
    with pytest.raises(ValueError, match="sample 0: 0"):  # an image, but no placeholder in the text
        model({"image": images, "json": [_chat("What color?", "red")], "has_image": torch.tensor([True])})


def test_shards_with_text_only_samples_batch_and_train(tmp_path):
    """A .json-only sample (no image file) decodes with a dummy picture and ``has_image`` False when the
    decoder allows it (LLaVA chat); other objectives still skip it; the mixed batch trains."""
    picture = Image.new("RGB", (40, 30), (200, 30, 30))
    samples = [
        {"__key__": "a", "jpg": encode(picture), "json": _chat("What color is the shape?\n<image>", "red")},
        {"__key__": "b", "json": _chat("What color is a ripe tomato?", "red")},
    ]
    write_shards(samples, tmp_path)
    urls = [str(tmp_path / "shard-000000.tar")]
    view = llava_view(32, "bicubic", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, image_aspect_ratio="pad")
    batch = next(
        iter(eval_pipeline(urls, view, 2, rank=0, world_size=1, decoder=SampleDecoder(image_optional=True)))
    )
    assert batch["has_image"].tolist() == [True, False] and batch["image"].shape == (2, 3, 32, 32)
    assert torch.isfinite(make_llava(tokenizer(), train_decoder=True)(batch)["loss"])
    strict = list(eval_pipeline(urls, view, 2, rank=0, world_size=1, decoder=SampleDecoder()))
    assert len(strict) == 1 and "has_image" not in strict[0] and len(strict[0]["json"]) == 1
    # the data module asks for it in chat mode only (a caption needs its picture)
    for recipe, optional in [("llava_demo_stage2", True), ("llava_demo_stage1", False)]:
        cfg = C.load(recipe, [f"data.train_shards={urls[0]}", "data.val_shards=null"])
        assert build_datamodule(cfg).decoder.image_optional is optional, recipe


# ---------------------------------------------------------------- 3. image preparation per stage


def expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """train.py ``expand2square``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


@pytest.mark.parametrize("size", [(83, 50), (40, 71)])
def test_pad_and_crop_views_are_the_reference_preparation(size):
    """``image_aspect_ratio`` pad (finetune.sh): expand2square with the mean colour, then CLIPImageProcessor;
    anything else (pretrain.sh: the default 'square'): CLIPImageProcessor alone, i.e. shortest side to the
    input size and a centre crop."""
    clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    S = 32
    processor = clip.CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))

    def reference(picture):
        return torch.tensor(processor.preprocess(picture, return_tensors="np")["pixel_values"][0])

    fill = tuple(int(x * 255) for x in OPENAI_CLIP_MEAN)
    views = {
        a: llava_view(S, "bicubic", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, image_aspect_ratio=a)
        for a in ("pad", "crop")
    }
    torch.testing.assert_close(views["crop"](img)["image"], reference(img), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        views["pad"](img)["image"], reference(expand2square(img, fill)), atol=1e-5, rtol=0
    )


def test_recipes_pad_only_in_stage_2():
    for recipe, expected in [("llava_stage1", "crop"), ("llava_demo_stage1", "crop"),
                             ("llava_stage2", "pad"), ("llava_demo_stage2", "pad")]:  # fmt: skip
        assert C.load(recipe).llava.image_aspect_ratio == expected, recipe
    assert LlavaConfig().image_aspect_ratio == "crop"  # DataArguments.image_aspect_ratio = 'square': no pad
    with pytest.raises(C.ConfigError, match="llava.image_aspect_ratio"):
        C.load("llava_demo_stage1", ["llava.image_aspect_ratio=square"])
    cfg = C.load("llava_demo_stage1")
    wide = Image.new("RGB", (96, 64), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 16, 64))  # a blue band at the left edge, lost by a centre crop
    train, val = build_views(cfg)
    assert train(wide)["image"].shape == (3, 64, 64)
    cropped = train(wide)["image"][2, :, :4].mean()  # blue channel at the left border after crop: red only
    padded = build_views(C.load("llava_demo_stage1", ["llava.image_aspect_ratio=pad"]))[0](wide)["image"]
    assert cropped < 0 and padded[2, 16:48, :8].mean() > cropped
