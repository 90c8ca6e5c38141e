"""SigLIP: the pairwise sigmoid loss for image-text pretraining (Zhai, Mustafa, Kolesnikov & Beyer 2023, *Sigmoid
Loss for Language Image Pre-Training*, §3 and Algorithm 1), on CLIP's towers (``objectives/clip.py``).

Every image-text pair of the batch is an independent binary problem, positive on the diagonal, negative
elsewhere: ``loss = -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b))`` with a learned scale ``t = exp(t')`` and
bias ``b``, started at ``t' = log 10`` and ``b = -10`` so that the first steps are not dominated by the many
negatives. No softmax over the batch, so no global normalisation: under DDP every rank scores its images against
its own texts and then, chunk by chunk, against every other rank's texts passed around the ring (open_clip's
``SigLipLoss``, used here, with its bidirectional neighbour exchange; the backward of the exchange returns each
text's gradient to the rank that made it). The mean over ranks of the per-rank losses is the loss of one process
holding the global batch, and DDP's gradient average gives its gradient.
"""

from __future__ import annotations

from open_clip.loss import SigLipLoss
from torch import Tensor, nn

from mmssl import dist
from mmssl.objectives.clip import CLIP


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    gather: bool = True,
) -> Tensor:
    """open_clip's ``SigLipLoss`` over L2-normed (B, E) features; ``gather``: against every rank's texts."""
    world = dist.world_size() if gather else 1
    loss = SigLipLoss(rank=dist.rank() if world > 1 else 0, world_size=world)
    return loss(image_features, text_features, logit_scale, logit_bias)


def siglip(
    image_tower: nn.Module,
    text_tower: nn.Module,
    *,
    logit_scale: float = 10.0,
    logit_bias: float = -10.0,
    max_logit_scale: float = 100.0,
    image_mask_ratio: float = 0.0,
) -> CLIP:
    """The SigLIP objective: CLIP's towers and batch contract (``image``, ``tokens``), the sigmoid loss, and the
    learned bias beside the learned scale (both outside weight decay, as ``logit_scale`` in open_clip)."""
    return CLIP(
        image_tower,
        text_tower,
        logit_scale=logit_scale,
        max_logit_scale=max_logit_scale,
        image_mask_ratio=image_mask_ratio,
        logit_bias=logit_bias,
        loss=siglip_loss,
    )
