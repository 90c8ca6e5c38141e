"""SimCLR: NT-Xent against lightly and closed forms, the views, the head, LARS groups, the recipes, gradients."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as v1
from PIL import Image
from torch import nn

from mmssl import config as C
from mmssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, simclr_blur_kernel, simclr_view
from mmssl.factory import build_datamodule, build_objective
from mmssl.losses import nt_xent, nt_xent_logits
from mmssl.optim import create_optimizer

lightly_loss = pytest.importorskip("lightly.loss")

TINY_RESNET = ["objective=simclr", "backbone.name=resnet18", "backbone.img_size=32"]
TINY_VIT = ["objective=simclr", "backbone.name=vit_tiny_patch16_224", "backbone.img_size=32",
            "backbone.patch_size=8", "backbone.depth=2"]  # fmt: skip


def two_views(n: int = 4, size: int = 32) -> dict[str, torch.Tensor]:
    return {"view1": torch.randn(n, 3, size, size), "view2": torch.randn(n, 3, size, size)}


# ---------------------------------------------------------------- loss


def reference_contrastive_loss(h1, h2, h1_large=None, h2_large=None, replica_id=0, temperature=0.1):
    """google-research/simclr tf2/objective.py ``add_contrastive_loss`` in torch, step by step: l2-normalised
    hidden vectors, the self-similarity pushed down by LARGE_NUM, one softmax cross-entropy per direction over
    [logits_ab, logits_aa] and [logits_ba, logits_bb], and ``reduce_mean(loss_a + loss_b)``."""
    large_num = 1e9
    h1, h2 = F.normalize(h1, dim=-1), F.normalize(h2, dim=-1)
    h1_large = h1 if h1_large is None else F.normalize(h1_large, dim=-1)
    h2_large = h2 if h2_large is None else F.normalize(h2_large, dim=-1)
    n, big = h1.shape[0], h1_large.shape[0]
    labels_idx = torch.arange(n) + replica_id * n
    labels = F.one_hot(labels_idx, big * 2).to(h1.dtype)
    masks = F.one_hot(labels_idx, big).to(h1.dtype)
    logits_aa = h1 @ h1_large.T / temperature - masks * large_num
    logits_bb = h2 @ h2_large.T / temperature - masks * large_num
    logits_ab = h1 @ h2_large.T / temperature
    logits_ba = h2 @ h1_large.T / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels, reduction="none")
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels, reduction="none")
    return (loss_a + loss_b).mean()


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_equals_the_reference_add_contrastive_loss(temperature):
    z1, z2 = torch.randn(6, 16, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)
    expected = reference_contrastive_loss(z1, z2, temperature=temperature)
    assert nt_xent(z1, z2, temperature=temperature).item() == pytest.approx(expected.item(), rel=1e-5)
    # replica 1 of 2 (tpu_cross_replica_concat): its 3 local images against the enlarged batch of 6
    r = 1
    mine = (z1[3:], z2[3:])
    expected = reference_contrastive_loss(*mine, z1, z2, replica_id=r, temperature=temperature)
    ours = nt_xent(*mine, z1, z2, rank=r, temperature=temperature)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_simclr_objective_loss_is_nt_xent():
    objective = build_objective(C.load(None, TINY_VIT))
    batch = two_views()
    out = objective(batch)
    with torch.no_grad():
        z1, z2 = objective.head(objective.embed(torch.cat([batch["view1"], batch["view2"]]))).split(4)
    assert out["loss"].item() == pytest.approx(nt_xent(z1, z2, temperature=0.1).item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 7])
def test_nt_xent_matches_lightly(temperature, n):
    z1, z2 = torch.randn(n, 16, dtype=torch.float64), torch.randn(n, 16, dtype=torch.float64)
    ours = nt_xent(z1, z2, temperature=temperature)
    theirs = lightly_loss.NTXentLoss(temperature=temperature)(z1.float(), z2.float())
    # lightly averages over the 2n anchors; the reference (and mmssl) sums the two directions: factor 2
    assert ours.item() == pytest.approx(2 * theirs.item(), abs=1e-5)


def test_nt_xent_gradient_matches_lightly():
    z = torch.randn(2, 6, 32, requires_grad=True)
    nt_xent(z[0], z[1], temperature=0.1).backward()
    ours = z.grad.clone()
    z.grad = None
    lightly_loss.NTXentLoss(temperature=0.1)(z[0], z[1]).backward()
    torch.testing.assert_close(ours, 2 * z.grad, atol=1e-6, rtol=1e-5)  # factor 2: see the test above


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_closed_forms(temperature):
    """Identical views of orthonormal embeddings: the positive scores 1/t, the 2N-2 negatives 0, so each
    direction's loss is log(1 + (2N-2) e^(-1/t)); a collapsed batch (all embeddings equal) gives log(2N - 1).
    The reference sums the two directions: twice those."""
    N, t = 5, temperature
    z = torch.eye(N, 8) * 3.0  # any norm: embeddings are L2-normalised
    expected = 2 * math.log(1 + (2 * N - 2) * math.exp(-1 / t))
    assert nt_xent(z, z.clone(), temperature=t).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    same = torch.ones(N, 8)
    assert nt_xent(same, same, temperature=t).item() == pytest.approx(2 * math.log(2 * N - 1), rel=1e-5)


def test_logits_layout_with_rank_offset():
    """Rank 1 of 2, n = 3: its anchors are global images 3..5; the self-similarity is masked, the positive is
    the other view of the same image, and the loss equals the global loss restricted to those rows."""
    N, n, r = 6, 3, 1
    z1_all, z2_all = torch.randn(N, 8), torch.randn(N, 8)
    z1, z2 = z1_all[r * n : (r + 1) * n], z2_all[r * n : (r + 1) * n]
    logits, positive = nt_xent_logits(z1, z2, z1_all, z2_all, rank=r, temperature=0.1)
    assert logits.shape == (2 * n, 2 * N)
    assert positive.tolist() == [9, 10, 11, 3, 4, 5]
    assert torch.isinf(logits[[0, 1, 2, 3, 4, 5], [3, 4, 5, 9, 10, 11]]).all()
    assert torch.isfinite(logits).sum() == 2 * n * (2 * N - 1)
    full, pos_full = nt_xent_logits(z1_all, z2_all, temperature=0.1)
    rows = [3, 4, 5, 9, 10, 11]
    torch.testing.assert_close(logits, full[rows])
    assert positive.tolist() == pos_full[rows].tolist()


def test_nt_xent_is_computed_in_fp32_under_bf16_autocast():
    z1, z2 = torch.randn(16, 128), torch.randn(16, 128)
    reference = nt_xent(z1, z2, temperature=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = nt_xent_logits(z1.bfloat16(), z2.bfloat16(), temperature=0.1)
        loss = nt_xent(z1.bfloat16(), z2.bfloat16(), temperature=0.1)
    assert logits.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), abs=2e-2)  # only the bf16 inputs' rounding


def test_nt_xent_rejects_mismatched_views():
    with pytest.raises(ValueError, match="unequal size"):
        nt_xent(torch.randn(4, 8), torch.randn(3, 8))


# ---------------------------------------------------------------- views


def test_view_matches_torchvision_v1_pipeline_with_the_paper_parameters():
    """Same seed, same draws: torchvision v1 composition written out with SimCLR Appendix A's numbers."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    size = 48
    reference = v1.Compose(
        [
            v1.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=v1.InterpolationMode.BICUBIC),
            v1.RandomHorizontalFlip(),
            v1.RandomApply([v1.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            v1.RandomGrayscale(p=0.2),
            v1.RandomApply([v1.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.5),  # 10% of 48 px, made odd
            v1.ToTensor(),
            v1.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    view = simclr_view(size)
    for seed in range(6):
        torch.manual_seed(seed)
        expected = reference(img), reference(img)
        torch.manual_seed(seed)
        out = view(img)
        assert set(out) == {"view1", "view2"}
        for got, want in zip((out["view1"], out["view2"]), expected, strict=True):
            assert got.shape == (3, size, size)
            assert (got - want).abs().max() < 0.05, seed  # PIL vs tensor rounding in the colour ops


def test_views_differ_and_pickle():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    view = pickle.loads(pickle.dumps(simclr_view(32)))  # DataLoader workers may be spawned
    out = view(img)
    assert not torch.equal(out["view1"], out["view2"])


def test_blur_kernel_is_ten_percent_of_the_side():
    assert [simclr_blur_kernel(s) for s in (224, 96, 32, 19)] == [23, 9, 3, 1]  # reference: radius = side//20


# ---------------------------------------------------------------- head, objective


def test_resnet50_head_is_2048_2048_128_with_bn():
    objective = build_objective(C.load("simclr_resnet50"))
    head = objective.head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 2048), (2048, 128)]
    assert all(m.bias is None for m in linears)
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 2 and not bns[-1].bias.requires_grad and bns[-1].bias.abs().sum() == 0
    assert sum(isinstance(m, nn.ReLU) for m in head.modules()) == 1
    assert objective.backbone.embed_dim == 2048
    # ResNet-50 (23.5M) + head (2048*2048 + 2048*128 + BN)
    assert sum(p.numel() for p in objective.parameters()) == 23_508_032 + 4_456_448 + 2 * (2048 + 128)


def test_head_sized_from_a_vit():
    objective = build_objective(C.load(None, TINY_VIT))
    assert objective.head(torch.randn(3, 192)).shape == (3, 128)
    assert objective.head.mlp[0].in_features == objective.head.mlp[0].out_features == 192


def test_channels_last_gives_the_same_loss():
    cfg = C.load(None, TINY_RESNET)
    torch.manual_seed(0)
    nhwc = build_objective(cfg)
    torch.manual_seed(0)
    nchw = build_objective(C.load(None, [*TINY_RESNET, "simclr.channels_last=false"]))
    assert nhwc.backbone.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    batch = two_views()
    torch.testing.assert_close(nhwc(batch)["loss"], nchw(batch)["loss"], atol=1e-5, rtol=1e-5)


def test_backbone_features_are_what_a_probe_sees():
    objective = build_objective(C.load(None, TINY_RESNET)).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(objective.embed(images), objective.backbone.forward_pooled(images))
    assert objective.embed(images).shape == (2, 512)


# ---------------------------------------------------------------- optimizer, recipes


def test_lars_excludes_bn_and_bias_from_decay_and_adaptation():
    objective = build_objective(C.load(None, TINY_RESNET))
    opt = create_optimizer(objective, "lars", lr=1.0, weight_decay=1e-6)
    names = {id(p): n for n, p in objective.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            excluded = p.ndim <= 1  # BN scales and shifts (ResNet convs and the head have no bias)
            assert group["always_adapt"] is not excluded, names[id(p)]
            assert group["weight_decay"] == (0.0 if excluded else 1e-6), names[id(p)]
    # One real step: a BN scale moves by plain lr x grad; a conv weight by the LARS trust ratio.
    objective(two_views())["loss"].backward()
    bn, conv = objective.backbone.model.bn1.weight, objective.backbone.model.conv1.weight
    before = {k: (p.detach().clone(), p.grad.clone()) for k, p in (("bn", bn), ("conv", conv))}
    opt.step()
    w, g = before["bn"]
    torch.testing.assert_close(bn.detach(), w - g)
    w, g = before["conv"]
    trust = 1e-3 * w.norm() / (g.norm() + 1e-6 * w.norm())  # timm Lars: eeta ||w|| / (||g|| + wd ||w||)
    torch.testing.assert_close(conv.detach(), w - trust * (g + 1e-6 * w), atol=1e-7, rtol=1e-4)


def test_lars_adapts_weights_even_without_weight_decay():
    objective = build_objective(C.load(None, TINY_RESNET))
    opt = create_optimizer(objective, "lars", lr=1.0, weight_decay=0.0)
    adapted = {id(p) for g in opt.param_groups if g["always_adapt"] for p in g["params"]}
    assert id(objective.backbone.model.conv1.weight) in adapted
    assert id(objective.backbone.model.bn1.weight) not in adapted


def test_resnet50_recipe():
    cfg = C.load("simclr_resnet50")
    assert cfg.objective == "simclr" and cfg.backbone.name == "resnet50"
    assert C.global_batch(cfg) == 4096 and cfg.trainer.max_epochs == 100
    assert cfg.optim.name == "lars" and cfg.optim.weight_decay == 1e-6 and cfg.trainer.sync_batchnorm
    assert C.learning_rate(cfg) == pytest.approx(0.3 * 4096 / 256)  # 4.8, SimCLR §3 "Default setting"
    sqrt = C.load("simclr_resnet50", ["optim.lr_scaling=sqrt", "optim.base_lr=0.075"])
    assert C.learning_rate(sqrt) == pytest.approx(0.075 * 64)
    assert tuple(cfg.data.crop_scale) == (0.08, 1.0) and cfg.simclr.temperature == 0.1


def test_vit_small_recipe_builds():
    cfg = C.load("simclr_vit_small")
    assert C.global_batch(cfg) == 4096 and cfg.trainer.sync_batchnorm
    objective = build_objective(cfg)
    assert objective.backbone.embed_dim == 384
    assert objective.head(torch.randn(2, 384)).shape == (2, cfg.simclr.proj_out_dim)


def test_sync_batchnorm_on_cpu_is_refused_naming_the_key():
    with pytest.raises(C.ConfigError, match=r"trainer\.sync_batchnorm"):
        C.load("simclr_resnet50", ["trainer.accelerator=cpu"])


def test_demo_datamodule_yields_two_views(tmp_path, monkeypatch):
    if not os.environ.get("MMSSL_DATA"):
        monkeypatch.setenv("MMSSL_DATA", str(tmp_path))
    cfg = C.load("simclr_digits", ["data.num_workers=0", "data.batch_size=8"])
    dm = build_datamodule(cfg)
    batch = next(iter(dm.train_dataloader()))
    assert batch["view1"].shape == batch["view2"].shape == (8, 3, 32, 32)
    assert not torch.equal(batch["view1"], batch["view2"])


def test_visualize_pairs_each_view_with_its_nearest_second_view():
    objective = build_objective(C.load(None, TINY_RESNET)).eval()
    batch = two_views(3)
    batch["view2"] = batch["view1"].clone()  # identical views: the nearest second view is the image's own
    columns = objective.visualize(batch, lambda x: x.sigmoid(), torch.Generator())
    assert list(columns) == ["view 1", "view 2", "nearest view 2"]
    torch.testing.assert_close(columns["nearest view 2"], columns["view 1"])
    assert all(c.shape == (3, 3, 32, 32) for c in columns.values())
