"""Weighted k-nearest-neighbour classification on L2-normalised features.

Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination" (§3.4): each of
the k most cosine-similar training samples votes for its class with weight exp(similarity / T). The two
settings in common use are k=200, T=0.07 (Wu et al.: zhirongw/lemniscate.pytorch main.py calls test.py's
``kNN(..., 200, args.nce_t)`` with ``--nce-t`` 0.07, the temperature of its NCE softmax) and k=20, T=0.07
(DINO, Caron et al. 2021, ``eval_knn.py``). Top-5 counts a hit when the label is among the 5 best-scored
classes, as both do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SETTINGS = ((20, 0.07), (200, 0.07))  # (k, T): DINO, and Wu et al. 2018 (lemniscate: K=200, nce_t)


@torch.no_grad()
def bank_too_small(k: int, bank_size: int, key: str) -> str | None:
    """A warning when ``k`` (named by ``key``) reaches the memory bank's size: every sample then votes, so the
    "nearest neighbours" are the whole bank (k is clipped to it); None when k is below it."""
    if k < bank_size:
        return None
    return (
        f"mmssl: {key}={k} but the memory bank holds {bank_size} samples: every sample votes (k clipped to "
        f"{bank_size}), so this is no k-nearest-neighbour estimate; use k well below {bank_size}"
    )


def knn_scores(
    train: Tensor, train_labels: Tensor, queries: Tensor, k: int, temperature: float, num_classes: int
) -> Tensor:
    """Class scores (Q, C) = sum over the k nearest training samples of exp(cos / T) for their class."""
    return knn_scores_multi(train, train_labels, queries, [(k, temperature)], num_classes)[0]


@torch.no_grad()
def knn_scores_multi(
    train: Tensor,
    train_labels: Tensor,
    queries: Tensor,
    settings: list[tuple[int, float]],
    num_classes: int,
    chunk_size: int = 1024,
) -> list[Tensor]:
    """:func:`knn_scores` for several (k, T) with one similarity pass: (N, D) bank, (Q, D) queries."""
    if len(train) != len(train_labels):
        raise ValueError(f"{len(train)} training features but {len(train_labels)} labels")
    k_max = min(max(k for k, _ in settings), len(train))
    bank = F.normalize(train.float(), dim=1)  # (N, D)
    out = [torch.empty(len(queries), num_classes) for _ in settings]
    for start in range(0, len(queries), chunk_size):
        q = F.normalize(queries[start : start + chunk_size].float().to(bank.device), dim=1)  # (q, D)
        sims, idx = (q @ bank.T).topk(k_max, dim=1)  # (q, k_max), sorted high to low
        neighbour_labels = train_labels.to(bank.device)[idx]  # (q, k_max)
        for j, (k, t) in enumerate(settings):
            k = min(k, len(train))
            weights = (sims[:, :k] / t).exp()  # (q, k)
            scores = torch.zeros(len(q), num_classes, device=bank.device)
            scores.scatter_add_(1, neighbour_labels[:, :k], weights)
            out[j][start : start + len(q)] = scores.cpu()
    return out


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among the top-k scores; k is capped at the number of classes."""
    best = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (Q, k)
    hits = best == labels.view(-1, 1)
    return {
        f"top{k}": 100.0 * hits[:, : min(k, scores.shape[1])].any(dim=1).float().mean().item() for k in ks
    }


def knn_accuracy(
    train: Tensor,
    train_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    settings: list[tuple[int, float]] | tuple[tuple[int, float], ...] = SETTINGS,
    num_classes: int | None = None,
) -> list[dict]:
    """``[{"k", "T", "top1", "top5"}]`` for each setting."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), query_labels.max())) + 1
    scores = knn_scores_multi(train, train_labels, queries, list(settings), num_classes)
    return [
        {"k": k, "T": t, **topk_accuracy(s, query_labels)} for (k, t), s in zip(settings, scores, strict=True)
    ]
