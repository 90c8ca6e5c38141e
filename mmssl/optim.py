"""Optimizer and learning-rate schedule (no Lightning here; lit.py wires them in)."""

from __future__ import annotations

import math

from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

LARS_NAMES = ("lars", "larc", "nlars", "nlarc")
# torch's fused Adam(W): one pass over each tensor instead of one per operation, the same update to fp32
# rounding. An MAE ViT-B/16 update (111.7M parameters, 2 CPU threads, 2026-12-03): 239 ms plain, 48.5 ms fused,
# a fifth of a bf16 training step saved on this CPU; on GPUs it is what transformers' Trainer uses by default.
FUSED = ("adam", "adamw")


def param_groups(
    module: nn.Module, name: str, weight_decay: float, layer_decay: float | None = None
) -> list[dict]:
    """timm's parameter groups: no weight decay on 1-D parameters (norms, biases) nor on the names the module
    lists in ``no_weight_decay()`` (CLS/mask tokens, position embeddings); frozen parameters are left out.
    LARS-type optimizers get :func:`lars_param_groups`; ``layer_decay`` (fine-tuning) gives
    :func:`layer_decay_param_groups`.

    Take them before the module is wrapped for sharding: FSDP then shows every parameter as a flat 1-D shard
    (with ``use_orig_params``, the same Parameter objects), and the 1-D rule would exempt every weight.
    """
    if name.lower() in LARS_NAMES:
        return lars_param_groups(module, weight_decay)
    if layer_decay is not None:
        return layer_decay_param_groups(module, weight_decay, layer_decay)
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
    layer_decay: float | None = None,
) -> Optimizer:
    """timm's optimizer factory on :func:`param_groups` (of ``module``, or groups taken earlier). A group with an
    ``lr_scale`` (layer decay) starts at ``lr x lr_scale``: the schedule's LambdaLR multiplies each group's
    initial lr, where MAE's lr_sched.py multiplies the scale in every step; the two are the same."""
    kwargs = {"betas": tuple(betas), "eps": eps} if name.lower() in ("adamw", "adam", "lamb", "lambc") else {}
    if name.lower() in ("sgd", "momentum", *LARS_NAMES):
        kwargs = {"momentum": momentum}
    groups = (
        param_groups(module, name, weight_decay, layer_decay) if isinstance(module, nn.Module) else module
    )
    groups = [{**g, "lr": lr * g["lr_scale"]} if "lr_scale" in g else g for g in groups]
    if name.lower() in FUSED and fusable(groups):
        kwargs["fused"] = True
    return create_optimizer_v2(groups, opt=name, lr=lr, **kwargs)  # every group carries its weight decay


def fusable(groups: list[dict]) -> bool:
    """Whether torch's fused Adam(W) kernel takes these parameters: floating point, on a CPU or a GPU."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def layer_decay_param_groups(module: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise lr decay (ELECTRA, BEiT; MAE ``util/lr_decay.py``) by timm's ``param_groups_layer_decay`` on
    the timm model inside ``module`` (the first submodule with a ``group_matcher``, e.g. a wrapper's
    ``.model``): for a ViT with ``depth`` blocks, block i gets lr x decay^(depth - i), the patch embedding,
    CLS token and position embedding decay^(depth + 1), the final norm / fc_norm and head 1. Parameters
    outside the timm model get scale 1. Weight decay as :func:`param_groups`. The groups are sorted by
    decreasing ``lr_scale``, so group 0 is the head's (what ``train/lr`` logs)."""
    found = next(((n, m) for n, m in module.named_modules() if hasattr(m, "group_matcher")), None)
    if found is None:
        raise ValueError(
            f"layer_decay needs a timm model (with group_matcher) inside {type(module).__name__}"
        )
    prefix, inner = found
    pre = f"{prefix}." if prefix else ""
    nwd = getattr(module, "no_weight_decay", set)()
    inner_nwd = {n.removeprefix(pre) for n in nwd if n.startswith(pre)}
    groups = param_groups_layer_decay(
        inner, weight_decay, no_weight_decay_list=inner_nwd, layer_decay=layer_decay
    )
    inside = {id(p) for p in inner.parameters()}
    rest = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in inside]
    for decay in (False, True):
        params = [p for n, p in rest if (p.ndim > 1 and n not in nwd) == decay]
        if params:
            groups.append({"lr_scale": 1.0, "weight_decay": weight_decay if decay else 0.0, "params": params})
    return sorted(groups, key=lambda g: -g["lr_scale"])


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
    group = optimizer.param_groups[0]
    base = group["lr"] / group.get("lr_scale", 1.0)  # the unscaled lr (layer decay scales every group's)
    ratio = (lambda lr: lr / base) if base else (lambda lr: 0.0)
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, ratio(min_lr), ratio(warmup_start_lr)))
