"""A timm ViT encoder as a native ``transformers.ViTModel`` folder (config, safetensors, image processor).

The two implementations are the same network (Dosovitskiy et al. 2021): a patch convolution, a CLS token,
learned position embeddings over CLS + patches, pre-norm blocks with fused q/k/v (timm) or separate q, k, v
projections (transformers), exact GELU, and a final LayerNorm. timm's ``blocks.i.attn.qkv`` (3D, D) splits
into transformers' ``q_proj``, ``k_proj``, ``v_proj`` in that order (timm ``Attention.forward`` unbinds q, k, v
from the fused output). What a ``ViTModel`` cannot express is refused with :class:`Unsupported`: register
tokens, no CLS token, position embeddings without the CLS slot, layer scale, q/k norms, norms before the blocks
or inside the patch embedding, other activations, and average pooling behind ``fc_norm`` (transformers applies
its final LayerNorm to every token; timm's ``fc_norm`` normalises the pooled vector instead).

``ViTModel`` output: ``last_hidden_state`` (B, 1 + N, D) equals timm's ``forward_features``; its CLS row is the
encoder's pooled feature (timm ``global_pool="token"``). The folder's ``ViTImageProcessor`` resizes straight to
the square input size (no centre crop: transformers' ViT processor has none), then normalises with the run's
mean and std.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from mmssl.interop import Unsupported

VIT_GELU = (nn.GELU,)


def _identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def check_block(blk: nn.Module, where: str) -> None:
    """A timm ``Block`` that transformers' ViT layer computes the same way, or :class:`Unsupported`."""
    if type(blk) is not Block:
        raise Unsupported(
            f"{where}: {type(blk).__name__} blocks; transformers' ViT has timm's plain Block only"
        )
    extras = {
        "layer scale (init_values)": not (_identity(blk.ls1) and _identity(blk.ls2)),
        "q/k norm (qk_norm)": not (_identity(blk.attn.q_norm) and _identity(blk.attn.k_norm)),
        "a norm inside attention (scale_attn_norm)": not _identity(getattr(blk.attn, "norm", None)),
        "a norm inside the MLP (scale_mlp_norm)": not _identity(getattr(blk.mlp, "norm", None)),
        "no bias on the attention output or MLP": any(
            m.bias is None for m in (blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2)
        ),
        "norms other than LayerNorm": not (
            isinstance(blk.norm1, nn.LayerNorm) and isinstance(blk.norm2, nn.LayerNorm)
        ),  # timm.layers.LayerNorm subclasses torch's and computes the same
        "an activation other than exact GELU": not (
            isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == "none"
        ),
    }
    found = [name for name, present in extras.items() if present]
    if found:
        raise Unsupported(f"{where} uses {', '.join(found)}, which transformers' ViT cannot express")


def check_vit(model: nn.Module, where: str = "encoder", pooled: bool = True) -> None:
    """A timm ``VisionTransformer`` that ``ViTModel`` reproduces exactly, or :class:`Unsupported` naming why.
    ``pooled``: the pooled feature must be the normed CLS token (a ``ViTModel``'s final norm is per token)."""
    if not isinstance(model, VisionTransformer):
        raise Unsupported(f"{where}: {type(model).__name__} is not a timm VisionTransformer")
    extras = {
        "no CLS token (class_token=False)": not model.has_class_token,
        "register tokens": model.num_reg_tokens > 0,
        "position embeddings without the CLS slot (no_embed_class)": model.no_embed_class,
        "a norm before the blocks (pre_norm)": not _identity(model.norm_pre),
        "a norm in the patch embedding": not _identity(model.patch_embed.norm),
        "attention pooling": model.attn_pool is not None,
        "dynamic image size": model.dynamic_img_size,
        "a bias-free patch embedding": model.patch_embed.proj.bias is None,
    }
    if pooled:
        extras["pooling other than the CLS token behind the final norm (global_pool)"] = not (
            model.global_pool == "token" and _identity(model.fc_norm)
        )
    found = [name for name, present in extras.items() if present]
    if found:
        raise Unsupported(f"{where} uses {', '.join(found)}, which transformers' ViT cannot express")
    for i, blk in enumerate(model.blocks):
        check_block(blk, f"{where} block {i}")
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise Unsupported(f"{where}: LayerNorms with different eps {sorted(eps)}; transformers' ViT has one")


def block_state(blk: Block, prefix: str) -> dict[str, Tensor]:
    """One timm block -> transformers' ViT / ViTMAE layer keys under ``prefix`` (q/k/v split from qkv)."""
    q, k, v = blk.attn.qkv.weight.chunk(3)
    pairs: dict[str, tuple[Tensor, Tensor | None]] = {
        "attention.q_proj": (q, None),
        "attention.k_proj": (k, None),
        "attention.v_proj": (v, None),
        "attention.o_proj": (blk.attn.proj.weight, blk.attn.proj.bias),
        "layernorm_before": (blk.norm1.weight, blk.norm1.bias),
        "layernorm_after": (blk.norm2.weight, blk.norm2.bias),
        "mlp.fc1": (blk.mlp.fc1.weight, blk.mlp.fc1.bias),
        "mlp.fc2": (blk.mlp.fc2.weight, blk.mlp.fc2.bias),
    }
    if blk.attn.qkv.bias is not None:
        qb, kb, vb = blk.attn.qkv.bias.chunk(3)
        for name, bias in (("q_proj", qb), ("k_proj", kb), ("v_proj", vb)):
            pairs[f"attention.{name}"] = (pairs[f"attention.{name}"][0], bias)
    state = {}
    for name, (weight, bias) in pairs.items():
        state[f"{prefix}.{name}.weight"] = weight
        if bias is not None:
            state[f"{prefix}.{name}.bias"] = bias
    return state


