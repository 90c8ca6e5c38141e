"""A config's encoder, and the encoders inside checkpoints (Lightning ``.ckpt``; any objective that keeps its
encoder at ``.backbone``, see objectives/base.py)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmssl import config as C
from mmssl.backbones import Backbone, CNNBackbone, ViTBackbone, create_backbone
from mmssl.export import (
    BACKBONE_PREFIX,
    CheckpointError,
    load_matching,
    load_state_checked,
    read_checkpoint,
    read_encoder_weights,
    strip_prefix,
)


def build_backbone(cfg: DictConfig) -> Backbone:
    b = cfg.backbone
    return create_backbone(
        b.name,
        img_size=b.img_size,
        patch_size=b.patch_size,
        embed_dim=b.embed_dim,
        depth=b.depth,
        num_heads=b.num_heads,
        drop_path_rate=b.drop_path_rate or None,
    )


def img_size(cfg: DictConfig) -> int:
    return cfg.data.img_size or cfg.backbone.img_size


def encoder_of(objective: nn.Module, source: str = "objective") -> Backbone:
    """The objective's encoder (contract: ``objective.backbone``, see objectives/base.py)."""
    backbone = getattr(objective, "backbone", None)
    if backbone is None:
        raise TypeError(f"{source}: {type(objective).__name__} exposes no encoder as .backbone")
    return backbone


def checkpoint_config(
    path: str | Path, ckpt: dict, overrides: list[str] | tuple[str, ...] = ()
) -> DictConfig:
    """A checkpoint's run config (+ dotted overrides), with the files it started from left out: the weights in
    the checkpoint replace them (``backbone.weights``, an iGPT palette kept as a buffer)."""
    values = OmegaConf.merge(ckpt["hyper_parameters"]["config"], OmegaConf.from_dotlist(list(overrides)))
    if values.get("objective") == "igpt":
        values.igpt.palette = None  # the palette is a buffer in the checkpoint; its file need not exist here
    if "backbone" in values:
        values.backbone.weights = None
    try:
        return C.from_dict(OmegaConf.to_container(values), source=f"config in {path}")
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
            f"checkpoint {path}: the {cfg.objective!r} objective's encoder is not a timm model (no weights under "
            f"'{BACKBONE_PREFIX}*'), so it cannot be exported to timm or loaded as one; the evaluation tools "
            "load it through build.load_encoder"
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


def load_pretrained_backbone(objective: nn.Module, path: str, name: str = "this") -> dict[str, list[str]]:
    """Continued pretraining (``backbone.weights``): a freshly built objective (after its own initialisation) takes
    the encoder weights of ``path`` (``export.read_encoder_weights``: a pretraining ``.ckpt``, an export, a timm
    file); missing and unexpected keys are reported, a shape mismatch is an error naming the key. A ``.ckpt`` of
    the same objective whose other weights fit (MAE's decoder, SimCLR's projection head, CLIP's text tower)
    brings those too: the run continues that pretraining, with a new optimizer and schedule from step 0."""
    backbone, where = getattr(objective, "backbone", None), f"config key 'backbone.weights': {path}"
    if not isinstance(backbone, (ViTBackbone, CNNBackbone)):
        clip = " (set clip.image_tower=backbone)" if name == "clip" else ""
        raise C.ConfigError(
            f"{where}: the {name} objective has no timm backbone (.backbone) to start from{clip}"
        )
    report = load_matching(backbone.model, read_encoder_weights(path, where), where)
    rest, why = {}, "only a pretraining .ckpt of the same objective has them"
    if str(path).endswith(".ckpt"):
        ckpt = read_checkpoint(path)
        rest = {k.removeprefix("objective."): v for k, v in ckpt["state_dict"].items()
                if not k.startswith(f"{BACKBONE_PREFIX}")}  # fmt: skip
        own = {k: v for k, v in objective.state_dict().items() if not k.startswith("backbone.model.")}
        if ckpt["hyper_parameters"]["config"].get("objective") != name:
            rest, why = (
                {},
                f"the checkpoint is of another objective ({ckpt['hyper_parameters']['config'].get('objective')})",
            )
        elif rest.keys() != own.keys() or any(v.shape != own[k].shape for k, v in rest.items()):
            rest, why = {}, "they do not fit this config"
        objective.load_state_dict(rest, strict=False)
    print(f"mmssl: backbone.weights={path}: {report['loaded']} of {len(backbone.model.state_dict())} backbone "
          f"tensors loaded; missing (kept at init): {report['missing'] or 'none'}; unexpected (ignored): "
          f"{report['unexpected'] or 'none'}; the objective's other weights: "
          f"{f'{len(rest)} tensors loaded too' if rest else f'at init ({why})'}")  # fmt: skip
    return report | {"other_weights": sorted(rest)}
