"""SimCLR (Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020).

Two augmented views of every image go through one encoder f (any backbone: ResNet-50 in the paper, timm ViTs
here too) and a projection MLP g; NT-Xent pulls the two views of an image together against every other view
in the *global* batch. With several processes the projections are all-gathered with gradient and each rank
scores its own 2n views against all 2N (reference ``add_contrastive_loss`` with ``tpu_cross_replica_concat``);
the mean of the per-rank losses is the single-process loss, so DDP's gradient averaging gives exactly the
single-process gradient. The paper's BN is global: set ``trainer.sync_batchnorm`` (GPU only in PyTorch).

Batch keys: ``"view1"``, ``"view2"``: (B, 3, H, W), two independent augmentations of the same B images
(``data.transforms.simclr_view``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmssl import dist
from mmssl.backbones import Backbone, CNNBackbone
from mmssl.flops import TRAIN_PER_FORWARD, linears_flops
from mmssl.heads import ProjectionHead
from mmssl.losses import nt_xent_from_logits, nt_xent_logits


class SimCLR(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        head: ProjectionHead,
        temperature: float = 0.1,
        gather_distributed: bool = True,
        channels_last: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        # NHWC convolutions are faster for CNNs on CPU (oneDNN) and on tensor-core GPUs; ViTs gain nothing.
        self.channels_last = channels_last and isinstance(backbone, CNNBackbone)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> backbone features h (B, D): the representation kept after pretraining."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone.forward_pooled(images)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        view1, view2 = batch["view1"], batch["view2"]  # (n, 3, H, W) each
        n = view1.shape[0]
        # One pass over both views: BN normalises over all 2n views, as the reference does (it stacks the
        # views along the batch axis).
        z = self.head(self.embed(torch.cat([view1, view2])))  # (2n, d)
        z1, z2 = z.float().split(n)
        # Only while training: validation batches differ in size and number between ranks and must not
        # synchronise (lit.py), so the validation loss uses this rank's negatives only.
        if self.training and self.gather_distributed and dist.world_size() > 1:
            z1_all, z2_all, rank = dist.all_gather_with_grad(z1), dist.all_gather_with_grad(z2), dist.rank()
        else:
            z1_all, z2_all, rank = z1, z2, 0
        logits, positive = nt_xent_logits(z1, z2, z1_all, z2_all, rank, self.temperature)  # (2n, 2N)
        loss = nt_xent_from_logits(logits, positive)  # the reference's scale: both directions summed
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == positive).float().mean()  # reference's "contrast_acc"
        return {"loss": loss, "contrast_acc": acc}

    @torch.no_grad()
    def visualize(
        self, batch: dict[str, Tensor], denormalize, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """Picture columns (viz.PictureCallback): each image's two views, and the view 2 of the batch whose
        projection is nearest to its view 1, which is its own second view when the task is solved. Draws
        nothing at random (``generator`` is unused)."""
        view1, view2 = batch["view1"], batch["view2"]
        z = nn.functional.normalize(self.head(self.embed(torch.cat([view1, view2]))).float(), dim=1)
        z1, z2 = z.split(view1.shape[0])
        nearest = (z1 @ z2.T).argmax(dim=1)  # (n,)
        return {"view 1": denormalize(view1), "view 2": denormalize(view2),
                "nearest view 2": denormalize(view2[nearest])}  # fmt: skip

    def flops_per_sample(self) -> int | None:
        """Training FLOPs per image (``mmssl/flops.py``): two views through the encoder and the projection MLP.
        Known for ViT backbones only (None for CNNs)."""
        if not hasattr(self.backbone, "forward_flops"):
            return None
        return TRAIN_PER_FORWARD * 2 * (self.backbone.forward_flops() + linears_flops(1, self.head))

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
