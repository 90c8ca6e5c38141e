"""A loss under 2-process DDP (gloo, CPU) and on one process, for the DDP-equals-one-process tests
(tests/test_dist.py): the objective-specific maths of a distributed run (gathered negatives, exchanged texts,
DDP's gradient average) without the CLI, Lightning or a data pipeline.

The processes are forked, so they inherit the test's imports and its ``make`` functions (closures are fine) instead
of importing torch, timm and open_clip again (seconds each on a busy machine)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

Batch = dict[str, torch.Tensor]
Make = Callable[[], tuple[nn.Module, Batch]]  # the objective and the global batch, the same in every process
Extra = Callable[[nn.Module, Batch], dict]  # more per-rank values, computed inside the process group


def grads_of(objective: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in objective.named_parameters() if p.grad is not None}


def one_process(make: Make) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The reference: one process holding the global batch. Returns the objective's output and the gradients."""
    objective, batch = make()
    out = objective(batch)
    out["loss"].backward()
    return out, grads_of(objective)


def shard(batch: Batch, rank: int, world: int) -> Batch:
    n = len(next(iter(batch.values()))) // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


def _rank(rank: int, world: int, cases: dict[str, Make], extra: Extra | None, out: str) -> None:
    torch.set_num_threads(
        1
    )  # before any op: 2 processes on 2 cores, and no OpenMP pool inherited across fork
    init = f"file://{Path(out) / 'init'}"
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        results = {}
        for name, make in cases.items():
            objective, batch = make()
            local = shard(batch, rank, world)
            model = DistributedDataParallel(objective)  # averages gradients over ranks, as Lightning's DDP
            loss = model(local)["loss"]
            loss.backward()  # the wrapper must outlive this: its reducer's hooks do the average
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            results[name] = {"loss": mean / world, "local_loss": loss.detach(), "grads": grads_of(objective)}
            if extra is not None:
                results[name].update(extra(objective, local))
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def two_processes(cases: dict[str, Make], out: Path, extra: Extra | None = None) -> list[dict[str, dict]]:
    """Runs every case on 2 gloo processes, each on its half of the global batch under DistributedDataParallel.
    Returns per rank and case: ``loss`` (the mean of the ranks' losses, what the run optimises), ``local_loss``,
    ``grads`` (after DDP's average) and whatever ``extra(objective, local batch)`` returned."""
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank, args=(2, cases, extra, str(out)), nprocs=2, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def assert_ranks_equal_one_process(
    ranks: list[dict], loss: torch.Tensor, grads: dict[str, torch.Tensor]
) -> None:
    """Every rank's global loss and averaged gradients equal one process's on the global batch, to 1e-5."""
    assert len(grads) > 0
    for r in ranks:
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=0, atol=1e-5)
        assert r["grads"].keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(r["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)
