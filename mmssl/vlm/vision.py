"""The frozen vision side of LLaVA (Liu et al. 2023): patch tokens from one layer of a pretrained encoder.

LLaVA-1.5 takes CLIP ViT-L/14's *penultimate* layer (``mm_vision_select_layer=-2``) and only the patch tokens
(``mm_vision_select_feature="patch"``: the CLS token is dropped), without the final norm. Any encoder with
timm's feature API works the same way: timm ViTs and CNNs, and open_clip visual towers, all provide
``forward_intermediates`` (block outputs without the final norm, prefix tokens split off) and
``prune_intermediate_layers`` (drop the blocks after the chosen layer, which are never needed).

LLaVA-1.5's tower is OpenAI's CLIP, trained with QuickGELU: as an open_clip model it is
``ViT-L-14-336-quickgelu`` (the plain ``ViT-L-14-336`` config builds GELU, and a state dict cannot tell).

An encoder is described by a small JSON-able ``spec`` (``{"source": "timm", "name", "kwargs"}`` or
``{"source": "open_clip", "name"}``) so that saved parts can rebuild the architecture before loading weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmssl.backbones import create_backbone


def create_encoder(spec: dict[str, Any], weights: str | None = None) -> nn.Module:
    """Build the raw encoder module that ``spec`` describes (random init unless open_clip ``weights``)."""
    source = spec.get("source")
    if source == "timm":
        return create_backbone(spec["name"], **spec.get("kwargs", {})).model  # the untouched timm model
    if source == "open_clip":
        from mmssl.objectives.clip import create_open_clip

        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"llava.vision_weights={weights!r}: no such file (nothing is downloaded)")
        # pretrained=None builds from the bundled model config; a local file loads (no download). OpenAI's
        # weights need the -quickgelu config (ViT-L-14-336-quickgelu): a file that records the other activation
        # is refused (open_clip issue #771, see objectives/clip.py).
        model = create_open_clip(
            spec["name"],
            weights,
            model_key="llava.vision",
            weights_key="llava.vision_weights",
            prefix="open_clip:",
        )
        return model.visual
    raise ValueError(f"vision encoder spec {spec!r}: source must be 'timm' or 'open_clip'")


def _image_size(encoder: nn.Module, spec: dict[str, Any]) -> tuple[int, int]:
    size = spec.get("kwargs", {}).get("img_size") or getattr(encoder, "image_size", None) or 224
    return (size, size) if isinstance(size, int) else tuple(size)


class VisionTower(nn.Module):
    """Frozen encoder -> (B, N, D) patch tokens of layer ``layer`` (negative: from the end), no gradients.

    The module stays in eval mode whatever ``train()`` asks (a frozen encoder must not drop paths or update
    norm statistics), and its parameters never require gradients.
    """

    def __init__(self, encoder: nn.Module, spec: dict[str, Any], layer: int = -2):
        super().__init__()
        if not hasattr(encoder, "forward_intermediates"):
            raise TypeError(
                f"llava.vision: {type(encoder).__name__} has no forward_intermediates (timm / open_clip API)"
            )
        self.encoder, self.spec, self.layer = encoder, dict(spec), layer
        # Blocks after the chosen layer are never used: drop them (and the final norm and head).
        (self.index,) = encoder.prune_intermediate_layers([layer], prune_norm=True, prune_head=True)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.image_size = _image_size(encoder, spec)
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, *self.image_size))
        self.num_tokens, self.dim = probe.shape[1], probe.shape[2]

    def train(self, mode: bool = True) -> VisionTower:
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} px but the vision encoder takes {self.image_size}: "
                "set data.img_size to match"
            )
        out = self.encoder.forward_intermediates(
            images, indices=[self.index], intermediates_only=True, output_fmt="NCHW"
        )
        if isinstance(out, dict):  # open_clip returns a dict
            out = out["image_intermediates"]
        (features,) = out  # (B, D, h, w): prefix (CLS, register) tokens already split off
        return features.flatten(2).transpose(1, 2)  # (B, h*w, D)
