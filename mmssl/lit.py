"""The one generic LightningModule (its callbacks are in ``callbacks.py``). It knows only the objective
contract (``objectives/base.py``): a batch dict in, a dict with ``"loss"`` out. It never imports an objective.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import Tensor, nn

from mmssl.optim import create_optimizer, warmup_cosine_schedule


def scalars(out: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in out.items() if isinstance(v, Tensor) and v.ndim == 0}


def batch_size(batch: dict) -> int:
    """Samples in a batch dict: the length of its first tensor (lists of captions may sit beside it)."""
    return len(next(v for v in batch.values() if isinstance(v, Tensor)))


class PretrainModule(L.LightningModule):
    """Optimizer, per-step warmup-cosine schedule, logging and failure checks around any objective."""

    def __init__(
        self,
        objective: nn.Module,
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
        config: dict | None = None,
    ):
        super().__init__()
        self.objective = objective
        # The resolved run config travels inside every checkpoint (plain types: loads with weights_only=True).
        self.save_hyperparameters(ignore=["objective"])

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.objective(batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.objective(batch)
        n = batch_size(batch)
        for key, value in scalars(out).items():
            self.log(f"train/{key}", value, prog_bar=key == "loss", batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return out["loss"]

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
            self.objective, h.optimizer, h.lr, h.weight_decay, tuple(h.betas), h.eps, h.momentum
        )
        schedule = warmup_cosine_schedule(opt, h.warmup_steps, h.total_steps, h.min_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        # After DDP's all-reduce every rank holds the same gradients, so every rank stops together here and
        # the optimizer never applies a NaN update (a NaN loss otherwise silently turns the weights into NaN).
        grads = [p.grad for p in self.objective.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if not torch.isfinite(norm):
            raise FloatingPointError(
                f"non-finite loss or gradient at step {self.global_step} (gradient norm {norm.item()}); "
                "stopped before the optimizer step, so no NaN weights were saved. Lower optim.base_lr, "
                "set trainer.gradient_clip_val, or try trainer.precision=32-true."
            )
        self.log("train/grad_norm", norm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        hook = getattr(self.objective, "after_optimizer_step", None)
        if hook is not None:
            hook()
