"""timm backbones behind one small contract (see DESIGN.md §1).

Every backbone exposes ``embed_dim``, ``patch_size`` (the stride of one output token), ``grid_size``,
``num_patches``, ``num_prefix_tokens``, ``forward_tokens(images, keep=None)`` -> (B, prefix + L, D) and
``forward_pooled(images)`` -> (B, D). The wrapped timm model lives in ``.model`` untouched, so its
``state_dict()`` loads straight back into ``timm.create_model(name)`` (that is how export works).
"""

from __future__ import annotations

import timm
import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from mmssl.attention import use_self_attention
from mmssl.flops import blocks_flops, linear_flops
from mmssl.linear import use_fast_linear
from mmssl.ops import gather_tokens, sincos_2d


class ViTBackbone(nn.Module):
    """A timm ``VisionTransformer`` whose encoder can run on a subset of patch tokens (MAE §3)."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        if getattr(model, "dynamic_img_size", False):
            raise ValueError("ViTBackbone needs a fixed image size (dynamic_img_size=False)")
        if model.pos_embed is None:
            raise ValueError("ViTBackbone needs a ViT with an absolute position embedding (pos_embed)")
        self.model = model
        self.embed_dim: int = model.embed_dim
        self.patch_size: int = model.patch_embed.patch_size[0]
        self.grid_size: tuple[int, int] = tuple(model.patch_embed.grid_size)
        self.num_patches: int = model.patch_embed.num_patches
        self.num_prefix_tokens: int = model.num_prefix_tokens

    def use_fixed_sincos_pos_embed(self) -> None:
        """Replace the learned position embedding by frozen 2-D sin-cos values (MAE §A.1).

        The tensor stays timm's ``pos_embed`` parameter (with ``requires_grad=False``), so the state dict keeps
        timm's layout.
        """
        prefix = 0 if self.model.no_embed_class else self.num_prefix_tokens
        emb = sincos_2d(self.embed_dim, self.grid_size, num_prefix_tokens=prefix)
        self.model.pos_embed.data.copy_(emb)
        self.model.pos_embed.requires_grad_(False)

    def _prefix_tokens(self, batch_size: int) -> Tensor | None:
        """CLS / register tokens with their position embedding, (B, prefix, D), or None."""
        m = self.model
        tokens = [t for t in (m.cls_token, m.reg_token) if t is not None]
        if not tokens:
            return None
        prefix = torch.cat([t.expand(batch_size, -1, -1) for t in tokens], dim=1)
        if not m.no_embed_class:
            prefix = prefix + m.pos_embed[:, : self.num_prefix_tokens]
        return prefix

    def embed_patches(
        self, images: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None
    ) -> Tensor:
        """(B, C, H, W) -> patch tokens with position embedding, (B, L, D); no prefix tokens.

        With ``mask`` (B, L), 1/True = masked, and ``mask_token`` (1, 1, D), masked patch embeddings are replaced
        by the token *before* the position embedding is added (BEiT §2.2, MaskFeat §3), so the encoder sees
        where a patch is missing but nothing of its content.
        """
        m = self.model
        x = m.patch_embed(images)
        if mask is not None:
            if mask_token is None:
                raise ValueError(
                    "embed_patches: a mask needs a mask_token to put in place of the masked patches"
                )
            x = torch.where(mask.bool().unsqueeze(-1), mask_token.to(x.dtype), x)
        pos = m.pos_embed if m.no_embed_class else m.pos_embed[:, self.num_prefix_tokens :]
        return x + pos

    def encode(self, patch_tokens: Tensor) -> Tensor:
        """Prepend prefix tokens and run the transformer: (B, K, D) -> (B, prefix + K, D), normed."""
        m = self.model
        prefix = self._prefix_tokens(patch_tokens.shape[0])
        x = patch_tokens if prefix is None else torch.cat([prefix, patch_tokens], dim=1)
        x = m.norm_pre(m.pos_drop(x))
        if m.grad_checkpointing and torch.is_grad_enabled():  # set_grad_checkpointing(), as forward_features
            x = checkpoint_seq(m.blocks, x)  # recomputes each block's activations in the backward pass
        else:
            x = m.blocks(x)
        return m.norm(x)

    def forward_tokens(
        self,
        images: Tensor,
        keep: Tensor | None = None,
        mask: Tensor | None = None,
        mask_token: Tensor | None = None,
    ) -> Tensor:
        """(B, C, H, W) -> (B, prefix + K, D); ``keep`` (B, K) selects visible patches (all when None);
        ``mask`` + ``mask_token`` replace masked patches instead (see :meth:`embed_patches`)."""
        x = self.embed_patches(images, mask, mask_token)
        if keep is not None:
            x = gather_tokens(x, keep)
        return self.encode(x)

    def forward_pooled(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D) with the model's own pooling (CLS token or average)."""
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def no_weight_decay(self) -> set[str]:
        # timm names dist_token / reg_token even for models without them; keep the parameters that exist
        own = {n for n, _ in self.model.named_parameters()}
        return {f"model.{n}" for n in self.model.no_weight_decay() if n in own}

    def forward_flops(self, num_kept: int | None = None) -> int:
        """Forward FLOPs for one image (counted as in ``mmssl/flops.py``): the patch embedding of every patch,
        then the blocks on the prefix tokens and ``num_kept`` patch tokens (all patches when None)."""
        m = self.model
        tokens = self.num_prefix_tokens + (self.num_patches if num_kept is None else num_kept)
        proj = m.patch_embed.proj  # Conv2d(C, D, kernel=stride=patch): a linear map of each flattened patch
        patch = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        return linear_flops(self.num_patches, patch, self.embed_dim) + blocks_flops(tokens, m.blocks)


