"""Objectives composed on one shared encoder (DESIGN.md §9), e.g. SLIP (Mu et al. 2022, *SLIP: Self-supervision
meets Language-Image Pre-training*): CLIP and SimCLR on the same image tower, ``loss = L_CLIP + s x L_SimCLR``
(facebookresearch/SLIP ``losses.py SLIPLoss``).

Every part is an ordinary objective (``objectives/base.py``) that keeps its encoder at ``.backbone``; the
composite makes them all hold the *first* part's backbone (one set of weights, one optimizer), runs every part
on the same batch (each reads its own keys: ``image`` + ``tokens`` for CLIP, ``view1``/``view2`` for SimCLR)
and returns ``loss`` = the weighted sum, with each part's outputs under its own prefix (``clip/loss``,
``simclr/loss``, ``simclr/contrast_acc``...), which the training system logs as ``train/clip/loss``...
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Compose(nn.Module):
    """``parts``: name -> objective, each with a ``.backbone`` of the same architecture; ``weights``: name -> loss
    weight. The shared encoder is ``.backbone`` (the first part's: its initialisation and frozen parameters)."""

    def __init__(self, parts: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        if len(parts) < 1 or set(parts) != set(weights):
            raise ValueError(
                f"Compose: one weight per part, got parts {list(parts)}, weights {list(weights)}"
            )
        missing = [
            name for name, part in parts.items() if not isinstance(getattr(part, "backbone", None), nn.Module)
        ]
        if missing:
            raise ValueError(f"Compose: parts {missing} keep no encoder at .backbone to share")
        first = next(iter(parts.values())).backbone
        shape = {k: v.shape for k, v in first.state_dict().items()}
        for name, part in parts.items():
            if {k: v.shape for k, v in part.backbone.state_dict().items()} != shape:
                raise ValueError(f"Compose: the backbone of part {name!r} differs from the first part's")
            part.backbone = first  # one encoder: every part trains the same weights
        self.backbone = first  # registered first: named_parameters() names shared weights backbone.*
        self.parts = nn.ModuleDict(parts)
        self.weights = dict(weights)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        total = 0.0
        for name, part in self.parts.items():
            part_out = part(batch)
            total = total + self.weights[name] * part_out["loss"]
            out.update({f"{name}/{key}": value for key, value in part_out.items()})
        out["loss"] = total
        return out

    @torch.no_grad()
    def visualize(
        self, batch: dict[str, Tensor], denormalize, generator: torch.Generator
    ) -> dict[str, Tensor]:
        pictures = {}
        for name, part in self.parts.items():
            if hasattr(part, "visualize"):
                drawn = part.visualize(batch, denormalize, generator)
                pictures.update({f"{name}: {key}": value for key, value in drawn.items()})
        return pictures

    def after_optimizer_step(self) -> None:
        for part in self.parts.values():
            hook = getattr(part, "after_optimizer_step", None)
            if hook is not None:
                hook()

    def no_weight_decay(self) -> set[str]:
        """The parts' names, as this module names the parameters (a shared one under ``backbone.``)."""
        canonical = {id(p): n for n, p in self.named_parameters()}
        names = set()
        for part in self.parts.values():
            for n in getattr(part, "no_weight_decay", lambda: set())():
                names.add(canonical[id(part.get_parameter(n))])
        return names

    def flops_per_sample(self) -> int | None:
        """The parts' counts summed (each runs the shared encoder on its own views); None if any is unknown."""
        counts = [getattr(part, "flops_per_sample", lambda: None)() for part in self.parts.values()]
        return None if any(c is None for c in counts) else sum(counts)
