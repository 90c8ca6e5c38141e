"""Optimizer and learning-rate schedule (no Lightning here; lit.py wires them in)."""

from __future__ import annotations

import math

from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

LARS_NAMES = ("lars", "larc", "nlars", "nlarc")


def param_groups(module: nn.Module, name: str, weight_decay: float) -> list[dict]:
    """timm's parameter groups: no weight decay on 1-D parameters (norms, biases) nor on the names the module
    lists in ``no_weight_decay()`` (CLS/mask tokens, position embeddings); frozen parameters are left out.
    LARS-type optimizers get :func:`lars_param_groups`.

    Take them before the module is wrapped for sharding: FSDP then shows every parameter as a flat 1-D shard
    (with ``use_orig_params``, the same Parameter objects), and the 1-D rule would exempt every weight.
    """
    if name.lower() in LARS_NAMES:
        return lars_param_groups(module, weight_decay)
    nwd = getattr(module, "no_weight_decay", lambda: set())()
    return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=nwd)


def create_optimizer(
    module: nn.Module | list[dict],
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    momentum: float = 0.9,
) -> Optimizer:
    """timm's optimizer factory on :func:`param_groups` (of ``module``, or groups taken earlier)."""
    kwargs = {"betas": tuple(betas), "eps": eps} if name.lower() in ("adamw", "adam", "lamb", "lambc") else {}
    if name.lower() in ("sgd", "momentum", *LARS_NAMES):
        kwargs = {"momentum": momentum}
    groups = param_groups(module, name, weight_decay) if isinstance(module, nn.Module) else module
    return create_optimizer_v2(groups, opt=name, lr=lr, **kwargs)  # every group carries its weight decay


def lars_param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """LARS groups as in SimCLR (reference ``LARSOptimizer(exclude_from_weight_decay=['batch_normalization',
    'bias'])``, whose layer adaptation excludes the same list): BN parameters, biases and ``no_weight_decay()``
    names get neither weight decay nor the trust-ratio scaling; every other weight gets both.

    timm's ``Lars`` adapts a group only when its weight decay is non-zero unless ``always_adapt``; setting the
    flag per group keeps the adaptation on the weights even with ``weight_decay=0``. The split is made with a
    placeholder decay of 1 because timm puts everything in the no-decay group when the decay is 0.
    timm's trust ratio is eeta ||w|| / (||g|| + wd ||w||) (apex LARC) where the reference divides by
    ||g + wd w||; at SimCLR's wd = 1e-6 the decay term is negligible next to ||g|| in both.
    """
    nwd = getattr(module, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(module, weight_decay=1.0, no_weight_decay_list=nwd)
    for group in groups:
        adapt = group["weight_decay"] > 0
        group["weight_decay"] = weight_decay if adapt else 0.0
        group["always_adapt"] = adapt
    return groups


def warmup_cosine(
    step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0, start_ratio: float = 0.0
) -> float:
    """lr multiplier: linear warmup from ``start_ratio``, then half-cosine to ``min_ratio``, per step.

    MAE util/lr_sched.py warms up from 0 (``lr * epoch / warmup_epochs``); SlowFast lr_policy.py from
    SOLVER.WARMUP_START_LR (1e-6 in the MaskFeat configs) to the peak, linearly.
    """
    if step < warmup_steps:
        return start_ratio + (1 - start_ratio) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable lr lambda for ``LambdaLR`` (a plain object, so it survives checkpointing)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0, start_ratio: float = 0.0):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        self.start_ratio = start_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.min_ratio, self.start_ratio)


def warmup_cosine_schedule(
    optimizer: Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr: float = 0.0,
    warmup_start_lr: float = 0.0,
) -> LambdaLR:
    """Per-step warmup from ``warmup_start_lr`` to the optimizer's lr, then cosine to ``min_lr`` (both absolute,
    as SlowFast's WARMUP_START_LR and COSINE_END_LR and MAE's min_lr)."""
    base = optimizer.param_groups[0]["lr"]
    ratio = (lambda lr: lr / base) if base else (lambda lr: 0.0)
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, ratio(min_lr), ratio(warmup_start_lr)))
