"""Optimizer and learning-rate schedule (no Lightning here; lit.py wires them in)."""

from __future__ import annotations

import math

from timm.optim import create_optimizer_v2
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def create_optimizer(
    module: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    momentum: float = 0.9,
) -> Optimizer:
    """timm's optimizer factory with its parameter groups: no weight decay on 1-D parameters (norms, biases)
    nor on the names the module lists in ``no_weight_decay()`` (CLS/mask tokens, position embeddings).
    Frozen parameters are left out."""
    kwargs = {"betas": tuple(betas), "eps": eps} if name.lower() in ("adamw", "adam", "lamb", "lambc") else {}
    if name.lower() in ("sgd", "momentum", "lars", "larc", "nlars", "nlarc"):
        kwargs = {"momentum": momentum}
    return create_optimizer_v2(module, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """lr multiplier: linear warmup from 0, then half-cosine to ``min_ratio`` (MAE util/lr_sched.py, per step)."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable lr lambda for ``LambdaLR`` (a plain object, so it survives checkpointing)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.min_ratio)


def warmup_cosine_schedule(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> LambdaLR:
    base = optimizer.param_groups[0]["lr"]
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr / base if base else 0.0))
