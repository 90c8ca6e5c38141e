"""The LLaVA model: frozen encoder features, projector parity, which parameters train in each stage, splicing,
saving and reloading parts, and learning a tiny conversation (Liu et al. 2023)."""

from __future__ import annotations

import copy

import pytest
import torch
from llava_helpers import VIT, chat, make_llava, tokenizer

from mmssl.vlm.llava import splice_image_features
from mmssl.vlm.parts import load_parts, save_parts
from mmssl.vlm.projector import Projector, load_projector, save_projector
from mmssl.vlm.prompt import IMAGE_TOKEN_ID
from mmssl.vlm.vision import VisionTower, create_encoder


def _batch(*samples: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(len(samples), 3, 32, 32, generator=g), "json": list(samples)}


def test_vision_tower_gives_penultimate_patch_tokens_without_cls_or_gradients():
    torch.manual_seed(0)
    encoder = create_encoder(VIT)
    reference = copy.deepcopy(encoder)
    vision = VisionTower(encoder, VIT, layer=-2)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    # by hand, timm's forward_features up to the second-to-last block, then the CLS token dropped
    x = reference.norm_pre(reference._pos_embed(reference.patch_embed(images)))
    for block in reference.blocks[:-1]:
        x = block(x)
    manual = x[:, reference.num_prefix_tokens :]
    out = vision(images)
    assert out.shape == (2, 4, 32) == (2, vision.num_tokens, vision.dim)  # 32 px / 16 px patches: 2x2 tokens
    torch.testing.assert_close(out, manual)
    assert len(vision.encoder.blocks) == 1  # the unused last block is pruned
    assert not out.requires_grad and not any(p.requires_grad for p in vision.parameters())
    vision.train()
    assert not vision.encoder.training  # a frozen encoder stays in eval mode (no dropout, no drop path)


def test_projectors_match_the_reference_layouts():
    """mlp2x_gelu equals transformers' LlavaMultiModalProjector (Linear, GELU, Linear) with the same weights."""
    from transformers import LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    torch.manual_seed(0)
    ours = Projector("mlp2x_gelu", 24, 40)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 24},
        text_config=LlamaConfig(hidden_size=40, num_attention_heads=4, num_key_value_heads=4).to_dict(),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
    )
    theirs = LlavaMultiModalProjector(config)
    theirs.linear_1.load_state_dict(ours[0].state_dict())
    theirs.linear_2.load_state_dict(ours[2].state_dict())
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(ours(x), theirs(x))
    linear = Projector("linear", 24, 40)
    assert [type(m).__name__ for m in linear] == ["Linear"]
    assert [type(m).__name__ for m in Projector("mlp3x_gelu", 24, 40)] == [
        "Linear",
        "GELU",
        "Linear",
        "GELU",
        "Linear",
    ]
    with pytest.raises(ValueError, match="unknown projector 'mlp_relu'"):
        Projector("mlp_relu", 24, 40)


def test_projector_file_round_trip_and_width_checks(tmp_path):
    projector = Projector("mlp2x_gelu", 24, 40)
    path = save_projector(projector, tmp_path / "projector.safetensors")
    loaded = load_projector(path, 24, 40)
    assert loaded.kind == "mlp2x_gelu"
    for (n, a), (_, b) in zip(projector.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    with pytest.raises(ValueError, match="decoder width 40, but this model's is 64"):
        load_projector(path, 24, 64)
    with pytest.raises(FileNotFoundError, match="llava.projector_weights"):
        load_projector(tmp_path / "missing.safetensors")


def test_splice_puts_each_image_token_at_its_placeholder_in_order():
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 6, 7], [IMAGE_TOKEN_ID, 8, IMAGE_TOKEN_ID, 9, 9]])
    text = torch.zeros(2, 5, 3)
    image = torch.arange(1, 13, dtype=torch.float).reshape(2, 2, 3)
    out = splice_image_features(ids, text, image)
    torch.testing.assert_close(out[0, 1:3], image[0])
    torch.testing.assert_close(out[1, [0, 2]], image[1])
    assert out[0, [0, 3, 4]].abs().sum() == 0 and out[1, [1, 3, 4]].abs().sum() == 0
    with pytest.raises(ValueError, match="sample 1: 1"):
        splice_image_features(ids[:, :2], text[:, :2], image)  # sample 1 has a single placeholder there


def test_learns_a_tiny_conversation_and_answers_it_with_generate():
    """Overfit two pictures: loss falls far below its start, and greedy generation gives the taught answers."""
    model = make_llava(tokenizer(), train_decoder=True)
    batch = _batch(chat("What color is the shape?", "red"), chat("What color is the shape?", "blue"), seed=1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model.train()
    first = None
    for _ in range(60):  # stops as soon as the batch is learned
        loss = model(batch)["loss"]
        first = first if first is not None else loss.item()
        if loss.item() < 0.05 * first:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first, (first, loss.item())
    model.eval()
    assert model.generate(batch["image"], ["What color is the shape?"] * 2, max_new_tokens=4) == [
        "red",
        "blue",
    ]


def test_saved_parts_reload_offline_and_answer_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make_llava(tokenizer(), train_decoder=True).eval()
    with torch.no_grad():
        for p in model.projector.parameters():  # parts other than the initial ones must travel
            p.add_(0.5 * torch.randn_like(p))
    save_parts(model, tmp_path / "llava")
    assert sorted(f.name for f in (tmp_path / "llava").iterdir()) == [
        "decoder", "llava.json", "projector.safetensors", "vision.safetensors"
    ]  # fmt: skip
    loaded = load_parts(tmp_path / "llava")
    images = _batch(chat("x", "y"), chat("x", "y"), seed=2)["image"]
    questions = ["What color is the shape?", "Where is the shape?"]
    with torch.no_grad():
        ids = torch.tensor([model.prompt.prompt(questions[0])])
        torch.testing.assert_close(loaded.embed(images[:1], ids), model.embed(images[:1], ids))
    assert loaded.generate(images, questions, max_new_tokens=5) == model.generate(
        images, questions, max_new_tokens=5
    )
