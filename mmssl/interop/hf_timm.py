"""The timm ``save_for_hf`` folder (``export.export_backbone``) through transformers: ``AutoModel`` builds its
``TimmWrapperModel`` (the same timm model inside), ``AutoImageProcessor`` its ``TimmWrapperImageProcessor``
(timm's own evaluation transform from the folder's ``pretrained_cfg``), and so ``pipeline(
"image-feature-extraction")`` works. ``pooler_output`` is timm's pooled feature (``num_classes=0``).

transformers passes ``num_classes`` itself when it builds the timm model, so the folder's ``model_args`` must not
hold it too (``TypeError: got multiple values for keyword argument 'num_classes'``); ``export.py`` leaves it to
the top-level ``num_classes`` of config.json, which timm's own ``local-dir:`` loader reads as well.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmssl import linear
from mmssl.backbones import Backbone


@torch.no_grad()
def round_trip(backbone: Backbone, folder: str | Path, batch: int = 2) -> float:
    """Load ``folder`` with ``transformers.AutoModel`` and compare ``pooler_output`` with the backbone's pooled
    features on random images: the max absolute difference."""
    import transformers

    hf = transformers.AutoModel.from_pretrained(folder).eval()
    size = hf.config.pretrained_cfg["input_size"][-1]
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    was_training = backbone.training
    with linear.library("blas"):  # plain timm's kernels (mmssl/linear.py): an exact export is bit-identical
        expected = backbone.eval().forward_pooled(images)
    backbone.train(was_training)
    got = hf(pixel_values=images).pooler_output
    return (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
