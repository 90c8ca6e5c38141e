"""Masked image modelling: MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021).

One objective, parameterised by its target (``targets/``) and its mask policy, so MAE and MaskFeat share the
masking, the loss and the pictures. MAE's shape (models_mae.py): random per-sample masking by argsort of
uniform noise, the encoder sees only visible patches (plus CLS), a light decoder fills in mask tokens and
predicts the target of every patch, and the loss is the MSE on masked patches only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmssl.backbones import ViTBackbone
from mmssl.losses import masked_mse
from mmssl.ops import random_masking


class MaskedModeling(nn.Module):
    def __init__(
        self, backbone: ViTBackbone, target: nn.Module, decoder: nn.Module, mask_ratio: float = 0.75
    ):
        super().__init__()
        if not isinstance(backbone, ViTBackbone):
            raise TypeError(f"masked modelling needs a ViT backbone, got {type(backbone).__name__}")
        self.backbone = backbone
        self.target = target
        self.decoder = decoder
        self.mask_ratio = mask_ratio

    def forward(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> dict[str, Tensor]:
        """``noise`` (B, L) fixes the masking (as in the reference and transformers' ViTMAE); random if None."""
        images = batch["image"]  # (B, 3, H, W)
        target = self.target(images)  # (B, L, D_t), fp32, no grad
        B, L = target.shape[:2]
        if noise is None:
            noise = torch.rand(B, L, device=images.device)
        ids_keep, ids_restore, mask = random_masking(noise, self.mask_ratio)
        latent = self.backbone.forward_tokens(images, keep=ids_keep)  # (B, prefix + L_keep, D)
        pred = self.decoder(latent, ids_restore)  # (B, L, D_t)
        return {"loss": masked_mse(pred, target, mask), "pred": pred, "mask": mask}

    def no_weight_decay(self) -> set[str]:
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        return names | {n for n, _ in self.named_parameters() if n.endswith(("mask_token", "pos_embed"))}

    @torch.no_grad()
    def visualize(self, batch: dict[str, Tensor], denormalize) -> dict[str, Tensor]:
        out = self(batch)
        return self.target.picture(batch["image"], out["pred"], out["mask"], denormalize)