class CNNBackbone(nn.Module):
    """A timm CNN (ResNet, ConvNeXt, ...): tokens are the final feature map's positions, no prefix."""

    def __init__(self, model: nn.Module, img_size: int):
        super().__init__()
        self.model = model
        self.embed_dim: int = model.num_features
        self.patch_size: int = model.feature_info[-1]["reduction"]
        side = img_size // self.patch_size
        self.grid_size: tuple[int, int] = (side, side)
        self.num_patches: int = side * side
        self.num_prefix_tokens: int = 0

    def forward_tokens(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        if keep is not None:
            raise ValueError("a CNN backbone cannot drop patches; use a ViT for masked modelling")
        return self.model.forward_features(images).flatten(2).transpose(1, 2)  # (B, h*w, C)

    def forward_pooled(self, images: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def no_weight_decay(self) -> set[str]:
        return set()


Backbone = ViTBackbone | CNNBackbone


def create_backbone(name: str, img_size: int = 224, **timm_kwargs) -> Backbone:
    """Build a timm model by name (never downloading weights) and wrap it in the backbone contract.

    ViT sizes can be overridden by keyword (``patch_size``, ``embed_dim``, ``depth``, ``num_heads``...);
    ``None`` values are ignored so config defaults pass straight through.
    """
    kwargs = {k: v for k, v in timm_kwargs.items() if v is not None}
    if name not in timm.list_models():
        arch, tag = timm.models.split_model_name_tag(name)
        if tag and arch in timm.list_models():  # e.g. vit_base_patch16_224.augreg_in21k: a weights tag
            raise ValueError(
                f"backbone.name={name!r}: timm model {arch!r} exists, but '.{tag}' names pretrained weights, which "
                f"mmssl never downloads; use backbone.name={arch} and pass a local weights file (e.g. "
                "clip.backbone_weights, or an exported backbone for the evaluation tools)"
            )
        raise ValueError(f"backbone.name: unknown timm model {name!r}")
    if name in timm.list_models(module="vision_transformer"):
        kwargs["img_size"] = img_size
    else:
        vit_only = sorted(set(kwargs) & {"patch_size", "embed_dim", "depth", "num_heads"})
        if vit_only:
            raise ValueError(f"backbone.{vit_only[0]}: size overrides apply to ViTs only, not to {name!r}")
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if not isinstance(model, VisionTransformer) and not hasattr(model, "feature_info"):
        raise ValueError(
            f"backbone.name: {name!r} is neither a timm VisionTransformer nor a CNN with feature_info"
        )
    return as_backbone(model, img_size)


def as_backbone(model: nn.Module, img_size: int) -> Backbone:
    """A timm model (fresh or loaded) -> the backbone contract; ``img_size`` sizes a CNN's token grid. Its
    timm attention layers take ``mmssl.attention``'s product (explicit in bf16 on CPU, SDPA elsewhere) and its
    linear layers ``mmssl.linear``'s (oneDNN for fp32 on CPUs where it wins); the same weights and keys."""
    use_self_attention(model)
    use_fast_linear(model)
    return ViTBackbone(model) if isinstance(model, VisionTransformer) else CNNBackbone(model, img_size)
