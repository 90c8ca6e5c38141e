"""The distributed losses (mmssl/dist.py's gather-with-grad, open_clip's ClipLoss and SigLipLoss exchanges) under
2-process DDP (gloo, CPU): each rank's local loss on its half of the batch, then DDP's gradient average, must give
the loss and gradients of one process holding the whole batch, to 1e-5. Each test also shows that the check can
fail: without the gathered negatives the loss is another number. The CLI path that every objective shares
(tools/pretrain.py under Lightning's ddp on uneven shards) is tests/tools/test_pretrain_cli.py's one 2-process run.

SimCLR's BatchNorm layers run on their running statistics here: per-rank batch statistics differ from global ones
by design (that is what ``trainer.sync_batchnorm`` fixes, and PyTorch's SyncBatchNorm needs a GPU), and these
tests are about the gathered loss and its gradient scale."""

from __future__ import annotations

import pytest
import torch
from conftest import clip_batch, tiny_clip
from dist_helpers import assert_ranks_equal_one_process, one_process, two_processes
from lightly.loss import NTXentLoss  # a dev dependency (pyproject.toml)
from open_clip.loss import SigLipLoss
from torch import nn

from mmssl import config as C
from mmssl.factory import build_objective
from mmssl.losses import clip_loss


def halves_differ(full: torch.Tensor, halves: list[torch.Tensor]) -> bool:
    return not torch.allclose(torch.stack(halves).mean(), full, atol=1e-3)


@pytest.mark.timeout(300)
def test_clip_two_processes_equal_one_process(tmp_path):
    make = lambda: (tiny_clip(), clip_batch())  # noqa: E731
    ranks = [r["clip"] for r in two_processes({"clip": make}, tmp_path)]
    out, grads = one_process(make)
    assert_ranks_equal_one_process(ranks, out["loss"], grads)
    # the check can fail: each half scored against its own captions only (no gathered negatives) differs
    with torch.no_grad():
        img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        halves = [clip_loss(img[s], txt[s], scale, gather=False) for s in (slice(0, 4), slice(4, 8))]
    assert halves_differ(out["loss"], halves)


@pytest.mark.timeout(300)
def test_siglip_two_processes_equal_one_process(tmp_path):
    make = lambda: (tiny_clip("siglip"), clip_batch())  # noqa: E731
    ranks = [r["siglip"] for r in two_processes({"siglip": make}, tmp_path)]
    out, grads = one_process(make)
    assert_ranks_equal_one_process(ranks, out["loss"], grads)
    # the check can fail: each half scored against its own texts only (no exchanged negatives) differs
    with torch.no_grad():
        img, txt, t, b = out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"]
        halves = [SigLipLoss()(img[s], txt[s], t, b) for s in (slice(0, 4), slice(4, 8))]
    assert halves_differ(out["loss"], halves)


SIMCLR = {
    "resnet18": ["objective=simclr", "backbone.name=resnet18", "backbone.img_size=32"],
    "vit": ["objective=simclr", "backbone.name=vit_tiny_patch16_224", "backbone.img_size=32",
            "backbone.patch_size=8", "backbone.depth=2"],
}  # fmt: skip


def simclr(model: str, gather: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The same objective and global batch of 8 in every process, built from fixed seeds."""
    torch.manual_seed(0)
    objective = build_objective(C.load(None, [*SIMCLR[model], f"simclr.gather_distributed={gather}"]))
    for m in objective.modules():
        if isinstance(m, nn.BatchNorm2d):  # timm zero-inits some BN scales; give every block a gradient
            nn.init.uniform_(m.weight, 0.5, 1.5)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # running statistics (see the module docstring); the objective itself stays in train mode
    g = torch.Generator().manual_seed(1)
    return objective, {k: torch.randn(8, 3, 32, 32, generator=g) for k in ("view1", "view2")}


def lightly_ntxent(objective: nn.Module, local: dict[str, torch.Tensor]) -> dict:
    """lightly's NT-Xent on this rank's projections, gathered across ranks when the objective gathers."""
    with torch.no_grad():
        z1, z2 = objective.head(objective.embed(torch.cat([local["view1"], local["view2"]]))).chunk(2)
    loss = NTXentLoss(temperature=0.1, gather_distributed=objective.gather_distributed)
    return {"lightly": loss(z1, z2)}


@pytest.fixture(scope="module")
def simclr_ranks(tmp_path_factory) -> list[dict]:
    cases = {(m, g): (lambda m=m, g=g: simclr(m, g)) for m in SIMCLR for g in (True, False)}
    named = {f"{m}-{'gather' if g else 'local'}": make for (m, g), make in cases.items()}
    return two_processes(named, tmp_path_factory.mktemp("simclr"), extra=lightly_ntxent)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", list(SIMCLR))
def test_simclr_two_processes_equal_one_process(simclr_ranks, model):
    out, grads = one_process(lambda: simclr(model))
    ranks = [r[f"{model}-gather"] for r in simclr_ranks]
    assert_ranks_equal_one_process(ranks, out["loss"], grads)
    for r in (
        ranks
    ):  # lightly's gathered NT-Xent x2: lightly averages over the 2n anchors, mmssl sums both directions
        torch.testing.assert_close(r["local_loss"], 2 * r["lightly"], atol=1e-5, rtol=0)
    # the check can fail: with negatives from the local batch only, the loss is another one
    local = [r[f"{model}-local"] for r in simclr_ranks]
    assert abs(local[0]["loss"].item() - out["loss"].item()) > 1e-2
    for r in local:
        torch.testing.assert_close(r["local_loss"], 2 * r["lightly"], atol=1e-5, rtol=0)
