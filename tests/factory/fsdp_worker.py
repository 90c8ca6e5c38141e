"""Run tools/pretrain.py under Lightning's FSDPStrategy on CPU (gloo), for test_fsdp.py.

Lightning refuses FSDP with its CPU accelerator (``type(strategy) is FSDPStrategy`` in its accelerator
connector) and so does mmssl (``config.validate_machine``); FSDP itself runs on CPU with gloo when told
``device_id=cpu`` (Lightning passes the device's index, None on CPU). This script lifts the refusals and wraps
the root with that device; everything else is Lightning's: the strategy comes from ``factory.fsdp_kwargs``
exactly as on GPUs (auto-wrap per block, activation checkpointing, full state dicts), and the run is the real
CLI (data, module, callbacks, checkpoints, resume). Lightning re-launches this very command for rank 1, which
applies the same patches.

    python tests/factory/fsdp_worker.py --cfg mae_demo trainer.devices=2 ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import pretrain  # noqa: E402

from mmssl import config as C  # noqa: E402
from mmssl import factory  # noqa: E402


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy under another name (which Lightning's CUDA-only check does not catch), rooted on the CPU."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # As Lightning's own _setup_model, with device_id=cpu; Lightning then sees a wrapped model and adds
        # activation checkpointing only (its auto-wrap policy, the same one, has been applied here).
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        return super()._setup_model(wrapped)


def main() -> int:
    torch.set_num_threads(1)
    C.validate_machine = lambda cfg: None
    factory.fsdp_strategy = lambda cfg, objective: CPUFSDPStrategy(**factory.fsdp_kwargs(cfg, objective))
    return pretrain.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
