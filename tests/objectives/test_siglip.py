"""SigLIP (objectives/siglip.py): the loss equals open_clip's SigLipLoss and the paper's formula (Algorithm 1) on
the objective's own features, and scale and bias start at the paper's values. 2-process DDP equal to one process:
tests/test_dist.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import clip_batch, tiny_clip
from open_clip.loss import SigLipLoss

from mmssl import config as C
from mmssl import factory


def algorithm_1(img: torch.Tensor, txt: torch.Tensor, t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The paper's pseudo-code: logits = dot(zimg, ztxt.T) * t + b; labels = 2 eye(n) - 1;
    l = -sum(log_sigmoid(labels * logits)) / n."""
    n = img.shape[0]
    labels = 2 * torch.eye(n) - 1
    return -F.logsigmoid(labels * (img @ txt.T * t + b)).sum() / n


def test_loss_equals_open_clip_and_the_papers_formula():
    objective = tiny_clip("siglip").train()
    out = objective(clip_batch())
    img, txt = out["image_features"], out["text_features"]
    t, b = out["logit_scale"], out["logit_bias"]
    torch.testing.assert_close(out["loss"], SigLipLoss()(img, txt, t, b))
    torch.testing.assert_close(out["loss"], algorithm_1(img, txt, t, b))
    # the loss is not CLIP's: a softmax over the batch gives another number
    logits = img @ txt.T * t
    clip = (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2
    assert not torch.allclose(out["loss"], clip)
    out["loss"].backward()
    assert objective.logit_bias.grad is not None and objective.logit_scale.grad is not None
    assert {"logit_scale", "logit_bias"} <= objective.no_weight_decay()


def test_config_builds_siglip_with_the_papers_init():
    cfg = C.load(
        "siglip_demo",
        ["backbone.depth=1", "clip.text_cfg={context_length: 16, width: 32, heads: 2, layers: 1}"],
    )
    assert C.active_objectives(cfg) == ["siglip", "clip"]
    assert factory.spec_of(cfg).text == "tokens"
    objective = factory.build_objective(cfg)
    assert objective.logit_scale.exp().item() == pytest.approx(10.0)
    assert objective.logit_bias.item() == -10.0
