"""Continued pretraining (``backbone.weights``): a new run of any objective starting from an encoder's weights
(a pretraining checkpoint, an export, a plain timm file). At step 0 the backbone equals the source; MAE started
from a pretrained MAE encoder reaches a lower held-out loss than from scratch; bad sources are named."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from mmssl import config as C
from mmssl.backbones import as_backbone
from mmssl.checkpoints import CheckpointError
from mmssl.data.module import resolve_shards
from mmssl.data.shards import SampleDecoder, eval_pipeline
from mmssl.data.transforms import eval_view
from mmssl.export import export_backbone
from mmssl.factory import build_datamodule, build_module, build_objective, plan

TINY_MAE = ["backbone.depth=2", "backbone.embed_dim=64", "backbone.num_heads=4", "mae.decoder_embed_dim=32",
            "mae.decoder_depth=1", "mae.decoder_num_heads=4", "data.num_workers=0"]  # fmt: skip


def pretraining_checkpoint(path, cfg, objective) -> None:
    """The format tools/pretrain.py writes (state dict + run config)."""
    state = {f"objective.{k}": v for k, v in objective.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": C.to_dict(cfg)}, "global_step": 1}, path)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mae_starts_from_the_source_weights_at_step_0(tmp_path, capsys):
    cfg = C.load("mae_digits", TINY_MAE)
    torch.manual_seed(1)
    source = build_objective(cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # weights no initialisation would produce
    pretraining_checkpoint(tmp_path / "src.ckpt", cfg, source)
    export_backbone(
        source.backbone, tmp_path / "src", img_size=32, mean=[0.5] * 3, std=[0.5] * 3, hf_folder=False
    )
    torch.manual_seed(2)
    scratch = build_objective(C.load("mae_digits", TINY_MAE))

    # a checkpoint of the same objective: the encoder, and the decoder that fits it, continue
    new = C.load("mae_digits", [*TINY_MAE, f"backbone.weights={tmp_path / 'src.ckpt'}"])
    torch.manual_seed(2)
    objective = build_objective(new)
    assert same_state(objective, source)
    assert not objective.backbone.model.pos_embed.requires_grad  # MAE's fixed sin-cos stays frozen
    out = capsys.readouterr().out
    assert "missing (kept at init): none; unexpected (ignored): none; the objective's other weights: " in out
    assert "tensors loaded too" in out

    # an export holds the encoder only; a checkpoint with another decoder brings its encoder only
    for weights, why in ((tmp_path / "src.safetensors", "only a pretraining .ckpt of the same objective has them"),
                         (tmp_path / "src.ckpt", "they do not fit this config")):  # fmt: skip
        torch.manual_seed(2)
        extra = ["mae.decoder_depth=2"] if why.startswith("they") else []
        objective = build_objective(C.load("mae_digits", [*TINY_MAE, *extra, f"backbone.weights={weights}"]))
        assert same_state(objective.backbone, source.backbone)
        if not extra:
            assert same_state(objective.decoder, scratch.decoder)
        assert f"the objective's other weights: at init ({why})" in capsys.readouterr().out

    # a new run: the Lightning module starts at step 0 with a fresh optimizer and the warmup schedule
    module = build_module(new, plan(new, build_datamodule(new)))
    assert same_state(module.objective, source) and module.global_step == 0
    opt = module.configure_optimizers()["optimizer"]
    assert all(not opt.state[p] for g in opt.param_groups for p in g["params"])


def test_simclr_from_an_export_and_clip_tower_from_a_plain_timm_file(tmp_path, capsys):
    simclr_cfg = ["backbone.name=resnet18", "backbone.img_size=32"]
    torch.manual_seed(3)
    resnet = timm.create_model("resnet18", num_classes=0)
    export_backbone(as_backbone(resnet, 32), tmp_path / "r18", img_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    for source in (tmp_path / "r18.safetensors", tmp_path / "r18_hf"):
        objective = build_objective(C.load("simclr_digits", [*simclr_cfg, f"backbone.weights={source}"]))
        assert same_state(objective.backbone.model, resnet)

    # CLIP's image tower from a timm classifier's state dict: the head is reported and ignored
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=5)
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    clip = build_objective(C.load("clip_demo", [f"backbone.weights={tmp_path / 'vit.safetensors'}"]))
    tower = clip.backbone.model.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in vit.state_dict().items() if k in tower)
    assert (
        "unexpected (ignored): ['head.bias', 'head.weight']" in capsys.readouterr().out
    )  # safetensors: sorted


def test_bad_weights_are_named(tmp_path):
    with pytest.raises(C.ConfigError, match="'backbone.weights'.*model-hub name; mmssl never downloads"):
        C.load("mae_digits", ["backbone.weights=hf-hub:timm/vit_base_patch16_224.mae"])
    with pytest.raises(C.ConfigError, match="model-hub name"):
        C.load("mae_digits", ["backbone.weights=timm/vit_base_patch16_224.mae"])
    with pytest.raises(CheckpointError, match="'backbone.weights'.*no such file or folder"):
        build_objective(C.load("mae_digits", [*TINY_MAE, f"backbone.weights={tmp_path / 'none.pth'}"]))
    wide = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=96, num_heads=4
    )
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(
        CheckpointError, match=r"shape mismatch: cls_token \(1, 1, 96\) in the file vs \(1, 1, 64\)"
    ):
        build_objective(C.load("mae_digits", [*TINY_MAE, f"backbone.weights={tmp_path / 'wide.pth'}"]))
    with pytest.raises(
        C.ConfigError,
        match="the 'clip' objective as configured has no timm backbone.*clip.image_tower=backbone",
    ):
        build_objective(
            C.load("clip_demo", ["clip.image_tower=open_clip", f"backbone.weights={tmp_path / 'wide.pth'}"])
        )


def digits(split: str, cfg) -> torch.Tensor:
    view = eval_view(32, 1.0, mean=cfg.data.mean, std=cfg.data.std)
    batches = eval_pipeline(resolve_shards(f"demo:digits/{split}", split), view, 512, rank=0, world_size=1,
                            decoder=SampleDecoder())  # fmt: skip
    return torch.cat([b["image"] for b in batches])


def held_out_loss(objective, images: torch.Tensor) -> float:
    objective.eval()
    torch.manual_seed(0)  # the same random masks for every model compared
    with torch.no_grad():
        return objective({"image": images})["loss"].item()


@pytest.mark.slow
def test_mae_continued_from_a_pretrained_mae_starts_at_a_lower_held_out_loss(tmp_path, capsys):
    cfg = C.load("mae_digits", TINY_MAE)
    train, val = digits("train", cfg), digits("val", cfg)
    torch.manual_seed(0)
    pretrained = build_objective(cfg)
    opt = torch.optim.AdamW(pretrained.parameters(), lr=2e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster than two fighting over shared cores
    for _ in range(150):  # a brief MAE pretraining on the 1257 training digits
        opt.zero_grad()
        pretrained({"image": train[torch.randint(len(train), (64,), generator=gen)]})["loss"].backward()
        opt.step()
    torch.set_num_threads(threads)
    pretraining_checkpoint(tmp_path / "mae.ckpt", cfg, pretrained)

    losses = {}
    for name, extra in (("scratch", []), ("continued", [f"backbone.weights={tmp_path / 'mae.ckpt'}"])):
        torch.manual_seed(1)
        losses[name] = held_out_loss(build_objective(C.load("mae_digits", [*TINY_MAE, *extra])), val)
    assert "20 tensors loaded too" in capsys.readouterr().out  # the decoder continues with the encoder
    assert losses["continued"] == pytest.approx(held_out_loss(pretrained, val))  # the pretraining's own loss
    assert losses["continued"] < 0.5 * losses["scratch"], losses  # measured 0.45 vs 1.71 (200 steps)
