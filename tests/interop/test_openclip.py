"""CLIP -> open_clip: the exported folder loads with open_clip's own factory (both ways it offers) and gives
mmssl's image and text features, for an mmssl ViT backbone, a timm CNN backbone and an open_clip image tower."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from mmssl import config as C
from mmssl import factory
from mmssl.interop import Unsupported
from mmssl.interop.openclip import WEIGHTS, compare, save_open_clip, tower_configs

TEXT = "clip.text_cfg={context_length: 16, width: 32, heads: 2, layers: 1}"
TOWERS = {
    "vit": ["backbone.img_size=32", "backbone.patch_size=16", "backbone.depth=2", "backbone.embed_dim=32",
            "backbone.num_heads=2"],
    "cnn": ["backbone.name=resnet10t", "backbone.img_size=32", "backbone.patch_size=null",
            "backbone.embed_dim=null", "backbone.depth=null", "backbone.num_heads=null"],
    "open_clip": ["clip.image_tower=open_clip", "data.img_size=32",
                  "clip.vision_cfg={width: 32, layers: 2, patch_size: 16, head_width: 16}"],
}  # fmt: skip


def clip_cfg(tower: str, *more: str):
    return C.load("clip_demo", [*TOWERS[tower], "clip.embed_dim=16", TEXT, *more])


def export(cfg, objective, folder, name="tiny-clip"):
    c = cfg.clip
    model_cfg = tower_configs(
        c.model, text_cfg=dict(c.text_cfg), vision_cfg=dict(c.vision_cfg), embed_dim=c.embed_dim,
        image_size=factory.img_size(cfg),
    )  # fmt: skip
    d = cfg.data
    return save_open_clip(objective, folder, model_cfg, name=name, mean=list(d.mean), std=list(d.std))


@pytest.mark.parametrize("tower", list(TOWERS))
def test_open_clip_loads_the_export_with_identical_features(tower, tmp_path):
    cfg = clip_cfg(tower)
    torch.manual_seed(0)
    objective = factory.build_objective(cfg).eval()
    with torch.no_grad():  # non-trivial values where a mapping could go wrong silently
        objective.logit_scale.fill_(2.5)
        if tower == "vit":
            objective.backbone.model.patch_embed.proj.bias.normal_()  # folded into the position embedding
            objective.backbone.model.cls_token.normal_()
    folder = export(cfg, objective, tmp_path / "oc")

    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = factory.build_tokenizer(cfg)(["a small red circle", "a big blue square at the top", "x"])
    by_dir, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    open_clip.add_model_config(folder / "tiny-clip.json")
    by_name, _, _ = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(folder / WEIGHTS))
    for model in (by_dir, by_name):
        diffs = compare(objective, model.eval(), images, tokens)
        assert max(diffs.values()) < 1e-5, diffs
        assert type(model).__name__ == "CLIP"  # open_clip's standard layout, not CustomTextCLIP
    # the same preparation of a picture as mmssl's CLIP evaluation view
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    _, val_view = factory.build_views(cfg)
    ours = val_view(picture)["image"]
    theirs = preprocess(picture)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    cfg_json = json.loads((folder / "open_clip_config.json").read_text())
    assert cfg_json["preprocess_cfg"]["mean"] == pytest.approx(list(cfg.data.mean))


def test_settings_open_clip_cannot_express_are_refused(tmp_path):
    cfg = clip_cfg("vit", "clip.model=ViT-B-32-quickgelu")
    with pytest.raises(Unsupported, match="QuickGELU.*both towers"):
        export(cfg, factory.build_objective(cfg), tmp_path / "a")
    cfg = clip_cfg("cnn", "backbone.img_size=32")
    objective = factory.build_objective(cfg)
    objective.backbone.model.global_pool.pool_type = "max"
    with pytest.raises(Unsupported, match="pooling 'max'"):
        export(cfg, objective, tmp_path / "b")
