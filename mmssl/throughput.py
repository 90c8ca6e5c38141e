"""Training throughput in the logs: ``train/images_per_s``, ``train/tokens_per_s`` and ``train/mfu``.

Measured with a wall clock between the ends of optimizer steps, only at the steps Lightning writes to the logs
(every ``trainer.log_every_n_steps``): each value is the mean over the steps since the previous one, so CUDA
is synchronised once per logged step and never in between. The first step after the start of fit (compilation,
worker start-up, cuDNN autotuning) is left out, and time spent in validation is taken out of the interval.

* images/s is global: this rank's count times the world size, with no collective; the data pipeline gives every
  rank equal batches (``data/module.py``). One image is one sample of the batch (a SimCLR image brings two
  views, a CLIP or LLaVA image its text).
* tokens/s, global too, where the objective returns a ``"tokens"`` count (``objectives/base.py``: iGPT's
  palette tokens, LLaVA's text tokens).
* MFU (model FLOPs utilisation, PaLM Appendix B) per device, on GPUs whose peak Lightning knows, for objectives
  with ``flops_per_sample()`` (counted as ``flops.py`` says): achieved training FLOP/s / peak FLOP/s of the
  compute dtype of ``trainer.precision``.

Why not Lightning's ``ThroughputMonitor``: it logs nothing until a rolling window (100 batches by default) has
filled, writes global rates only when there is more than one device, names its keys itself, synchronises CUDA
after every batch, reads FLOPs from the LightningModule, and its ``length_fn`` sees only the batch, while
LLaVA's text tokens exist only after the objective has tokenised the captions. Its peak-FLOPs table
(``get_available_flops``) is used here.
"""

from __future__ import annotations

import time

import lightning.pytorch as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops

from mmssl.lit import batch_size

COMPUTE_DTYPES = {
    "32-true": torch.float32,
    "32": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
}
# Lightning 2.6 does not recognise the name "NVIDIA H200" and lists the H200's *sparse* tensor-core figures;
# MFU uses dense ones. NVIDIA H200 datasheet (SXM): BF16/FP16 1,979 and TF32 989 TFLOPS "with sparsity", i.e.
# 989.5 and 494.7 dense; FP32 67 TFLOPS. (H200 NVL is left to Lightning.)
H200_DENSE = {torch.bfloat16: 989.5e12, torch.float16: 989.5e12, "tfloat32": 494.7e12, torch.float32: 67e12}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of one device in the compute dtype of a Lightning precision; None off GPUs or when
    the device is unknown."""
    if device.type != "cuda":
        return None
    dtype = COMPUTE_DTYPES.get(str(precision), torch.float32)
    name = torch.cuda.get_device_name(device).lower()
    if "h200" in name and "nvl" not in name:
        if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
            return H200_DENSE["tfloat32"]
        return H200_DENSE[dtype]
    return get_available_flops(device, dtype)


class ThroughputLogger(L.Callback):
    """Logs ``train/images_per_s``, ``train/tokens_per_s`` (when the objective counts tokens) and
    ``train/mfu`` (on GPUs, when the objective counts FLOPs) like the loss; see the module docstring."""

    def __init__(self) -> None:
        self.start: float | None = None  # the clock; None until the first step has ended
        self.paused: float | None = None
        self.step = 0  # global step when the clock last (re)started or measured
        self.images = 0
        self.tokens: torch.Tensor | None = None  # summed on the device: no synchronisation per step
        self.flops_per_image: int | None = None
        self.peak: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        count = getattr(getattr(pl_module, "objective", pl_module), "flops_per_sample", None)
        self.flops_per_image = count() if count is not None else None
        self.peak = peak_flops(trainer.strategy.root_device, trainer.precision)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = None  # a new fit (or a resumed one) starts with an unmeasured step

    def _now(self, trainer: L.Trainer) -> float:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the clock must see the queued kernels finish
        return time.perf_counter()

    def _restart(self, trainer: L.Trainer, now: float) -> None:
        self.start, self.step, self.images, self.tokens = now, trainer.global_step, 0, None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if self.start is None:
            self._restart(trainer, self._now(trainer))  # the first step is not measured
            return
        self.images += batch_size(batch)
        tokens = outputs.get("tokens") if isinstance(outputs, dict) else None
        if tokens is not None:
            self.tokens = tokens.detach() if self.tokens is None else self.tokens + tokens.detach()
        every = trainer.log_every_n_steps
        if trainer.global_step == self.step or not every or trainer.global_step % every:
            return  # still accumulating gradients, or a step Lightning does not log
        now = self._now(trainer)
        elapsed, world = now - self.start, trainer.world_size
        pl_module.log("train/images_per_s", self.images * world / elapsed)
        if self.tokens is not None:
            pl_module.log("train/tokens_per_s", self.tokens.item() * world / elapsed)
        if self.flops_per_image and self.peak:
            pl_module.log("train/mfu", self.flops_per_image * self.images / elapsed / self.peak)
        self._restart(trainer, now)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start is not None and not trainer.sanity_checking:
            self.paused = self._now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start is not None and self.paused is not None:
            self.start += time.perf_counter() - self.paused  # validation time is not training time
        self.paused = None
