"""LLaVA -> transformers: ``LlavaForConditionalGeneration`` + ``AutoProcessor`` load the exported folder; the
processor's chat template and ``<image>`` expansion give mmssl's prompt ids, the image processor mmssl's LLaVA
view, and the model mmssl's logits (to 1e-5) and greedy answers, for both projectors, both conversation
layouts and both kinds of vision tower (timm ViT, open_clip ViT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llava_helpers import make_llava, tokenizer
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from PIL import Image

from mmssl.data.transforms import llava_view
from mmssl.interop import Unsupported
from mmssl.interop.hf_llava import compare, round_trip, save_llava
from mmssl.vlm.llava import LLaVA
from mmssl.vlm.projector import Projector
from mmssl.vlm.prompt import IMAGE_TOKEN_ID, PromptEncoder
from mmssl.vlm.vision import VisionTower

transformers = pytest.importorskip("transformers")
QUESTION = "What color is the shape?"


def picture(seed: int, size=(40, 28)) -> Image.Image:  # not square: pads or crops, as mmssl's view
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def open_clip_llava() -> LLaVA:
    """A tiny LLaVA on an open_clip ViT tower (QuickGELU, as LLaVA-1.5's CLIP ViT-L/14-336)."""
    torch.manual_seed(0)
    visual = _build_vision_tower(16, CLIPVisionCfg(layers=3, width=32, head_width=16, patch_size=16, image_size=32),
                                 quick_gelu=True)  # fmt: skip
    base = make_llava(tokenizer())
    vision = VisionTower(visual, {"source": "open_clip", "name": "tiny"}, layer=-2)
    prompt = PromptEncoder(tokenizer(), vision.num_tokens, "chat", system="A chat.")
    return LLaVA(vision, Projector("mlp2x_gelu", vision.dim, 32), base.decoder, prompt,
                 image_processing={"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                                   "image_aspect_ratio": "crop"})  # fmt: skip


MODELS = {
    "timm-mlp2x-chat": lambda: make_llava(tokenizer()),
    "timm-linear-plain": lambda: LLaVA(
        (m := make_llava(tokenizer(), conversation="plain")).vision,
        Projector("linear", m.vision.dim, 32),
        m.decoder,
        m.prompt,
    ),  # fmt: skip
    "open_clip-mlp2x-chat": open_clip_llava,
}


@pytest.mark.parametrize("which", list(MODELS))
def test_transformers_llava_loads_the_export_with_mmssl_ids_logits_and_answers(which, tmp_path):
    model = MODELS[which]().eval()
    folder = save_llava(model, tmp_path / "llava")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    image_id = hf.config.image_token_index
    assert processor.tokenizer.convert_ids_to_tokens(image_id) == "<image>"

    # the chat template + <image> expansion give mmssl's prompt ids, <image> positions aside
    info = model.image_processing
    view = llava_view(info.get("img_size", 32), mean=info.get("mean", (0.485, 0.456, 0.406)),
                      std=info.get("std", (0.229, 0.224, 0.225)),
                      image_aspect_ratio=info.get("image_aspect_ratio", "pad"))  # fmt: skip
    pictures = [picture(0), picture(1, (24, 36))]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        images=pictures[:1],
    )  # fmt: skip
    ours_ids = torch.tensor(model.prompt.prompt(QUESTION))
    assert (
        inputs["input_ids"][0].tolist() == ours_ids.masked_fill(ours_ids == IMAGE_TOKEN_ID, image_id).tolist()
    )
    pixels = torch.stack([view(p)["image"] for p in pictures])
    processed = processor.image_processor(pictures, return_tensors="pt")["pixel_values"]
    assert (processed - pixels).abs().max() < 0.1  # torchvision's resize vs PIL's: within a grey level or so

    diffs = compare(model, hf, image_id, pixels, [QUESTION, "Where is the shape?"])
    assert diffs["logits"] < 1e-5, diffs["logits"]
    assert diffs["theirs"] == diffs["ours"] and len(diffs["ours"][0]) == 8  # identical greedy ids
    assert round_trip(model, folder) < 1e-5
    with torch.no_grad():  # the processor's own output drives the model end to end
        out = hf.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert image_id not in out[0, inputs["input_ids"].shape[1] :].tolist()


def test_projectors_transformers_cannot_express_are_refused(tmp_path):
    m = make_llava(tokenizer())
    deep = LLaVA(m.vision, Projector("mlp3x_gelu", m.vision.dim, 32), m.decoder, m.prompt)
    with pytest.raises(Unsupported, match="mlp3x_gelu.*two linear layers"):
        save_llava(deep, tmp_path / "x")
