"""The one generic LightningModule (its callbacks are in ``callbacks.py``). It knows only the objective
contract (``objectives/base.py``): a batch dict in, a dict with ``"loss"`` out. It never imports an objective.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import ClassVar

import lightning.pytorch as L
import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel

from mmssl.optim import create_optimizer, param_groups, warmup_cosine_schedule


def scalars(out: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in out.items() if isinstance(v, Tensor) and v.ndim == 0}


def step_seed(seed: int, rank: int, step: int, batch_idx: int) -> int:
    """A 63-bit seed for one training batch of one rank: a hash (BLAKE2b) of all four numbers, so neighbouring
    ranks and steps get unrelated streams rather than overlapping ``seed + i`` ones."""
    digest = hashlib.blake2b(repr((seed, rank, step, batch_idx)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batch_size(batch: dict) -> int:
    """Samples in a batch dict: the length of its first tensor (lists of captions may sit beside it)."""
    return len(next(v for v in batch.values() if isinstance(v, Tensor)))


class PretrainModule(L.LightningModule):
    """Optimizer, per-step warmup-cosine schedule, logging and failure checks around any objective.

    Randomness: before every training batch the global torch generators (CPU and every accelerator, through
    ``torch.manual_seed``) are reseeded with ``step_seed(seed, global_rank, global_step, batch_idx)``. The
    random draws of a training step (MAE / MaskFeat masks, iGPT-BERT masks, drop-path) are therefore a pure
    function of (seed, rank, step, micro-batch): each rank draws its own masks (facebookresearch/mae
    ``main_pretrain.py`` seeds each rank with ``seed + rank``; one shared seed would make a 64-GPU run draw
    every mask 64 times), a rerun draws the same ones, and a run resumed at any step continues exactly where
    the uninterrupted run would be, with no generator state in the checkpoint. ``batch_idx`` separates the
    micro-batches of one gradient-accumulation window, which share ``global_step``. Model initialisation
    happens before this, from ``seed_everything(seed)`` on every rank, so all ranks start from the same
    weights. Python's ``random`` and numpy are left alone: nothing in a training step draws from their global
    state (``ops.block_masking`` seeds its own ``random.Random`` from torch). Data workers have their own
    seeds (``data/module.py``).
    """

    # config dict -> objective, for ``load_from_checkpoint(path)`` without an objective: lit.py may not import
    # mmssl.factory (DESIGN.md §3), so the factory package installs its builder here when imported (objective_from_config).
    objective_factory: ClassVar[Callable[[dict], nn.Module] | None] = None

    def __init__(
        self,
        objective: nn.Module | None = None,
        *,
        lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        optimizer: str = "adamw",
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.9,
        min_lr: float = 0.0,
        seed: int = 0,
        warmup_start_lr: float = 0.0,
        config: dict | None = None,
        layer_decay: float | None = None,
    ):
        super().__init__()
        if objective is None:  # load_from_checkpoint(path): rebuild it from the saved run config
            if config is None or self.objective_factory is None:
                raise TypeError(
                    "PretrainModule needs an objective; load_from_checkpoint(path) rebuilds it from the "
                    "checkpoint's config once mmssl.factory is imported (or pass objective=...)"
                )
            objective = self.objective_factory(config)
        self.objective = objective
        # Taken now, before any FSDP wrapping flattens the parameters (see optim.param_groups).
        # layer_decay: layer-wise lr decay for fine-tuning (optim.layer_decay_param_groups)
        self._param_groups = param_groups(objective, optimizer, weight_decay, layer_decay)
        # The resolved run config travels inside every checkpoint (plain types: loads with weights_only=True).
        self.save_hyperparameters(ignore=["objective"])

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.objective(batch)

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.hparams.seed, self.global_rank, self.global_step, batch_idx))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        out = self.objective(batch)
        n = batch_size(batch)
        logged = scalars(out)
        for key, value in logged.items():
            self.log(f"train/{key}", value, prog_bar=key == "loss", batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return {**logged, "loss": out["loss"]}  # the scalars reach callbacks (throughput.py reads "tokens")

    def on_validation_epoch_start(self) -> None:
        self._val_sums: dict[str, Tensor] = {}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # Ranks may see different numbers of validation batches (every sample once), so nothing here may
        # synchronise; sums are reduced once in on_validation_epoch_end, weighted by batch size.
        n = batch_size(batch)
        for key, value in scalars(self.objective(batch)).items():
            total = self._val_sums.setdefault(key, torch.zeros(2, device=self.device, dtype=torch.float64))
            total += torch.stack(
                [value.double() * n, torch.tensor(n, device=self.device, dtype=torch.float64)]
            )

    def on_validation_epoch_end(self) -> None:
        for key in sorted(self._val_sums):
            total = self.trainer.strategy.reduce(self._val_sums[key], reduce_op="sum")
            self.log(f"val/{key}", (total[0] / total[1]).float(), prog_bar=key == "loss", rank_zero_only=True)

    def configure_optimizers(self):
        h = self.hparams
        opt = create_optimizer(
            self._param_groups, h.optimizer, h.lr, h.weight_decay, tuple(h.betas), h.eps, h.momentum
        )
        schedule = warmup_cosine_schedule(opt, h.warmup_steps, h.total_steps, h.min_lr, h.warmup_start_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        # After DDP's all-reduce every rank holds the same gradients, so every rank stops together here and
        # the optimizer never applies a NaN update (a NaN loss otherwise silently turns the weights into NaN).
        if isinstance(self.trainer.model, FullyShardedDataParallel):  # each rank holds gradient shards
            norm = self.trainer.model.clip_grad_norm_(math.inf)  # FSDP's norm over all shards; clips nothing
        else:
            grads = [p.grad for p in self.objective.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if not torch.isfinite(norm):
            raise FloatingPointError(
                f"non-finite loss or gradient at step {self.global_step} (gradient norm {norm.item()}); "
                "stopped before the optimizer step, so no NaN weights were saved. Lower optim.base_lr, "
                "set trainer.gradient_clip_val, or try trainer.precision=32-true."
            )
        self.log("train/grad_norm", norm)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        model = self.trainer.model
        if gradient_clip_val and isinstance(model, FullyShardedDataParallel):
            # Lightning's FSDP precision plugin refuses norm clipping: torch.nn.utils.clip_grad_norm_ would see
            # this rank's shards only. FSDP's own clip_grad_norm_ takes the norm over all of them.
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        hook = getattr(self.objective, "after_optimizer_step", None)
        if hook is not None:
            hook()
