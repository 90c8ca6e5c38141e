"""Pure loss functions."""

from __future__ import annotations

from open_clip.loss import ClipLoss
from torch import Tensor

from mmssl import dist


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error per patch, averaged over masked patches only (MAE §3: "loss only on masked patches").

    pred, target: (B, L, D); mask: (B, L) with 1 = masked. Computed in fp32.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


def clip_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor, gather: bool = True
) -> Tensor:
    """CLIP's symmetric cross-entropy (Radford et al. 2021, Fig. 3) over L2-normed (B, E) features, by
    open_clip's ``ClipLoss``.

    Under torch.distributed (and ``gather``) every rank scores its B local rows against the features of all
    ranks, gathered with gradient (open_clip's ``local_loss=True, gather_with_grad=True``): the logits are
    (B, world x B) instead of (world x B)^2, so memory grows with the local batch, yet every negative in the
    global batch counts. The backward of the gather sums each rank's contributions into the rows it produced;
    DDP then averages over ranks, which gives exactly the gradient of the mean loss over the global batch.
    """
    world = dist.world_size() if gather else 1
    loss = ClipLoss(
        local_loss=True, gather_with_grad=True, rank=dist.rank() if world > 1 else 0, world_size=world
    )
    return loss(image_features, text_features, logit_scale)
