"""MaskFeat with several targets (maskfeat.targets=[hog, pixel], MaskFeat Table 13): one linear head per target,
and the loss is the sum of each target's masked MSE, computed here from skimage-independent pieces: the HOG target
module on its own and the raw patches (ops.patchify)."""

from __future__ import annotations

import pytest
import torch

from mmssl import config as C
from mmssl import factory
from mmssl.losses import masked_mse
from mmssl.ops import patchify
from mmssl.targets.hog import HOGTarget

VIT = ["backbone.img_size=32", "backbone.patch_size=16", "backbone.depth=1", "backbone.embed_dim=32",
       "backbone.num_heads=2"]  # fmt: skip


def test_loss_is_the_sum_of_per_target_masked_mses():
    cfg = C.load("maskfeat_pixel_hog_demo", VIT)
    assert list(cfg.maskfeat.targets) == ["hog", "pixel"]
    torch.manual_seed(0)
    objective = factory.build_objective(cfg)
    hog_dim = 3 * cfg.maskfeat.nbins * (16 // cfg.maskfeat.cell_size) ** 2  # 108 per 16 px patch
    assert objective.head.out_features == hog_dim + 16 * 16 * 3  # two heads side by side

    images = torch.randn(4, 3, 32, 32)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]])
    out = objective({"image": images}, mask=mask)
    pred = out["pred"]  # (B, L, 108 + 768)
    hog = HOGTarget(16, cell_size=cfg.maskfeat.cell_size, nbins=cfg.maskfeat.nbins)(images)
    pixels = patchify(images, 16)  # the network input's values (dataset-normalised), not per-patch normalised
    l_hog = masked_mse(pred[..., :hog_dim], hog, mask)
    l_pixel = masked_mse(pred[..., hog_dim:], pixels, mask)
    torch.testing.assert_close(out["loss"], l_hog + l_pixel)
    torch.testing.assert_close(out["hog/loss"], l_hog)
    torch.testing.assert_close(out["pixel/loss"], l_pixel)
    # not one MSE over the concatenation (which would weigh each target by its width)
    joint = masked_mse(pred, torch.cat([hog, pixels], dim=-1), mask)
    assert not torch.allclose(out["loss"], joint)


def test_single_target_is_unchanged_and_bad_targets_name_the_key():
    objective = factory.build_objective(C.load("maskfeat_demo", VIT))
    assert isinstance(objective.target, HOGTarget)
    with pytest.raises(C.ConfigError, match="maskfeat.targets"):
        C.load("maskfeat_demo", [*VIT, "maskfeat.targets=[hog, depth]"])
    with pytest.raises(C.ConfigError, match="maskfeat.targets"):
        C.load("maskfeat_demo", [*VIT, "maskfeat.targets=[hog, hog]"])
