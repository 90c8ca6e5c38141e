"""Fine-tuning pieces: layer-wise lr decay against MAE's util/lr_decay.py and timm, the classifier built from an
encoder, its losses against independent formulas, and the label checks that run before training."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay

from mmssl.backbones import create_backbone
from mmssl.checkpoints import CheckpointError
from mmssl.data import demo
from mmssl.data.module import resolve_shards
from mmssl.eval.finetune import (
    Classifier,
    check_architecture,
    check_shard_labels,
    classifier_from_encoder,
    make_mixup,
)
from mmssl.optim import create_optimizer, warmup_cosine_schedule


def mae_layer_id(name: str, num_layers: int) -> int:
    """facebookresearch/mae util/lr_decay.py get_layer_id_for_vit, restated."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def mae_groups(
    model: torch.nn.Module, weight_decay: float, layer_decay: float
) -> dict[str, tuple[float, float]]:
    """name -> (lr scale, weight decay) by MAE's param_groups_lrd semantics."""
    num_layers = len(model.blocks) + 1
    nwd = model.no_weight_decay()
    out = {}
    for n, p in model.named_parameters():
        decay = 0.0 if p.ndim == 1 or n in nwd else weight_decay
        out[n] = (layer_decay ** (num_layers - mae_layer_id(n, num_layers)), decay)
    return out


def timm_groups(
    model: torch.nn.Module, weight_decay: float, layer_decay: float
) -> dict[str, tuple[float, float]]:
    groups = param_groups_layer_decay(model, weight_decay, model.no_weight_decay(), layer_decay=layer_decay)
    by_id = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def test_layer_decay_groups_equal_mae_lr_decay_and_timm_for_vit_b():
    lr, wd, decay = 2e-3, 0.05, 0.65
    # ours: an encoder rebuilt as MAE's fine-tuning ViT-B (global pool + fc_norm), inside the Classifier wrapper
    model, _ = classifier_from_encoder(create_backbone("vit_base_patch16_224"), 1000, global_pool="avg")
    opt = create_optimizer(Classifier(model), "adamw", lr, wd, (0.9, 0.999), layer_decay=decay)
    ours = {}
    names = {id(p): n.removeprefix("model.") for n, p in Classifier(model).named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            ours[names[id(p)]] = (g["lr"] / lr, g["weight_decay"])
    with torch.device("meta"):  # the oracles need names and shapes only
        reference = timm.create_model(
            "vit_base_patch16_224", global_pool="avg", fc_norm=True, num_classes=1000
        )
    mae, oracle = mae_groups(reference, wd, decay), timm_groups(reference, wd, decay)
    assert set(ours) == set(mae) == set(oracle) and len(ours) == 152
    for name in mae:
        assert ours[name] == pytest.approx(mae[name], rel=1e-12), name
        assert oracle[name] == pytest.approx(mae[name], rel=1e-12), name
    assert ours["patch_embed.proj.weight"] == pytest.approx((decay**13, wd))
    assert ours["blocks.11.mlp.fc1.weight"] == pytest.approx((decay, wd))
    assert ours["pos_embed"] == pytest.approx((decay**13, 0.0)) and ours["head.weight"] == (1.0, wd)
    assert opt.param_groups[0]["lr"] == lr  # group 0 (what train/lr logs) is the head's

    # the schedule multiplies every group alike: lr x scale x (min + (1 - min) cos), MAE's lr_sched.py
    schedule = warmup_cosine_schedule(opt, warmup_steps=5, total_steps=20, min_lr=1e-6)
    for _ in range(12):
        opt.step()
        schedule.step()
    cosine = 0.5 * (1 + np.cos(np.pi * (12 - 5) / 15))
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["lr_scale"] * (1e-6 + (lr - 1e-6) * cosine), rel=1e-9)


