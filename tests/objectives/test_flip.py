"""FLIP (clip.image_mask_ratio): while training, the image tower encodes exactly round((1 - r) L) random patch
tokens (MAE's masking, ops.random_masking) and nothing of the removed patches reaches the loss; evaluation sees
every patch."""

from __future__ import annotations

import pytest
import torch

from mmssl import config as C
from mmssl import factory
from mmssl.ops import random_masking

TEXT = ["clip.embed_dim=16", "clip.text_cfg={context_length: 16, width: 32, heads: 2, layers: 1}"]


def flip(ratio: float, img: int = 32):
    vit = [f"backbone.img_size={img}", "backbone.patch_size=8", "backbone.depth=1", "backbone.embed_dim=32",
           "backbone.num_heads=2"]  # fmt: skip
    cfg = C.load("flip_demo", [*vit, *TEXT, f"clip.image_mask_ratio={ratio}"])
    torch.manual_seed(0)
    return factory.build_objective(cfg)


def tokens_seen(objective, images: torch.Tensor) -> int:
    """Tokens entering the image tower's first block (prefix + patches)."""
    seen = []
    hook = objective.backbone.model.blocks[0].register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[1])
    )
    try:
        objective.encode_image(images)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("img", [32, 56])  # 16 and 49 patches
def test_tower_sees_round_one_minus_r_of_the_patches(ratio, img):
    objective = flip(ratio, img)
    L, prefix = objective.backbone.num_patches, objective.backbone.num_prefix_tokens
    images = torch.randn(3, 3, img, img)
    assert tokens_seen(objective.train(), images) == prefix + round((1 - ratio) * L)
    assert tokens_seen(objective.eval(), images) == prefix + L  # evaluation: the whole picture


def test_removed_patches_do_not_reach_the_features_and_kept_ones_do():
    objective = flip(0.5).train()
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    before = objective.encode_image(images)
    torch.manual_seed(5)  # the same draw as inside encode_image
    keep = random_masking(torch.rand(2, objective.backbone.num_patches), 0.5)[0]
    grid = objective.backbone.grid_size[1]

    def changed(patch: int) -> torch.Tensor:
        out = images.clone()
        r, c = divmod(patch, grid)
        out[0, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 3.0
        torch.manual_seed(5)
        return objective.encode_image(out)

    removed = sorted(set(range(objective.backbone.num_patches)) - set(keep[0].tolist()))[0]
    torch.testing.assert_close(changed(removed), before)
    assert not torch.allclose(changed(keep[0, 0].item())[0], before[0])


def test_mask_ratio_needs_a_backbone_tower():
    with pytest.raises(C.ConfigError, match="clip.image_mask_ratio"):
        C.load("flip_demo", [*TEXT, "clip.image_tower=open_clip"])
