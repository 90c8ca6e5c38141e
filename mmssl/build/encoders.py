"""A config's encoder, and the encoders inside checkpoints (Lightning ``.ckpt``; any objective that keeps its
encoder at ``.backbone``, see objectives/base.py)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from mmssl import config as C
from mmssl.backbones import Backbone, create_backbone
from mmssl.export import (
    BACKBONE_PREFIX,
    CheckpointError,
    load_state_checked,
    read_checkpoint,
    strip_prefix,
)


def build_backbone(cfg: DictConfig) -> Backbone:
    b = cfg.backbone
    backbone = create_backbone(
        b.name,
        img_size=b.img_size,
        patch_size=b.patch_size,
        embed_dim=b.embed_dim,
        depth=b.depth,
        num_heads=b.num_heads,
        drop_path_rate=b.drop_path_rate or None,
    )
    if b.grad_checkpointing:
        try:  # timm's own switch; ViTBackbone.encode honours it too
            backbone.model.set_grad_checkpointing(True)
        except AssertionError as e:  # timm models without it assert "gradient checkpointing not supported"
            raise C.ConfigError(f"config key 'backbone.grad_checkpointing': {b.name}: {e}") from None
    return backbone


def img_size(cfg: DictConfig) -> int:
    return cfg.data.img_size or cfg.backbone.img_size


def encoder_of(objective: nn.Module, source: str = "objective") -> Backbone:
    """The objective's encoder (contract: ``objective.backbone``, see objectives/base.py)."""
    backbone = getattr(objective, "backbone", None)
    if backbone is None:
        raise TypeError(f"{source}: {type(objective).__name__} exposes no encoder as .backbone")
    return backbone


def checkpoint_config(path: str | Path, ckpt: dict) -> DictConfig:
    try:
        return C.from_dict(ckpt["hyper_parameters"]["config"], source=f"config in {path}")
    except C.ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its run config does not load here: {e}") from None


def load_backbone(path: str | Path) -> tuple[DictConfig, Backbone, dict]:
    """Lightning checkpoint -> (run config, its encoder with weights, raw checkpoint), for any objective that
    keeps its encoder at ``.backbone`` (state dict keys ``objective.backbone.model.*``); nothing else is built."""
    ckpt = read_checkpoint(path)
    cfg = checkpoint_config(path, ckpt)
    state = strip_prefix(ckpt["state_dict"], BACKBONE_PREFIX)
    if not state:
        raise CheckpointError(
            f"checkpoint {path}: no encoder weights under '{BACKBONE_PREFIX}*' (the {cfg.objective!r} objective "
            "must expose its encoder as .backbone, see objectives/base.py)"
        )
    backbone = build_backbone(cfg)
    what = f"backbone {cfg.backbone.name!r} of its config"
    load_state_checked(backbone.model, state, f"checkpoint {path}", what)
    return cfg, backbone.eval(), ckpt


def encoder_info(cfg: DictConfig) -> dict:
    """What an evaluation or export needs to know about a run's images."""
    d = cfg.data
    return {
        "architecture": cfg.backbone.name,
        "img_size": img_size(cfg),
        "mean": list(d.mean),
        "std": list(d.std),
        "interpolation": d.interpolation,
        "crop_pct": 0.875,
        "objective": cfg.objective,
    }
