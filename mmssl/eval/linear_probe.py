"""Linear probes on frozen features: a grid of learning rates (and layers) trained in one pass.

Two published protocols, both with a linear lr warmup then a per-step half-cosine to 0 and lr = base_lr x
batch / 256:

* MAE (He et al. 2021, Appendix A.2 / Table 10, facebookresearch/mae ``main_linprobe.py``):
  ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear``, head weight ``trunc_normal(std=0.01)`` (after
  MoCo v3), LARS (momentum 0.9, trust coefficient 0.001, no adaptation or decay for the bias), base lr 0.1,
  weight decay 0, batch 16384, 90 epochs with 10 warmup, cross-entropy. MAE's LARS is timm's ``Lars`` with
  ``always_adapt`` on the weight and off on the bias (identical when weight decay is 0).
* SimCLR (Chen et al. 2020, google-research/simclr ``model_util.py`` and README): a zero-initialised
  ``Linear`` on the representation (``zero_init_logits_layer``), no BatchNorm, SGD with Nesterov momentum 0.9,
  base lr 0.1 (x 4096/256 = 1.6), batch 4096, 90 epochs, no warmup.

Every (layer, base lr) pair gets its own head (BatchNorm + Linear) and its own parameter groups; they all see
the same mini-batches and their losses are summed, so each head's gradient is exactly what it would get alone.

Training features come one epoch at a time. As in the references (MAE ``main_linprobe.py``: RandomResizedCrop
+ flip; SimCLR's linear eval likewise), every epoch may bring the frozen encoder's features of freshly augmented
images (``features.probe_train_features(mode="augment")``, the default of the probe configs); the fast
alternative is one fixed pass, cached (``mode="cached"``: the evaluation view, or K augmented copies cycled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from mmssl.eval.features import Features
from mmssl.eval.knn import topk_accuracy
from mmssl.optim import WarmupCosine


@dataclass
class ProbeResult:
    layer: str
    base_lr: float
    lr: float
    top1: float
    top5: float
    train_loss: float  # mean over the last epoch; nan: this head diverged (lr too high)
    batch_size: int
    epochs: int
    train_samples: int

    head: nn.Module | None = field(default=None, repr=False, compare=False)  # the trained probe, eval mode

    @property
    def diverged(self) -> bool:
        return not torch.isfinite(torch.tensor(self.train_loss)).item()


def make_head(
    dim: int, num_classes: int, init: str, generator: torch.Generator, batchnorm: bool = True
) -> nn.Sequential:
    """``[BatchNorm1d(affine=False, eps=1e-6)] + Linear`` (MAE's ``head`` of the linear-probe ViT)."""
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        if init == "trunc_normal":  # MAE main_linprobe.py: trunc_normal_(head.weight, std=0.01), bias 0
            w = torch.empty_like(head.weight)
            nn.init.trunc_normal_(w, std=0.01, generator=generator)
            head.weight.copy_(w)
            head.bias.zero_()
        elif init == "zeros":  # SimCLR: zero_init_logits_layer=True
            head.weight.zero_()
            head.bias.zero_()
        else:
            raise ValueError(f"head_init must be trunc_normal or zeros, got {init!r}")
    norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
    return nn.Sequential(norm, head)


def make_optimizer(
    heads: list[nn.Linear], lrs: list[float], name: str, momentum: float, weight_decay: float, nesterov: bool
) -> torch.optim.Optimizer:
    """One parameter group per head and role, so every head keeps its own lr (and LARS its own trust ratio).
    ``heads`` are the ``nn.Linear`` layers."""
    if name == "lars":
        groups = []
        for head, lr in zip(heads, lrs, strict=True):
            # MAE util/lars.py adapts (and decays) only parameters with ndim > 1: the weight, not the bias
            groups.append(
                {"params": [head.weight], "lr": lr, "always_adapt": True, "weight_decay": weight_decay}
            )
            groups.append({"params": [head.bias], "lr": lr, "always_adapt": False, "weight_decay": 0.0})
        return Lars(groups, lr=lrs[0], momentum=momentum, trust_coeff=0.001, nesterov=nesterov)
    if name == "sgd":
        groups = [{"params": list(h.parameters()), "lr": lr} for h, lr in zip(heads, lrs, strict=True)]
        return torch.optim.SGD(
            groups, lr=lrs[0], momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    raise ValueError(f"optimizer must be lars or sgd, got {name!r}")


def train_probes(
    train: Features | list[Features] | Callable[[int], Features],
    val: Features,
    *,
    base_lrs: list[float],
    layers: list[str] | None = None,
    optimizer: str = "lars",
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    batch_size: int = 16384,
    epochs: int = 90,
    warmup_epochs: float = 10.0,
    batchnorm: bool = True,
    head_init: str = "trunc_normal",
    lr_scaling: str = "linear",
    num_classes: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[ProbeResult]:
    """Train one head per (layer, base lr) on ``train`` and report top-1/top-5 (%) on ``val`` after the last
    epoch. ``train``: one feature set for every epoch, a list (copies, epoch e uses e mod K) or a function of
    the epoch (fresh augmented features each epoch; it is called once per epoch, in order). Defaults are the MAE
    protocol."""
    copies = [] if callable(train) else train if isinstance(train, list) else [train]

    def epoch_features(epoch: int) -> Features:
        return train(epoch) if callable(train) else copies[epoch % len(copies)]

    first = epoch_features(0)
    labels = first.labels
    layers = layers or list(first.features)
    n = len(labels)
    if num_classes is None:
        num_classes = int(max(labels.max(), val.labels.max())) + 1
    batch = min(batch_size, n)  # the reference drops the last partial batch; a batch above n would leave none
    steps_per_epoch = n // batch
    total, warmup = steps_per_epoch * epochs, round(warmup_epochs * steps_per_epoch)
    scale = batch / 256 if lr_scaling == "linear" else 1.0

    # Every head starts from the same seeded draw and all see the same batch order, so a head trained in a grid
    # is exactly the head a separate run with that one lr would train.
    grid = [(layer, b) for layer in layers for b in base_lrs]
    dims = {layer: first.features[layer].shape[1] for layer in layers}
    heads = [
        make_head(dims[layer], num_classes, head_init, torch.Generator().manual_seed(seed), batchnorm).to(
            device
        )
        for layer, _ in grid
    ]
    gen = torch.Generator().manual_seed(seed)
    linears = [h[1] for h in heads]
    opt = make_optimizer(linears, [b * scale for _, b in grid], optimizer, momentum, weight_decay, nesterov)
    schedule = LambdaLR(opt, WarmupCosine(warmup, total))  # per step, as MAE's adjust_learning_rate

    # The heads of one layer see the same normalised features: their BatchNorm (no parameters, and its input
    # needs no gradient) runs once per layer and step, not once per head, and no BatchNorm backward runs. Each
    # Linear still runs on its own (stacking the heads into one matmul changes the last bits of the gradients:
    # a head in the grid is bit for bit the head trained alone, tests/eval/test_linear_probe.py). The shared
    # BatchNorm's running statistics are copied into the layer's other heads after training.
    by_layer = {layer: [i for i, (g, _) in enumerate(grid) if g == layer] for layer in layers}
    norms = {layer: heads[ids[0]][0] for layer, ids in by_layer.items()}
    last_losses = torch.zeros(len(grid))
    for epoch in tqdm(
        range(epochs), desc="linear probes", unit="epoch", disable=not progress or None, leave=False
    ):
        current = first if epoch == 0 else epoch_features(epoch)
        if not torch.equal(current.labels, labels):
            raise ValueError(f"epoch {epoch}: the training features list the samples in another order")
        feats = current.features
        order = torch.randperm(n, generator=gen)
        epoch_losses = torch.zeros(len(grid))
        for step in range(steps_per_epoch):
            idx = order[step * batch : (step + 1) * batch]
            y = labels[idx].to(device)
            losses = []
            for layer, ids in by_layer.items():
                with torch.no_grad():
                    x = norms[layer].train()(feats[layer][idx].to(device))  # (B, D)
                losses.extend(F.cross_entropy(linears[i](x), y) for i in ids)
            losses_t = torch.stack(losses)  # in grid order: layers are contiguous in the grid
            opt.zero_grad(set_to_none=True)
            losses_t.sum().backward()
            opt.step()
            schedule.step()
            epoch_losses += losses_t.detach().cpu()
        # A head whose loss turned non-finite (lr too high) only spoils itself: heads share no parameters.
        last_losses = epoch_losses / steps_per_epoch
    for layer, ids in by_layer.items():
        for i in ids[1:]:
            heads[i][0].load_state_dict(norms[layer].state_dict())

    results = []
    with torch.no_grad():
        for i, (layer, b) in enumerate(grid):
            head = heads[i].eval()
            acc = topk_accuracy(head(val.features[layer].to(device)).cpu(), val.labels)
            loss = float(last_losses[i])
            results.append(
                ProbeResult(layer, b, b * scale, acc["top1"], acc["top5"], loss, batch, epochs, n, head)
            )
    return results


def best(results: list[ProbeResult]) -> ProbeResult:
    """The highest top-1 (ties: the earlier grid entry). Choosing the lr on the evaluated split is the
    common practice of the papers' grids; say so when reporting it."""
    finite = [r for r in results if not r.diverged]
    return max(finite or results, key=lambda r: r.top1)


def as_rows(results: list[ProbeResult]) -> list[dict]:
    return [
        {f.name: getattr(r, f.name) for f in fields(r) if f.name != "head"} | {"diverged": r.diverged}
        for r in results
    ]


def markdown_table(results: list[ProbeResult]) -> str:
    lines = ["| layer | base lr | lr | top-1 | top-5 | train loss |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r.layer} | {r.base_lr:g} | {r.lr:.3g} | {r.top1:.2f} | {r.top5:.2f} | {r.train_loss:.3f} |"
        )
    return "\n".join(lines)
