"""Composed objectives (objectives/compose.py, factory/compose.py): SLIP = CLIP + SimCLR on one image tower. The
composite's loss and shared-encoder gradient equal the two objectives run separately on the same batch and views;
views are the union of the parts'; what cannot compose is refused with the key named."""

from __future__ import annotations

import copy

import pytest
import torch

from mmssl import config as C
from mmssl import factory
from mmssl.data import shapes
from mmssl.data.shards import collate
from mmssl.data.transforms import ApplyView, CaptionTokens

VIT = ["backbone.img_size=32", "backbone.patch_size=8", "backbone.depth=1", "backbone.embed_dim=32",
       "backbone.num_heads=2"]  # fmt: skip
SLIP = [*VIT, "clip.embed_dim=16", "clip.text_cfg={context_length: 16, width: 32, heads: 2, layers: 1}",
        "simclr.proj_hidden_dim=64", "simclr.proj_out_dim=16"]  # fmt: skip


def slip_cfg(*overrides: str) -> C.DictConfig:
    return C.load("slip_demo", [*SLIP, *overrides])


def batch_of(cfg, n: int = 6, seed: int = 0) -> dict:
    spec = factory.spec_of(cfg)
    apply = ApplyView(spec.views(cfg)[0], CaptionTokens(spec.tokenizer(cfg)))
    return collate(
        [apply({"image": img, "caption": cap}) for _, img, cap, _, _ in shapes.samples("train", n, seed)]
    )


def test_slip_recipe_is_the_papers():
    cfg = C.load("slip_vitb16")
    assert dict(cfg.compose.objectives) == {"clip": 1.0, "simclr": 0.5}
    s = cfg.simclr
    assert (s.proj_num_layers, s.proj_hidden_dim, s.proj_out_dim, s.temperature) == (3, 4096, 256, 0.1)
    objective = factory.build_objective(C.load("slip_demo", SLIP))
    head = objective.parts["simclr"].head.mlp
    assert isinstance(head[-1], torch.nn.Linear) and head[-1].bias is not None  # SLIP's head ends in a Linear
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head) == 2


def test_slip_loss_and_gradient_equal_the_two_objectives_run_separately():
    cfg = slip_cfg()
    torch.manual_seed(0)
    slip = factory.build_objective(cfg).train()
    # two independent objectives with the composite's weights (each deep copy has its own encoder)
    clip, simclr = copy.deepcopy(slip.parts["clip"]), copy.deepcopy(slip.parts["simclr"])
    assert clip.backbone is not simclr.backbone
    batch = batch_of(cfg)
    assert {"image", "view1", "view2", "tokens"} <= set(batch)  # the union of both parts' views

    out = slip(batch)
    out["loss"].backward()
    l_clip, l_simclr = clip(batch)["loss"], simclr(batch)["loss"]
    (l_clip + 0.5 * l_simclr).backward()

    torch.testing.assert_close(out["loss"], l_clip + 0.5 * l_simclr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["clip/loss"], l_clip)
    torch.testing.assert_close(out["simclr/loss"], l_simclr)
    # one encoder, trained by both: its gradient is the weighted sum of the two separate ones
    for name, p in slip.backbone.named_parameters():
        separate = clip.backbone.get_parameter(name).grad + simclr.backbone.get_parameter(name).grad
        torch.testing.assert_close(p.grad, separate, rtol=1e-4, atol=1e-6, msg=name)
    assert slip.parts["clip"].backbone is slip.parts["simclr"].backbone is slip.backbone
    shared = sum(p.numel() for p in slip.backbone.parameters())
    total = sum(p.numel() for p in slip.parameters())  # each parameter once
    assert total == shared + sum(
        p.numel() for n, p in slip.named_parameters() if not n.startswith("backbone.")
    )


def test_views_that_make_the_same_key_are_refused():
    cfg = C.load("mae_demo", [*VIT, "objective=compose", "compose.objectives={mae: 1.0, maskfeat: 1.0}"])
    with pytest.raises(C.ConfigError, match=r"compose.objectives.*\['image'\]"):
        factory.build_views(cfg)


@pytest.mark.parametrize(
    "objectives, match",
    [
        ("{nope: 1.0}", "'nope' is not an objective"),
        ("{compose: 1.0}", "cannot use itself"),
        ("{clip: 0.0}", "weights must be > 0"),
    ],
)
def test_bad_compositions_name_the_key(objectives, match):
    with pytest.raises(C.ConfigError, match=match):
        slip_cfg(f"compose.objectives={objectives}")


def test_parts_without_a_shared_encoder_are_refused():
    cfg = C.load("igpt_demo", ["objective=compose", "compose.objectives={igpt: 1.0}"])
    with pytest.raises(C.ConfigError, match="'igpt' cannot be a part"):
        factory.spec_of(cfg)