def tiny_vit(**kw):
    return create_backbone(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, **kw
    )


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_classifier_keeps_every_encoder_weight_and_adds_a_small_head(pool):
    backbone = tiny_vit()
    model, report = classifier_from_encoder(backbone, 7, global_pool=pool, head_init_std=2e-5)
    new = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if pool == "avg" else set())
    assert set(report["missing"]) == new
    assert set(report["unused"]) == ({"norm.weight", "norm.bias"} if pool == "avg" else set())
    own = model.state_dict()
    for k, v in backbone.model.state_dict().items():
        if k in own and k not in new:
            assert torch.equal(own[k], v), k
    assert model.head.weight.shape == (7, 64) and model.head.bias.abs().sum() == 0
    assert 1e-5 < model.head.weight.std() < 4e-5
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)  # stochastic depth, timm's linear rule
    if (
        pool == "token"
    ):  # CLS after the pretrained final norm: the encoder's own pooled features, then the head
        x = torch.randn(2, 3, 32, 32)
        model.eval()
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True),
                              backbone.eval().forward_pooled(x), atol=1e-6)  # fmt: skip


def test_cnn_classifier_replaces_only_the_fc_layer():
    backbone = create_backbone("resnet18", img_size=32)
    model, report = classifier_from_encoder(backbone, 10, drop_path_rate=0.0)
    assert report["missing"] == ["fc.weight", "fc.bias"] and report["unused"] == []
    with pytest.raises(ValueError, match="global_pool=token needs a ViT"):
        classifier_from_encoder(backbone, 10, global_pool="token")


def test_losses_and_accuracy_match_independent_formulas():
    torch.manual_seed(0)
    model, _ = classifier_from_encoder(tiny_vit(), 10, drop_path_rate=0.0, head_init_std=0.02)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    plain = Classifier(model, mixup=None, smoothing=0.1)
    logits = model.eval()(x)
    out = plain.eval()({"image": x, "label": y})  # evaluation: plain cross-entropy, top-1/top-5 in percent
    assert out["loss"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    ranks = (logits > logits.gather(1, y[:, None])).sum(1)  # classes scored above the true one
    assert out["top1"].item() == pytest.approx(100 * (ranks == 0).float().mean().item())
    assert out["top5"].item() == pytest.approx(100 * (ranks < 5).float().mean().item())
    model.train()
    train = plain.train()({"image": x, "label": y})  # training without mixing: smoothed cross-entropy
    assert train["loss"].item() == pytest.approx(
        F.cross_entropy(train["logits"], y, label_smoothing=0.1).item()
    )

    # training with mixup (alpha 0.8, no cutmix): lam ~ Beta(0.8, 0.8) from numpy, each image mixed with its
    # mirror in the batch, soft targets smoothed then mixed alike (timm Mixup, mode "batch")
    model.eval()  # no drop path, so the same function is compared
    mixed = Classifier(model, make_mixup(10, mixup=0.8, cutmix=0.0, smoothing=0.1), smoothing=0.1)
    mixed.training = True  # the wrapper in training mode (mixing on); the network stays deterministic
    np.random.seed(3)
    assert np.random.rand() < 1.0  # timm first draws whether to mix at all (prob 1)
    lam = np.random.beta(0.8, 0.8)
    np.random.seed(3)
    got = mixed({"image": x.clone(), "label": y})["loss"]
    soft = F.one_hot(y, 10) * 0.9 + 0.01
    target = lam * soft + (1 - lam) * soft.flip(0)
    expected = (-target * F.log_softmax(model(lam * x + (1 - lam) * x.flip(0)), -1)).sum(-1).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_architecture_check_names_both_sizes():
    check_architecture(create_backbone("vit_base_patch16_224").model, "vit_base_patch16_224", "enc")
    with pytest.raises(CheckpointError, match="another architecture.*'depth': 2.*'depth': 12.*arch=null"):
        check_architecture(tiny_vit().model, "vit_base_patch16_224", "enc")


def test_label_checks_before_training(tmp_path):
    val = resolve_shards("demo:digits/val", "val")
    counts = check_shard_labels(val, "cls", 10, "data.val_shards")
    assert sum(counts.values()) == 540 and sorted(counts) == list(range(10))
    with pytest.raises(ValueError, match=r"data.val_shards: sample .* has label \d, outside the head's 0..4"):
        check_shard_labels(val, "cls", 5, "data.val_shards")
    photos = resolve_shards("demo:photos/val", "train")  # real images, no labels
    with pytest.raises(ValueError, match=r"none of the 100 samples read has a label \(tar member '.cls'\)"):
        check_shard_labels(photos, "cls", 10, "data.train_shards", max_samples=100)
    assert demo.ensure_demo("digits") is not None
