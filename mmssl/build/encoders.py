"""A config's backbone, the run config inside a checkpoint, and the trained encoder inside one (Lightning
``.ckpt``; any objective that keeps its encoder at ``.backbone``, see objectives/base.py). Files are read by
``mmssl.checkpoints``; which objective has which encoder is the table's business (``objectives.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmssl import config as C
from mmssl.backbones import Backbone, create_backbone
from mmssl.checkpoints import CheckpointError, load_state_checked, strip_prefix


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


def checkpoint_config(
    path: str | Path, ckpt: dict, overrides: Sequence[str] = (), reset: Sequence[str] = ()
) -> DictConfig:
    """The validated run config inside a checkpoint, with ``key=value`` ``overrides`` and the keys in ``reset``
    set to null (files whose contents the checkpoint's weights already hold, ``ObjectiveSpec.weight_files``)."""
    values = OmegaConf.merge(ckpt["hyper_parameters"]["config"], OmegaConf.from_dotlist(list(overrides)))
    for key in reset:
        OmegaConf.update(values, key, None)
    try:
        return C.from_dict(OmegaConf.to_container(values), source=f"config in {path}")
    except C.ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its run config does not load here: {e}") from None


def trained_encoder(
    path: str | Path, ckpt: dict, cfg: DictConfig, attr: str = "backbone"
) -> tuple[Backbone, dict]:
    """A read Lightning checkpoint and its run config -> (its encoder with weights, in eval mode; info), for an
    objective that keeps its encoder at ``.<attr>`` (state-dict keys ``objective.<attr>.model.*``); nothing
    else is built. ``info`` is :func:`encoder_info` plus the run's ``config`` (a plain dict) and ``global_step``."""
    prefix = f"objective.{attr}.model."
    state = strip_prefix(ckpt["state_dict"], prefix)
    if not state:
        raise CheckpointError(
            f"checkpoint {path}: no encoder weights under '{prefix}*' (the {cfg.objective!r} objective "
            f"must expose its encoder as .{attr}, see objectives/base.py)"
        )
    backbone = build_backbone(cfg)
    what = f"backbone {cfg.backbone.name!r} of its config"
    load_state_checked(backbone.model, state, f"checkpoint {path}", what)
    info = {**encoder_info(cfg), "config": C.to_dict(cfg), "global_step": int(ckpt.get("global_step", -1))}
    return backbone.eval(), info


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
