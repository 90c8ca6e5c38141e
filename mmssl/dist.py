"""The only module that touches torch.distributed directly."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_gather_with_grad(x: Tensor) -> Tensor:
    """(n, ...) on every rank -> (world_size * n, ...), rank-major, with gradients flowing back to every rank.

    ``torch.distributed.nn.functional.all_gather`` sums the incoming gradients of each rank's slice over all
    ranks in backward (reduce-scatter, or all-to-all + sum on gloo), so a loss computed on the gathered tensor
    back-propagates into the encoder of the rank that produced each row. ``torch.distributed.all_gather``
    alone would cut that path: negatives from other ranks would get no gradient (a common silent bug).
    Every rank must pass the same shape. Returns ``x`` itself when not distributed.
    """
    if world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)
