"""The optimizer's weight-decay groups and the warmup-cosine schedule against the papers' reference code."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_cfg

from mmssl import config as C
from mmssl.factory import build_objective
from mmssl.optim import create_optimizer, param_groups, warmup_cosine_schedule


def decayed(objective, weight_decay: float = 0.05) -> set[str]:
    """Names of the parameters that the AdamW of ``optim.create_optimizer`` decays."""
    names = {id(p): n for n, p in objective.named_parameters()}
    opt = create_optimizer(objective, "adamw", lr=1e-3, weight_decay=weight_decay)
    return {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}


def mae_reference_decayed(model) -> set[str]:
    """facebookresearch/mae main_pretrain.py: ``optim_factory.add_weight_decay(model, wd)`` of timm 0.3.2 with no
    skip list: frozen parameters are left out, 1-D parameters and biases get no decay, everything else does."""
    return {
        n for n, p in model.named_parameters()
        if p.requires_grad and not (len(p.shape) == 1 or n.endswith(".bias"))
    }  # fmt: skip


def test_mae_decays_what_the_reference_decays_tokens_included():
    objective = build_objective(tiny_cfg())
    ours = decayed(objective)
    assert ours == mae_reference_decayed(objective)
    # the (1, 1, D) tokens are 3-D, so the reference decays them; the sin-cos embeddings are frozen
    assert {"backbone.model.cls_token", "decoder.mask_token"} <= ours
    assert not {"backbone.model.pos_embed", "decoder.pos_embed"} & ours


def slowfast_decayed(model) -> set[str]:
    """SlowFast optimizer.py ``construct_optimizer`` (LAYER_DECAY 1.0) for in1k_VIT_B_MaskFeat_PT.yaml: the skip
    list is ``no_weight_decay()``, empty under MVIT.ZERO_DECAY_POS_CLS False; ZERO_WD_1D_PARAM True exempts 1-D
    parameters and biases; BN parameters go to their own group (BN.WEIGHT_DECAY, 0 by default); no BN here."""
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in model.modules())
    return {
        n for n, p in model.named_parameters()
        if p.requires_grad and not (len(p.shape) == 1 or n.endswith(".bias"))
    }  # fmt: skip


MASKFEAT_TINY = ["backbone.img_size=32", "backbone.depth=2", "backbone.embed_dim=64", "backbone.num_heads=4"]


def test_maskfeat_decays_the_mask_token_as_slowfast_or_exempts_it_as_mmpretrain():
    objective = build_objective(C.load("maskfeat_demo", MASKFEAT_TINY))
    ours = decayed(objective)
    assert ours == slowfast_decayed(objective)
    assert {"mask_token", "backbone.model.cls_token", "backbone.model.pos_embed"} <= ours
    # MMPretrain's maskfeat config: custom_keys {'mask_token': decay_mult 0} (pos_embed and cls_token decayed)
    mmpretrain = build_objective(
        C.load("maskfeat_demo", [*MASKFEAT_TINY, "maskfeat.mask_token_weight_decay=false"])
    )
    assert decayed(mmpretrain) == ours - {"mask_token"}


def lr_trace(warmup_steps: int, total_steps: int, peak: float, **kwargs) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = warmup_cosine_schedule(opt, warmup_steps, total_steps, **kwargs)
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return lrs


def test_warmup_starts_at_warmup_start_lr_as_slowfast():
    """SlowFast lr_policy.py ``get_lr_at_epoch`` (cosine, COSINE_AFTER_WARMUP): linear from WARMUP_START_LR to
    BASE_LR over the warmup, then cosine down to COSINE_END_LR; here per step instead of per fractional epoch."""
    base, start, end, warmup, total = 2e-3, 1e-6, 1e-6, 10, 50

    def slowfast(epoch: float) -> float:
        def cosine(e: float) -> float:
            return end + (base - end) * (math.cos(math.pi * (e - warmup) / (total - warmup)) + 1) * 0.5

        if epoch < warmup:
            return epoch * (cosine(warmup) - start) / warmup + start
        return cosine(epoch)

    ours = lr_trace(warmup, total, base, min_lr=end, warmup_start_lr=start)
    assert ours == pytest.approx([slowfast(s) for s in range(total)], rel=1e-9, abs=1e-15)
    assert ours[0] == pytest.approx(start)


def test_warmup_starts_at_zero_by_default_as_mae():
    """facebookresearch/mae util/lr_sched.py ``adjust_learning_rate``: lr * epoch / warmup_epochs, from 0."""
    base, warmup, total = 1.5e-4, 5, 20

    def mae(epoch: float) -> float:
        if epoch < warmup:
            return base * epoch / warmup
        return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (total - warmup)))

    assert lr_trace(warmup, total, base) == pytest.approx([mae(s) for s in range(total)], rel=1e-9, abs=1e-15)


def test_recipes_warm_up_from_their_references_start():
    assert C.load("mae_vitb").optim.warmup_start_lr == 0.0  # MAE: from 0
    for recipe in ("maskfeat_vitb", "maskfeat_demo", "maskfeat_digits"):
        assert C.load(recipe).optim.warmup_start_lr == 1e-6, recipe  # SOLVER.WARMUP_START_LR
    with pytest.raises(C.ConfigError, match="optim.warmup_start_lr"):
        C.load("mae_demo", ["optim.warmup_start_lr=-1"])


def test_adamw_runs_torchs_fused_kernel_with_the_plain_kernels_updates():
    """AdamW (and Adam) take torch's fused kernel on CPU; three updates match the plain for-loop AdamW on the
    same groups to fp32 rounding. SGD and LARS are left as they were."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    opt = create_optimizer(model, "adamw", lr=1e-2, weight_decay=0.05)
    assert opt.defaults["fused"] is True
    ref = torch.optim.AdamW(param_groups(twin, "adamw", 0.05), lr=1e-2, betas=(0.9, 0.95), fused=False)
    for _ in range(3):
        x = torch.randn(5, 8)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not create_optimizer(model, "sgd", lr=0.1, weight_decay=0.0).defaults.get("fused")
    assert not create_optimizer(model, "lars", lr=0.1, weight_decay=1e-6).defaults.get("fused")
