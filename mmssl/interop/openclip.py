"""A CLIP objective as an open_clip model: checkpoint + model config, both towers and the temperature.

The folder holds ``open_clip_model.safetensors`` (open_clip's standard ``CLIP`` layout: ``visual.*``, the text
tower's ``token_embedding``/``positional_embedding``/``transformer.*``/``ln_final``/``text_projection`` at the top
level, ``logit_scale``), ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``, what
``create_model_and_transforms("local-dir:FOLDER")`` reads) and ``NAME.json`` (the bare model config, for
``open_clip.add_model_config``), so either of these loads it offline::

    open_clip.create_model_and_transforms("local-dir:FOLDER")
    open_clip.add_model_config("FOLDER/NAME.json")
    open_clip.create_model_and_transforms("NAME", pretrained="FOLDER/open_clip_model.safetensors")

The image tower is written as open_clip builds it:

* an open_clip tower (``clip.image_tower=open_clip``) keeps its keys under ``visual.``;
* a timm ViT backbone + ``image_proj`` becomes open_clip's own ``VisionTransformer``: the same computation
  (patch convolution, CLS token, learned position embeddings, pre-norm blocks whose fused q/k/v is
  ``nn.MultiheadAttention``'s ``in_proj``, a final LayerNorm, then the CLS token, or the average of the patch
  tokens behind timm's ``fc_norm`` = open_clip's ``final_ln_after_pool``), projected by ``proj`` = the transposed
  ``image_proj``. open_clip's patch convolution has no bias: timm's bias b adds the same vector to every patch
  token, so it moves into the patch rows of the position embedding (exact up to float rounding);
* a timm CNN backbone becomes open_clip's ``TimmModel`` (``vision_cfg.timm_model_name``: trunk = the timm model,
  average pooling, a bias-free linear projection), for architectures timm builds from the name alone.

What open_clip cannot express is refused with :class:`Unsupported` (register tokens, layer scale, q/k norms, an
activation the text tower does not share: open_clip's ``quick_gelu`` switches both towers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from mmssl.backbones import CNNBackbone, ViTBackbone
from mmssl.export import timm_args
from mmssl.interop import Unsupported
from mmssl.interop.hf_vit import _identity, check_block
from mmssl.objectives.clip import CLIP

WEIGHTS = "open_clip_model.safetensors"  # the first name open_clip's local-dir loader looks for
CONFIG = "open_clip_config.json"
MODEL_KEYS = ("embed_dim", "quick_gelu", "vision_cfg", "text_cfg")


def tower_configs(
    model: str,
    *,
    text_cfg: dict | None = None,
    vision_cfg: dict | None = None,
    embed_dim: int | None = None,
    image_size: int | None = None,
) -> dict[str, Any]:
    """The open_clip model config a CLIP run built (``objectives/clip.py``: the named model's config with the
    run's ``clip.text_cfg``/``clip.vision_cfg`` overrides, image size and joint width)."""
    base = open_clip.get_model_config(model.replace("/", "-"))
    if base is None:
        raise Unsupported(f"clip.model={model!r}: not an open_clip architecture")
    out = {
        "embed_dim": embed_dim or base["embed_dim"],
        "quick_gelu": bool(base.get("quick_gelu", False)),
        "vision_cfg": {**base["vision_cfg"], **(vision_cfg or {})},
        "text_cfg": {**base["text_cfg"], **(text_cfg or {})},
    }
    if image_size is not None:
        out["vision_cfg"]["image_size"] = image_size
    return out


def _vit_tower(backbone: ViTBackbone, proj: nn.Linear, quick_gelu: bool) -> tuple[dict, dict[str, Tensor]]:
    model: VisionTransformer = backbone.model
    extras = {
        "register tokens": model.num_reg_tokens > 0,
        "no CLS token": not model.has_class_token,
        "position embeddings without the CLS slot (no_embed_class)": model.no_embed_class,
        "a norm in the patch embedding": not _identity(model.patch_embed.norm),
        "attention pooling": model.attn_pool is not None,
        "a norm before the blocks other than LayerNorm": not (
            _identity(model.norm_pre) or isinstance(model.norm_pre, nn.LayerNorm)
        ),
    }
    found = [name for name, present in extras.items() if present]
    if found:
        raise Unsupported(f"CLIP image backbone uses {', '.join(found)}, which open_clip cannot express")
    if quick_gelu:
        raise Unsupported(
            "the text tower uses QuickGELU and the timm image backbone GELU: open_clip's quick_gelu switches "
            "both towers"
        )
    for i, blk in enumerate(model.blocks):
        check_block(blk, f"CLIP image backbone block {i}")
    if model.global_pool == "token" and _identity(model.fc_norm):
        pool, post, after = "tok", model.norm, False
    elif model.global_pool == "avg" and _identity(model.norm) and not _identity(model.fc_norm):
        pool, post, after = "avg", model.fc_norm, True
    else:
        raise Unsupported(
            f"CLIP image backbone pooling global_pool={model.global_pool!r}: open_clip has tok/avg"
        )
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    heads = model.blocks[0].attn.num_heads
    img, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    cfg = {
        "image_size": img[0],
        "patch_size": patch[0],
        "width": model.embed_dim,
        "layers": len(model.blocks),
        "head_width": model.embed_dim // heads,
        "mlp_ratio": model.blocks[0].mlp.fc1.out_features / model.embed_dim,
        "no_ln_pre": _identity(model.norm_pre),
        "pool_type": pool,
        "final_ln_after_pool": after,
        "norm_kwargs": {"eps": norms[0].eps},
    }
    if len({m.eps for m in norms}) != 1 or img[0] != img[1] or patch[0] != patch[1]:
        raise Unsupported("CLIP image backbone: mixed LayerNorm eps or a non-square image/patch size")
    pos = model.pos_embed[0].detach().clone()  # (1 + N, D)
    if model.patch_embed.proj.bias is not None:
        pos[1:] += model.patch_embed.proj.bias.detach()  # open_clip's conv1 has no bias
    state = {
        "visual.conv1.weight": model.patch_embed.proj.weight,
        "visual.class_embedding": model.cls_token[0, 0],
        "visual.positional_embedding": pos,
        "visual.ln_post.weight": post.weight,
        "visual.ln_post.bias": post.bias,
        "visual.proj": proj.weight.T,
    }
    if not cfg["no_ln_pre"]:
        state |= {"visual.ln_pre.weight": model.norm_pre.weight, "visual.ln_pre.bias": model.norm_pre.bias}
    for i, blk in enumerate(model.blocks):
        p = f"visual.transformer.resblocks.{i}."
        qkv_bias = blk.attn.qkv.bias
        state |= {
            p + "ln_1.weight": blk.norm1.weight,
            p + "ln_1.bias": blk.norm1.bias,
            p + "attn.in_proj_weight": blk.attn.qkv.weight,  # q, k, v stacked in both
            p + "attn.in_proj_bias": qkv_bias if qkv_bias is not None else torch.zeros(3 * model.embed_dim),
            p + "attn.out_proj.weight": blk.attn.proj.weight,
            p + "attn.out_proj.bias": blk.attn.proj.bias,
            p + "ln_2.weight": blk.norm2.weight,
            p + "ln_2.bias": blk.norm2.bias,
            p + "mlp.c_fc.weight": blk.mlp.fc1.weight,
            p + "mlp.c_fc.bias": blk.mlp.fc1.bias,
            p + "mlp.c_proj.weight": blk.mlp.fc2.weight,
            p + "mlp.c_proj.bias": blk.mlp.fc2.bias,
        }
    return cfg, state


def _cnn_tower(backbone: CNNBackbone, proj: nn.Linear, image_size: int) -> tuple[dict, dict[str, Tensor]]:
    model = backbone.model
    args = {k: v for k, v in timm_args(model).items() if k != "num_classes"}
    if args:
        raise Unsupported(
            f"CLIP image backbone {model.default_cfg['architecture']} built with {args}: open_clip's TimmModel "
            "builds a timm model from its name alone"
        )
    pool = getattr(getattr(model, "global_pool", None), "pool_type", None)
    if pool != "avg":
        raise Unsupported(f"CLIP image backbone pooling {pool!r}: open_clip's TimmModel is given 'avg'")
    cfg = {
        "image_size": image_size,
        "timm_model_name": model.default_cfg["architecture"],
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        "timm_proj_bias": False,
    }
    state = {f"visual.trunk.{k}": v for k, v in model.state_dict().items()}
    return cfg, state | {"visual.head.proj.weight": proj.weight}


def check_clip(objective: nn.Module) -> None:
    if not isinstance(objective, CLIP):
        raise Unsupported(f"{type(objective).__name__} is not a CLIP objective")


def to_open_clip(objective: CLIP, model_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(open_clip model config, state dict in open_clip's ``CLIP`` layout) for a CLIP objective.

    ``model_cfg`` is :func:`tower_configs` of the run; its ``vision_cfg`` is replaced when the image tower is
    an mmssl backbone."""
    check_clip(objective)
    cfg = {k: model_cfg[k] for k in MODEL_KEYS if k in model_cfg}
    if hasattr(objective, "backbone"):
        if isinstance(objective.backbone, ViTBackbone):
            vision_cfg, state = _vit_tower(objective.backbone, objective.image_proj, cfg["quick_gelu"])
        else:
            vision_cfg, state = _cnn_tower(
                objective.backbone, objective.image_proj, cfg["vision_cfg"]["image_size"]
            )
        cfg["vision_cfg"] = vision_cfg
    else:
        state = {f"visual.{k}": v for k, v in objective.image_tower.state_dict().items()}
    text = objective.text_tower.state_dict()
    if not any(k.startswith("transformer.") for k in text):
        raise Unsupported(
            f"text tower {type(objective.text_tower).__name__}: not open_clip's TextTransformer"
        )
    state |= dict(text)  # open_clip's CLIP keeps the text tower's parts at the top level
    state["logit_scale"] = objective.logit_scale
    return cfg, state


def save_open_clip(
    objective: CLIP,
    folder: str | Path,
    model_cfg: dict[str, Any],
    *,
    name: str,
    mean: list[float],
    std: list[float],
    interpolation: str = "bicubic",
) -> Path:
    """Write the folder described in the module docstring; ``name`` is the model config's name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg, state = to_open_clip(objective, model_cfg)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(folder / WEIGHTS))
    preprocess = {
        "size": cfg["vision_cfg"]["image_size"],
        "mode": "RGB",
        "mean": list(mean),
        "std": list(std),
        "interpolation": interpolation,
        "resize_mode": "shortest",  # resize the shorter side, centre crop: mmssl's CLIP eval view
        "fill_color": 0,
    }
    (folder / CONFIG).write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2) + "\n"
    )
    (folder / f"{name}.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


@torch.no_grad()
def compare(objective: CLIP, model: nn.Module, images: Tensor, tokens: Tensor) -> dict[str, float]:
    """Max |difference| of unnormalised image and text features and of the logit scale."""
    return {
        "image": (objective.encode_image(images, False) - model.encode_image(images)).abs().max().item(),
        "text": (objective.encode_text(tokens, False) - model.encode_text(tokens)).abs().max().item(),
        "logit_scale": abs(objective.logit_scale.item() - model.logit_scale.item()),
    }


@torch.no_grad()
def round_trip(objective: CLIP, folder: str | Path, batch: int = 2) -> float:
    """Load ``folder`` with ``open_clip.create_model_and_transforms("local-dir:...")`` and compare features on
    random images and token ids: the max absolute difference."""
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    cfg = json.loads((Path(folder) / CONFIG).read_text())["model_cfg"]
    size, text = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.randint(1, text["vocab_size"], (batch, text["context_length"]), generator=g)
    was_training = objective.training
    diffs = compare(objective.eval(), model, images, tokens)
    objective.train(was_training)
    return max(diffs.values())
