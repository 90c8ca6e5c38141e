"""Analytic FLOP counts (mmssl/flops.py and the objectives' flops_per_sample) against PyTorch's own counter.

``torch.utils.flop_counter.FlopCounterMode`` counts every matrix product that runs; on CPU it does not know the
fused attention kernel, so the counts run with the math SDPA backend (plain batched matmuls, the same FLOPs).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cfg
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmssl import config as C
from mmssl.backbones import create_backbone
from mmssl.factory import build_objective
from mmssl.flops import TRAIN_PER_FORWARD, attention_flops, linear_flops
from mmssl.objectives.igpt import ImageGPT
from mmssl.sequence import SequenceTransformer
from mmssl.targets.palette import Palette

B = 4


def counted(fn, backward: bool = False) -> float:
    """FLOPs per sample of ``fn()`` (and its backward) as PyTorch counts them."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = fn()
        if backward:
            out["loss"].backward()
    return counter.get_total_flops() / B


def tiny_vit(**kw):
    sizes = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, **kw}
    return create_backbone("vit_tiny_patch16_224", **sizes)


def test_vit_forward_matches_the_formula_and_the_counter():
    vit = tiny_vit(mlp_ratio=3.0)
    N, D, H, L = 17, 64, 192, 16  # CLS + 4x4 patches; MLP 3 x 64
    per_block = 2 * 4 * N * D * D + 2 * 2 * N * N * D + 2 * 2 * N * D * H  # the docstring's formula
    assert vit.forward_flops() == linear_flops(L, 3 * 8 * 8, D) + 2 * per_block
    images = torch.randn(B, 3, 32, 32)
    assert counted(lambda: vit.forward_tokens(images)) == pytest.approx(vit.forward_flops(), rel=0.01)
    keep = torch.stack([torch.randperm(L)[:5] for _ in range(B)])  # MAE: encoder on 5 visible patches
    assert counted(lambda: vit.forward_tokens(images, keep=keep)) == pytest.approx(
        vit.forward_flops(5), rel=0.01
    )


def test_attention_is_quadratic_in_tokens():
    assert attention_flops(2 * 10, 8) == 4 * attention_flops(10, 8)


def test_mae_counts_encoder_on_visible_and_decoder_on_all_tokens():
    objective = build_objective(tiny_cfg())  # mask ratio 0.75: 4 of 16 patches visible
    images = torch.randn(B, 3, 32, 32)
    forward = counted(lambda: objective({"image": images}))
    assert objective.flops_per_sample() / TRAIN_PER_FORWARD == pytest.approx(forward, rel=0.02)
    train = counted(lambda: objective({"image": images}), backward=True)
    # 3x forward overcounts only the patch embedding's input gradient, which no one needs (the images)
    assert objective.flops_per_sample() == pytest.approx(train, rel=0.1)
    assert objective.flops_per_sample() > train


def test_maskfeat_counts_encoder_on_all_patches_and_the_linear_head():
    cfg = C.load("maskfeat_demo", ["backbone.img_size=32", "backbone.depth=2", "backbone.embed_dim=64",
                                   "backbone.num_heads=4"])  # fmt: skip
    objective = build_objective(cfg)
    images = torch.randn(B, 3, 32, 32)
    forward = counted(lambda: objective({"image": images}))
    assert objective.flops_per_sample() / TRAIN_PER_FORWARD == pytest.approx(forward, rel=0.03)


def test_simclr_counts_two_views_with_a_vit_and_nothing_for_a_cnn():
    vit = ["objective=simclr", "backbone.name=vit_tiny_patch16_224", "backbone.img_size=32",
           "backbone.patch_size=8", "backbone.depth=2"]  # fmt: skip
    objective = build_objective(C.load(None, vit))
    views = {"view1": torch.randn(B, 3, 32, 32), "view2": torch.randn(B, 3, 32, 32)}
    forward = counted(lambda: objective(views))
    assert objective.flops_per_sample() / TRAIN_PER_FORWARD == pytest.approx(forward, rel=0.02)
    cnn = build_objective(
        C.load(None, ["objective=simclr", "backbone.name=resnet18", "backbone.img_size=32"])
    )
    assert cnn.flops_per_sample() is None


@pytest.mark.parametrize("mode", ["ar", "bert"])
def test_igpt_counts_the_transformer_and_the_logits(mode):
    transformer = SequenceTransformer(16, 64, embed_dim=32, depth=2, num_heads=4, causal=mode == "ar")
    objective = ImageGPT(transformer, Palette(torch.rand(16, 3)), mode=mode)
    images = torch.randn(B, 3, 8, 8)
    forward = counted(lambda: objective({"image": images}))
    # the palette look-up (one small matmul) is counted by PyTorch, not by the formula
    assert objective.flops_per_sample() / TRAIN_PER_FORWARD == pytest.approx(forward, rel=0.03)
