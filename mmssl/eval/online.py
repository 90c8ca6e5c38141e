"""Evaluation during pretraining, logged like any other metric (solo-learn / lightly style online probes).

* :class:`OnlineLinearProbe`: a ``BatchNorm1d(affine=False) + Linear`` head (the MAE probe head) trained with
  its own AdamW on the *detached* pooled features of every labelled training batch. It never touches the
  objective's gradients; it reports ``train/online_top1`` and ``train/online_loss`` (accuracy measured
  before the head's step on that batch, so on data it has not yet trained on).
* :class:`KNNMonitor`: every N epochs, weighted kNN top-1 (``knn.py``) of the frozen encoder on a small
  labelled split, reported as ``val/knn_top1``.

Both use the encoder contract (``objective.backbone.forward_pooled``, see objectives/base.py) in eval mode,
so a CNN's BatchNorm statistics are not moved by the extra forward pass. DDP: every rank computes the same
number of forward passes; the probe's gradients are averaged over ranks with one collective per step (ranks
take the same number of steps, so they stay in lock-step and the heads stay identical); the kNN runs the
whole small split on every rank (identical result, no collective, safe even where parameters are sharded).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mmssl.data.shards import SampleDecoder, eval_pipeline
from mmssl.data.transforms import View
from mmssl.eval.knn import knn_accuracy


def _encoder(pl_module: L.LightningModule) -> nn.Module:
    backbone = getattr(pl_module.objective, "backbone", None)
    if backbone is None:
        raise TypeError(
            f"online evaluation needs the objective to expose its encoder as .backbone "
            f"({type(pl_module.objective).__name__} has none)"
        )
    return backbone


@torch.no_grad()
def pooled_features(pl_module: L.LightningModule, images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, D) float32 from the encoder in eval mode, under the trainer's precision."""
    backbone = _encoder(pl_module)
    was_training = backbone.training
    backbone.eval()
    try:
        with pl_module.trainer.precision_plugin.forward_context():
            return backbone.forward_pooled(images).float()
    finally:
        backbone.train(was_training)


class OnlineLinearProbe(L.Callback):
    def __init__(self, num_classes: int, lr: float = 1e-3, image_key: str = "image"):
        self.num_classes, self.lr, self.image_key = num_classes, lr, image_key
        self.head: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None  # state restored before the head exists

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dim = _encoder(pl_module).embed_dim
        # Same initial weights on every rank (the gradients are averaged, so they stay equal afterwards).
        gen = torch.Generator().manual_seed(0)
        linear = nn.Linear(dim, self.num_classes)
        with torch.no_grad():
            linear.weight.copy_(torch.empty_like(linear.weight).normal_(0, 0.01, generator=gen))
            linear.bias.zero_()
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear).to(pl_module.device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=0.0)
        if self._pending is not None:
            self.load_state_dict(self._pending)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "label" not in batch:
            raise ValueError(
                "eval.online_probe needs labelled training data: the batches carry no 'label' (shards need a "
                f".cls member per sample; batch keys: {sorted(batch)}); set eval.online_probe=false otherwise"
            )
        feats = pooled_features(pl_module, batch[self.image_key])  # (B, D), no grad
        labels = batch["label"].to(feats.device)
        if int(labels.max()) >= self.num_classes or int(labels.min()) < 0:
            raise ValueError(f"label {int(labels.max())} outside eval.num_classes={self.num_classes}")
        self.head.train()
        with torch.enable_grad():
            logits = self.head(feats)
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if trainer.world_size > 1:  # one flat all-reduce per step, on every rank
            grads = [p.grad for p in self.head.parameters()]
            flat = trainer.strategy.reduce(torch.cat([g.flatten() for g in grads]), reduce_op="mean")
            torch.nn.utils.vector_to_parameters(flat, grads)
        self.optimizer.step()
        top1 = (logits.argmax(1) == labels).float().mean()
        pl_module.log("train/online_top1", 100 * top1, prog_bar=True, batch_size=len(labels))
        pl_module.log("train/online_loss", loss.detach(), batch_size=len(labels))

    def state_dict(self) -> dict[str, Any]:
        if self.head is None:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.head is None:
            self._pending = state_dict
            return
        self.head.load_state_dict(state_dict["head"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._pending = None


class KNNMonitor(L.Callback):
    def __init__(
        self,
        train_urls: list[str],
        val_urls: list[str],
        view: View,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 256,
        label_key: str = "cls",
    ):
        self.train_urls, self.val_urls, self.view = train_urls, val_urls, view
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature
        self.batch_size, self.label_key = batch_size, label_key

    def _features(self, pl_module, urls: list[str]) -> tuple[Tensor, Tensor]:
        decoder = SampleDecoder(label_key=self.label_key, require_label=True)
        pipeline = eval_pipeline(urls, self.view, self.batch_size, rank=0, world_size=1, decoder=decoder)
        feats, labels = [], []
        # A private generator: a DataLoader draws its base seed when iterated, which would otherwise take a
        # number from the global generator mid-training. The eval view draws nothing at random.
        loader = DataLoader(pipeline, batch_size=None, num_workers=0, generator=torch.Generator())
        for batch in loader:
            feats.append(pooled_features(pl_module, batch["image"].to(pl_module.device)).cpu())
            labels.append(batch["label"])
        if not labels:
            raise ValueError(f"eval.knn_*_shards: no labelled sample (key '.{self.label_key}') in {urls[:3]}")
        return torch.cat(feats), torch.cat(labels)

    def evaluate(self, pl_module: L.LightningModule) -> dict[str, float]:
        bank, bank_labels = self._features(pl_module, self.train_urls)
        queries, query_labels = self._features(pl_module, self.val_urls)
        (result,) = knn_accuracy(bank, bank_labels, queries, query_labels, [(self.k, self.temperature)])
        return result

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        result = self.evaluate(pl_module)
        pl_module.log("val/knn_top1", result["top1"], rank_zero_only=True)
