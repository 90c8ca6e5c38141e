"""A config's backbone, the run config inside a checkpoint, and the trained encoder inside one (Lightning
``.ckpt``; any objective that keeps its encoder at ``.backbone``, see objectives/base.py). Files are read by
``mmssl.checkpoints``; which objective has which encoder is the table's business (``objectives.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmssl import config as C
from mmssl.backbones import Backbone, ViTBackbone, create_backbone
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
    if isinstance(backbone, ViTBackbone):
        _check_patches(cfg, backbone)
    if b.grad_checkpointing:
        try:  # timm's own switch; ViTBackbone.encode honours it too
            backbone.model.set_grad_checkpointing(True)
        except AssertionError as e:  # timm models without it assert "gradient checkpointing not supported"
            raise C.ConfigError(f"config key 'backbone.grad_checkpointing': {b.name}: {e}") from None
    return backbone


def _check_patches(cfg: DictConfig, vit: ViTBackbone) -> None:
    """A ViT cuts its input into whole patches: timm's strided patch embedding would silently drop the pixels
    past the last whole patch, and patch targets (objectives/masked.py) cannot be cut at all; and it takes
    only the image size it was built for (a fixed position embedding)."""
    b, patch = cfg.backbone, vit.patch_size
    if b.img_size % patch:
        fits = f"{b.img_size - b.img_size % patch} or {b.img_size - b.img_size % patch + patch}"
        raise C.ConfigError(
            f"config key 'backbone.img_size': {b.img_size} is not a multiple of the patch size {patch} of "
            f"{b.name} (backbone.patch_size); use e.g. {fits}"
        )
    if img_size(cfg) != b.img_size:
        raise C.ConfigError(
            f"config key 'data.img_size': {cfg.data.img_size}, but the ViT is built for backbone.img_size="
            f"{b.img_size} (its position embedding has that many patches); leave data.img_size unset"
        )


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