def encoder_state(model: VisionTransformer, prefix: str = "") -> dict[str, Tensor]:
    """A timm ViT's weights under transformers' ViT names (``embeddings.*``, ``layers.i.*``, ``layernorm.*``)."""
    state = {
        f"{prefix}embeddings.cls_token": model.cls_token,
        f"{prefix}embeddings.position_embeddings": model.pos_embed,
        f"{prefix}embeddings.patch_embeddings.projection.weight": model.patch_embed.proj.weight,
        f"{prefix}embeddings.patch_embeddings.projection.bias": model.patch_embed.proj.bias,
    }
    for i, blk in enumerate(model.blocks):
        state |= block_state(blk, f"{prefix}layers.{i}")
    if not _identity(model.norm):
        state[f"{prefix}layernorm.weight"] = model.norm.weight
        state[f"{prefix}layernorm.bias"] = model.norm.bias
    return state


def config_args(model: VisionTransformer) -> dict[str, Any]:
    """``ViTConfig`` / ``ViTMAEConfig`` encoder arguments describing timm ViT ``model``."""
    blk = model.blocks[0]
    eps = next(m.eps for m in model.modules() if isinstance(m, nn.LayerNorm))
    img = model.patch_embed.img_size
    patch = model.patch_embed.patch_size
    if img[0] != img[1] or patch[0] != patch[1]:
        raise Unsupported(f"image size {img} / patch size {patch}: transformers' ViT takes square ones")
    return {
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": blk.attn.num_heads,
        "intermediate_size": blk.mlp.fc1.out_features,
        "hidden_act": "gelu",
        "layer_norm_eps": eps,
        "image_size": img[0],
        "patch_size": patch[0],
        "num_channels": model.patch_embed.proj.in_channels,
        "qkv_bias": blk.attn.qkv.bias is not None,
    }


def load_checked(hf: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Copy ``state`` into ``hf``; every parameter must be given (buffers, e.g. causal masks, may stay), and
    nothing else: a mismatch is a mapping out of date with the installed transformers, said so."""
    result = hf.load_state_dict({k: v.detach().clone().float() for k, v in state.items()}, strict=False)
    buffers = {name for name, _ in hf.named_buffers()}
    missing = [k for k in result.missing_keys if k not in buffers]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{what}: weight mapping out of date with the installed transformers (missing "
            f"{missing[:4]}, unexpected {result.unexpected_keys[:4]})"
        )


def to_vit_model(model: VisionTransformer) -> nn.Module:
    """timm ViT -> ``transformers.ViTModel`` (no pooler) with the same weights, eval mode."""
    import transformers

    check_vit(model)
    config = transformers.ViTConfig(**config_args(model), attn_implementation="eager")
    hf = transformers.ViTModel(config, add_pooling_layer=False).eval()
    load_checked(hf, encoder_state(model), "ViTModel")
    return hf


def image_processor(img_size: int, mean: list[float], std: list[float], interpolation: str = "bicubic"):
    """``ViTImageProcessor``: resize to ``img_size`` x ``img_size``, scale to [0, 1], normalise."""
    import transformers
    from transformers.image_utils import PILImageResampling

    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}.get(
        interpolation, PILImageResampling.BICUBIC
    )
    return transformers.ViTImageProcessor(
        do_resize=True,
        size={"height": img_size, "width": img_size},
        resample=resample,
        image_mean=list(mean),
        image_std=list(std),
    )


def save_with_processor(
    hf: nn.Module, folder: str | Path, *, mean: list[float], std: list[float], interpolation: str
) -> Path:
    """Write ``hf`` (a ViT or ViTMAE model) as a ``from_pretrained`` folder with the ``ViTImageProcessor`` of its
    input size."""
    folder = Path(folder)
    hf.save_pretrained(folder)
    image_processor(hf.config.image_size, mean, std, interpolation).save_pretrained(folder)
    return folder


def save_vit_model(
    model: VisionTransformer, folder: str | Path, *, mean: list[float], std: list[float], interpolation: str
) -> Path:
    """Write a ``ViTModel.from_pretrained`` / ``AutoModel`` / ``AutoImageProcessor`` folder."""
    return save_with_processor(to_vit_model(model), folder, mean=mean, std=std, interpolation=interpolation)


@torch.no_grad()
def round_trip(model: VisionTransformer, folder: str | Path, batch: int = 2) -> float:
    """Load ``folder`` with ``transformers.AutoModel`` and compare ``last_hidden_state`` with timm's
    ``forward_features`` on random images: the max absolute difference."""
    import transformers

    hf = transformers.AutoModel.from_pretrained(folder).eval()
    size = hf.config.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = model.eval().forward_features(images)
    got = hf(pixel_values=images).last_hidden_state
    return (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
