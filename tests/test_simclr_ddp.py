"""SimCLR across processes: 2 gloo processes under DistributedDataParallel must reproduce one process holding
the concatenated batch, loss and gradients, to 1e-5 (and agree with lightly's gathered NT-Xent).

BatchNorm layers run on their running statistics here: per-rank batch statistics differ from global ones by
design (that is what ``trainer.sync_batchnorm`` fixes, and PyTorch's SyncBatchNorm needs a GPU), and this test
is about the gathered loss and its gradient scale.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmssl import config as C
from mmssl.factory import build_objective

lightly_loss = pytest.importorskip("lightly.loss")
pytestmark = pytest.mark.slow  # spawns two processes: about 1 minute idle, 3 minutes on a busy machine

WORLD, N_LOCAL = 2, 4
MODELS = {
    "resnet18": ["objective=simclr", "backbone.name=resnet18", "backbone.img_size=32"],
    "vit": ["objective=simclr", "backbone.name=vit_tiny_patch16_224", "backbone.img_size=32",
            "backbone.patch_size=8", "backbone.depth=2"],
}  # fmt: skip


def make(model: str, gather: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The same objective and global batch in every process: built from fixed seeds."""
    torch.manual_seed(0)
    objective = build_objective(C.load(None, [*MODELS[model], f"simclr.gather_distributed={gather}"]))
    for m in objective.modules():
        if isinstance(m, nn.BatchNorm2d):  # timm zero-inits some BN scales; give every block a gradient
            nn.init.uniform_(m.weight, 0.5, 1.5)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # running statistics (see the module docstring); the objective itself stays in train mode
    g = torch.Generator().manual_seed(1)
    n = WORLD * N_LOCAL
    batch = {k: torch.randn(n, 3, 32, 32, generator=g) for k in ("view1", "view2")}
    return objective, batch


def run_and_grads(objective: nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    out = objective(batch)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in objective.named_parameters() if p.grad is not None}
    return out["loss"].item(), grads


def projections(objective: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        z = objective.head(objective.embed(torch.cat([batch["view1"], batch["view2"]])))
    return z.split(batch["view1"].shape[0])


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        results = {}
        for model in MODELS:
            for gather in (True, False):
                objective, batch = make(model, gather)
                mine = {k: v[rank * N_LOCAL : (rank + 1) * N_LOCAL] for k, v in batch.items()}
                ddp = DistributedDataParallel(objective)  # averages gradients over ranks, as Lightning's DDP
                loss, grads = run_and_grads(ddp, mine)
                z1, z2 = projections(objective, mine)
                oracle = lightly_loss.NTXentLoss(temperature=0.1, gather_distributed=gather)(z1, z2).item()
                grads = {k.removeprefix("module."): v for k, v in grads.items()}
                results[model, gather] = {"loss": loss, "grads": grads, "lightly": oracle}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process() -> dict[str, tuple[float, dict[str, torch.Tensor]]]:
    return {model: run_and_grads(*make(model)) for model in MODELS}


@pytest.mark.parametrize("model", list(MODELS))
def test_two_processes_equal_one_process_on_the_concatenated_batch(ddp_results, one_process, model):
    loss, grads = one_process[model]
    ranks = [r[model, True] for r in ddp_results]
    # the global loss is the mean of the ranks' losses (each rank: its 2n anchors against all 2N views)
    assert sum(r["loss"] for r in ranks) / WORLD == pytest.approx(loss, abs=1e-5)
    assert set(ranks[0]["grads"]) == set(grads)
    for r in ranks:
        # lightly's gathered NT-Xent, same rank; x2: lightly averages over the 2n anchors, the reference
        # (and mmssl) sums its two directions
        assert r["loss"] == pytest.approx(2 * r["lightly"], abs=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(r["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model", list(MODELS))
def test_without_gathering_the_check_fails(ddp_results, one_process, model):
    """The comparison above can fail: with negatives from the local batch only, the loss is a different one."""
    loss, _ = one_process[model]
    local = [r[model, False] for r in ddp_results]
    assert abs(sum(r["loss"] for r in local) / WORLD - loss) > 1e-2
    for r in local:
        assert r["loss"] == pytest.approx(2 * r["lightly"], abs=1e-5)  # x2 as above
