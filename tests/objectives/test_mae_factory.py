"""``objectives.masked.mae``: the README's plain-PyTorch MAE gets the paper's construction (fixed sin-cos
position embeddings, MAE's initialize_weights), the same model the recipe path builds."""

from __future__ import annotations

import math

import torch
from conftest import tiny_cfg
from torch import nn

from mmssl.backbones import create_backbone
from mmssl.factory import build_objective
from mmssl.objectives.masked import mae
from mmssl.ops import sincos_2d

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}
DECODER = {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4}


def test_factory_applies_sincos_positions_and_xavier_init():
    objective = mae(create_backbone("vit_tiny_patch16_224", **VIT), **DECODER)
    vit = objective.backbone.model
    torch.testing.assert_close(vit.pos_embed, sincos_2d(64, (4, 4), num_prefix_tokens=1))
    assert not vit.pos_embed.requires_grad and not objective.decoder.pos_embed.requires_grad
    # xavier_uniform (models_mae.py _init_weights), not timm's trunc_normal(0.02): std sqrt(2 / (in + out))
    for name, m in objective.named_modules():
        if isinstance(m, nn.Linear) and m.weight.numel() >= 4096:
            expected = math.sqrt(2 / sum(m.weight.shape))
            assert abs(m.weight.std().item() / expected - 1) < 0.1, name
            assert m.bias is None or not m.bias.any(), name
    patch = vit.patch_embed.proj.weight.flatten(1)
    assert abs(patch.std().item() / math.sqrt(2 / sum(patch.shape)) - 1) < 0.1


def test_factory_is_what_the_recipe_builds():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    recipe = build_objective(cfg)
    torch.manual_seed(0)
    plain = mae(create_backbone(cfg.backbone.name, **VIT), mask_ratio=cfg.mae.mask_ratio, **DECODER)
    ours = plain.state_dict()
    assert ours.keys() == recipe.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in recipe.state_dict().items())
