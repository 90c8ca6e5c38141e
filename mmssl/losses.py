"""Pure loss functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def nt_xent_logits(
    z1: Tensor,
    z2: Tensor,
    z1_all: Tensor | None = None,
    z2_all: Tensor | None = None,
    rank: int = 0,
    temperature: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """SimCLR's contrastive logits (Chen et al. 2020, §2.1 eq. 1; reference ``add_contrastive_loss``).

    z1, z2: (n, D) projections of the two views of this rank's n images; z1_all, z2_all: (N, D) the same for
    the global batch (all ranks, rank-major, as ``dist.all_gather_with_grad`` returns them; None: this
    process is the whole batch). Each of the 2n local views is an anchor scored against all 2N views of the
    global batch except itself; its positive is the other view of the same image, at global index
    ``rank * n + i``. Returns logits (2n, 2N) with the self-similarity at -inf, and the positive's column.
    Cosine similarities are computed in fp32 with autocast off: at temperature 0.1 a bf16 dot product would
    err by about 0.05 in every logit.
    """
    if z1_all is None or z2_all is None:
        z1_all, z2_all = z1, z2
    n, N = z1.shape[0], z1_all.shape[0]
    if z2.shape[0] != n or z2_all.shape[0] != N or N < n * (rank + 1):
        raise ValueError(f"nt_xent: views of unequal size or rank {rank} outside the global batch "
                         f"(z1 {tuple(z1.shape)}, z2 {tuple(z2.shape)}, global {tuple(z1_all.shape)}, "
                         f"{tuple(z2_all.shape)})")  # fmt: skip
    with torch.autocast(device_type=z1.device.type, enabled=False):
        queries = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, D)
        keys = F.normalize(torch.cat([z1_all, z2_all]).float(), dim=1)  # (2N, D)
        logits = queries @ keys.T / temperature  # (2n, 2N)
    own = torch.arange(n, device=z1.device) + rank * n  # global index of each local image
    self_col = torch.cat([own, own + N])  # view1 anchors sit in the first N columns, view2 in the last N
    positive = torch.cat([own + N, own])
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.index_put((rows, self_col), torch.tensor(float("-inf"), device=z1.device))
    return logits, positive


def nt_xent_from_logits(logits: Tensor, positive: Tensor) -> Tensor:
    """NT-Xent at the reference's scale from :func:`nt_xent_logits`' (2n, 2N) logits and positive columns.

    The reference (google-research/simclr tf2/objective.py ``add_contrastive_loss``) takes one cross-entropy
    per direction, view 1 -> view 2 (``loss_a``) and view 2 -> view 1 (``loss_b``), and returns
    ``reduce_mean(loss_a + loss_b)`` over the n images: the sum of the two directions, which is 2x the mean
    over the 2n anchors that lightly's ``NTXentLoss`` (and most PyTorch code) returns.
    """
    return 2 * F.cross_entropy(
        logits, positive
    )  # factor 2: mean over n of (loss_a + loss_b), as the reference


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    z1_all: Tensor | None = None,
    z2_all: Tensor | None = None,
    rank: int = 0,
    temperature: float = 0.1,
) -> Tensor:
    """NT-Xent of the local views against all other views of the global batch, at the reference's scale (see
    :func:`nt_xent_from_logits`; :func:`nt_xent_logits` for the arguments).

    Averaged over ranks it equals the loss of one process holding the whole batch, so DDP's gradient averaging
    reproduces the single-process gradient (the gather's backward sums every rank's gradient into the rank
    that owns the row).
    """
    return nt_xent_from_logits(*nt_xent_logits(z1, z2, z1_all, z2_all, rank, temperature))
