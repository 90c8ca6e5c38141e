"""An MAE objective (He et al. 2021) as ``transformers.ViTMAEForPreTraining``: encoder, decoder and loss.

transformers' ViTMAE is a port of facebookresearch/mae ``models_mae.py``, as mmssl's MAE is
(``objectives/masked.py`` + ``heads.MAEDecoder``): the same random masking from a ``noise`` tensor (argsort,
keep the first ``len_keep``), the same fixed 2-D sin-cos position embeddings, the same per-patch (p, q, c)
layout of ``logits`` and the same ``norm_pix_loss``. Encoder blocks map as in ``hf_vit.py``; the decoder's
``embed``/``mask_token``/``pos_embed``/``blocks``/``norm``/``pred`` become ``decoder_embed``/``mask_token``/
``decoder_pos_embed``/``decoder_layers``/``decoder_norm``/``decoder_pred``. Only MAE itself converts: masked
modelling with another target (MaskFeat's HOG) or a mask-token head is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from mmssl.heads import MAEDecoder
from mmssl.interop import Unsupported
from mmssl.interop.hf_vit import block_state, check_block, check_vit, config_args, encoder_state, load_checked
from mmssl.objectives.masked import MaskedModeling
from mmssl.targets.pixels import PixelTarget


def check_mae(objective: nn.Module) -> None:
    if not isinstance(objective, MaskedModeling) or not isinstance(objective.decoder, MAEDecoder):
        raise Unsupported(
            f"{type(objective).__name__}: ViTMAEForPreTraining holds MAE only (masked modelling with the MAE "
            "decoder)"
        )
    if not isinstance(objective.target, PixelTarget):
        raise Unsupported(
            f"masked modelling with a {type(objective.target).__name__} target: ViTMAE predicts pixels only"
        )
    check_vit(objective.backbone.model, "MAE encoder", pooled=False)
    dec = objective.decoder
    for i, blk in enumerate(dec.blocks):
        check_block(blk, f"MAE decoder block {i}")
    if dec.num_prefix_tokens != 1:
        raise Unsupported(f"MAE decoder with {dec.num_prefix_tokens} prefix tokens; ViTMAE has one CLS token")


def to_vit_mae(objective: MaskedModeling) -> nn.Module:
    """An MAE objective -> ``transformers.ViTMAEForPreTraining`` with the same weights, eval mode."""
    import transformers

    check_mae(objective)
    vit, dec = objective.backbone.model, objective.decoder
    blk = dec.blocks[0]
    config = transformers.ViTMAEConfig(
        **config_args(vit),
        decoder_hidden_size=dec.embed.out_features,
        decoder_num_hidden_layers=len(dec.blocks),
        decoder_num_attention_heads=blk.attn.num_heads,
        decoder_intermediate_size=blk.mlp.fc1.out_features,
        mask_ratio=objective.mask_ratio,
        norm_pix_loss=objective.target.normalize,
        attn_implementation="eager",
    )
    hf = transformers.ViTMAEForPreTraining(config).eval()
    state = encoder_state(vit, "vit.")
    state |= {
        "decoder.mask_token": dec.mask_token,
        "decoder.decoder_pos_embed": dec.pos_embed,
        "decoder.decoder_embed.weight": dec.embed.weight,
        "decoder.decoder_embed.bias": dec.embed.bias,
        "decoder.decoder_norm.weight": dec.norm.weight,
        "decoder.decoder_norm.bias": dec.norm.bias,
        "decoder.decoder_pred.weight": dec.pred.weight,
        "decoder.decoder_pred.bias": dec.pred.bias,
    }
    for i, b in enumerate(dec.blocks):
        state |= block_state(b, f"decoder.decoder_layers.{i}")
    load_checked(hf, state, "ViTMAEForPreTraining")
    return hf


@torch.no_grad()
def compare(objective: MaskedModeling, hf: nn.Module, images: Tensor, noise: Tensor) -> dict[str, float]:
    """The same images and masking noise through both: max |difference| of predictions and of the loss, and
    whether the masks agree (1.0) or not (0.0)."""
    ours = objective({"image": images}, noise=noise)
    theirs = hf(pixel_values=images, noise=noise)
    return {
        "logits": (ours["pred"] - theirs.logits).abs().max().item(),
        "loss": abs(ours["loss"].item() - theirs.loss.item()),
        "mask_equal": float(torch.equal(ours["mask"], theirs.mask)),
    }


@torch.no_grad()
def round_trip(objective: MaskedModeling, folder: str | Path, batch: int = 2) -> float:
    """Load ``folder`` with ``ViTMAEForPreTraining.from_pretrained`` and compare predictions and loss on random
    images and noise: the max absolute difference (inf when the masks differ)."""
    import transformers

    hf = transformers.ViTMAEForPreTraining.from_pretrained(folder).eval()
    size = hf.config.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    noise = torch.rand(batch, objective.backbone.num_patches, generator=g)
    was_training = objective.training
    diffs = compare(objective.eval(), hf, images, noise)
    objective.train(was_training)
    return max(diffs["logits"], diffs["loss"]) if diffs["mask_equal"] else float("inf")
