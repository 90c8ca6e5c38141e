"""Masked image modelling: MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021) and MaskFeat
(Wei et al., "Masked Feature Prediction for Self-Supervised Visual Pre-Training", CVPR 2022).

One objective, parameterised by its target (``targets/``), its mask policy and where the mask enters, so both
methods share the masking, the loss and the pictures:

* MAE (``decoder=``, models_mae.py): random per-sample masking by argsort of uniform noise, the encoder sees
  only the visible patches (plus CLS), a light decoder fills in mask tokens and predicts every patch's target.
* MaskFeat / BEiT style (``head=``, SlowFast ``masked.py``): the encoder sees *all* patches, the masked ones
  replaced by a learned mask token before the position embedding; a linear head predicts every patch's target
  (HOG for MaskFeat) from the encoder output. Masks are block-wise (BEiT) by default.

In both the loss is the MSE on masked patches only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmssl.backbones import ViTBackbone
from mmssl.flops import TRAIN_PER_FORWARD, linear_flops
from mmssl.heads import MAEDecoder, mae_init_
from mmssl.losses import masked_mse
from mmssl.ops import block_masking, random_masking
from mmssl.targets.pixels import PixelTarget

MASKS = ("random", "block")


class MaskedModeling(nn.Module):
    """With ``decoder`` (MAE: ``decoder(latent, ids_restore) -> (B, L, D_t)``) the encoder sees visible patches
    only; otherwise masked patches become a mask token and ``head(patch_tokens) -> (B, L, D_t)`` predicts the
    targets, by default a linear layer initialised trunc-normal(0.02) as SlowFast's ``MSSeparateHead``.

    ``mask="block"`` draws BEiT blocks covering ``round(L * mask_ratio)`` patches (SlowFast rounds, MAE
    truncates), ``min_block`` patches per block at least (None: a fifth of them, as SlowFast's image loader)
    and aspect ratios in [``min_aspect``, 1 / ``min_aspect``]; it needs the ``head`` path, since blocks mask a
    varying number of patches per image.

    ``decay_mask_token=False`` exempts the mask token (the decoder's, for MAE) from weight decay, as MMPretrain's
    MaskFeat config does; both reference codes decay it (see :meth:`no_weight_decay`).
    """

    def __init__(
        self,
        backbone: ViTBackbone,
        target: nn.Module,
        decoder: nn.Module | None = None,
        mask_ratio: float = 0.75,
        *,
        head: nn.Module | None = None,
        mask: str = "random",
        min_block: int | None = None,
        min_aspect: float = 0.3,
        decay_mask_token: bool = True,
    ):
        super().__init__()
        if not isinstance(backbone, ViTBackbone):
            raise TypeError(f"masked modelling needs a ViT backbone, got {type(backbone).__name__}")
        if decoder is not None and head is not None:
            raise ValueError("MaskedModeling: give a decoder (MAE) or a head (mask-token path), not both")
        if mask not in MASKS:
            raise ValueError(f"MaskedModeling: mask must be one of {MASKS}, got {mask!r}")
        if mask == "block" and decoder is not None:
            raise ValueError(
                "MaskedModeling: block masks hide a varying number of patches; use head=, not decoder="
            )
        L = backbone.num_patches
        # the loss is a mean over masked patches (0 masked: 0/0 = NaN) and MAE's encoder needs a visible one
        masked = round(L * mask_ratio) if mask == "block" else L - int(L * (1 - mask_ratio))
        visible = L - masked if decoder is None else int(L * (1 - mask_ratio))
        if masked < 1 or (decoder is not None and visible < 1):
            raise ValueError(
                f"mask_ratio={mask_ratio} masks {masked} of the {L} patches and leaves {visible} visible; "
                "needs at least one masked patch" + ("" if decoder is None else " and one visible")
            )
        if decoder is None and head is None:
            head = nn.Linear(backbone.embed_dim, target.out_dim)
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.backbone = backbone
        self.target = target
        self.decoder = decoder
        self.head = head
        self.mask_ratio = mask_ratio
        self.mask_policy, self.min_block, self.min_aspect = mask, min_block, min_aspect
        self.decay_mask_token = decay_mask_token
        if head is not None:
            # trunc_normal(0.02) as SlowFast masked.py and MMPretrain MaskFeatViT
            self.mask_token = nn.Parameter(
                nn.init.trunc_normal_(torch.zeros(1, 1, backbone.embed_dim), std=0.02)
            )

    def forward(
        self,
        batch: dict[str, Tensor],
        noise: Tensor | None = None,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """``noise`` (B, L) fixes random masking (as in the reference and transformers' ViTMAE); ``mask``
        (B, L), 1 = masked, fixes the mask of the mask-token path. Drawn at random when None, from
        ``generator`` (on the images' device) or else torch's global generator."""
        images = batch["image"]  # (B, 3, H, W)
        target = self.target(images)  # (B, L, D_t), fp32, no grad
        B, L = target.shape[:2]
        if self.head is None:
            if noise is None:
                noise = torch.rand(B, L, device=images.device, generator=generator)
            ids_keep, ids_restore, mask = random_masking(noise, self.mask_ratio)
            latent = self.backbone.forward_tokens(images, keep=ids_keep)  # (B, prefix + L_keep, D)
            pred = self.decoder(latent, ids_restore)  # (B, L, D_t)
        else:
            if mask is None:
                mask = self.draw_mask(B, images.device, noise, generator)
            tokens = self.backbone.forward_tokens(images, mask=mask, mask_token=self.mask_token)
            pred = self.head(tokens[:, self.backbone.num_prefix_tokens :])  # (B, L, D_t)
        losses = getattr(self.target, "losses", None)  # several targets (targets/multi.py): losses summed
        if losses is None:
            return {"loss": masked_mse(pred, target, mask), "pred": pred, "mask": mask}
        parts = losses(pred, target, mask)
        logged = {f"{name}/loss": value.detach() for name, value in parts.items()}
        return {"loss": sum(parts.values()), **logged, "pred": pred, "mask": mask}

    def draw_mask(
        self,
        batch_size: int,
        device: torch.device,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """(B, L) float mask, 1 = masked, for the mask-token path."""
        L = self.backbone.num_patches
        num_masked = round(L * self.mask_ratio)  # SlowFast imagenet.py: round(14 * 14 * 0.4) = 78
        if self.mask_policy == "random":
            if noise is None:
                noise = torch.rand(batch_size, L, device=device, generator=generator)
            return random_masking(noise, self.mask_ratio)[2]
        min_block = (
            self.min_block if self.min_block is not None else num_masked // 5
        )  # SlowFast: 78 // 5 = 15
        mask = block_masking(
            batch_size,
            self.backbone.grid_size,
            num_masked,
            min_block,
            min_aspect=self.min_aspect,
            generator=generator,
        )
        return mask.to(device)

    def flops_per_sample(self) -> int | None:
        """Training FLOPs per image (``mmssl/flops.py``): MAE counts the encoder on the visible patches (its
        patch embedding on all of them) plus the decoder on every token; the mask-token path counts the encoder
        on every patch plus a linear head. Targets (pixels, HOG) are not counted. None for other heads."""
        L = self.backbone.num_patches
        if self.head is None:
            if not hasattr(self.decoder, "forward_flops"):
                return None
            visible = int(L * (1 - self.mask_ratio))  # as ops.random_masking
            forward = self.backbone.forward_flops(visible) + self.decoder.forward_flops(visible)
        elif isinstance(self.head, nn.Linear):
            forward = self.backbone.forward_flops() + linear_flops(
                L, self.head.in_features, self.head.out_features
            )
        else:
            return None
        return TRAIN_PER_FORWARD * forward

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond the optimizer's own rule (1-D parameters and biases), as in both reference codes.

        MAE: main_pretrain.py groups with timm 0.3.2's ``optim_factory.add_weight_decay(model, wd)`` and no skip
        list, so the (1, 1, D) ``cls_token`` and decoder ``mask_token`` are decayed; the sin-cos position
        embeddings are frozen and never reach the optimizer. MaskFeat: SlowFast's ``construct_optimizer`` skips
        ``no_weight_decay()`` names, an empty list under in1k_VIT_B_MaskFeat_PT.yaml's ZERO_DECAY_POS_CLS False,
        so the mask token, CLS token and learned position embedding are decayed (MMPretrain exempts the mask
        token only: ``decay_mask_token=False``).
        """
        if self.decay_mask_token:
            return set()
        return {n for n, _ in self.named_parameters() if n.endswith("mask_token")}

    @torch.no_grad()
    def visualize(
        self, batch: dict[str, Tensor], denormalize, generator: torch.Generator
    ) -> dict[str, Tensor]:
        out = self(batch, generator=generator)  # masks from the caller's generator, never the global one
        return self.target.picture(batch["image"], out["pred"], out["mask"], denormalize)


def mae(
    backbone: ViTBackbone,
    *,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = True,
    decoder_embed_dim: int = 512,
    decoder_depth: int = 8,
    decoder_num_heads: int = 16,
) -> MaskedModeling:
    """MAE as the paper builds it (models_mae.py ``MaskedAutoencoderViT``): the encoder's position embedding
    replaced by fixed 2-D sin-cos values (§A.1), per-patch normalised pixel targets (§3), the light decoder
    (§3, Table 1: 512-d, 8 blocks) and MAE's ``initialize_weights`` (``heads.mae_init_``) over the whole
    model. Defaults are the paper's; ``configs/mae_*.yaml`` feed the same arguments from ``mae.*``."""
    backbone.use_fixed_sincos_pos_embed()  # MAE §A.1
    target = PixelTarget(backbone.patch_size, normalize=norm_pix_loss)
    decoder = MAEDecoder(
        backbone.embed_dim,
        backbone.grid_size,
        target.out_dim,
        num_prefix_tokens=backbone.num_prefix_tokens,
        embed_dim=decoder_embed_dim,
        depth=decoder_depth,
        num_heads=decoder_num_heads,
    )
    objective = MaskedModeling(backbone, target, decoder, mask_ratio=mask_ratio)
    mae_init_(objective)
    return objective
