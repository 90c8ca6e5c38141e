"""fp32 linear layers through oneDNN on CPUs where it beats the BLAS torch links (the same product, another
library).

torch computes an fp32 ``nn.Linear`` on CPU with MKL's sgemm. MKL picks its AVX-512 kernels on Intel CPUs
only; on this project's AMD EPYC (AVX-512, 2 threads) oneDNN's sgemm, which torch also ships (it already runs
every bf16 matmul), is 2.1-2.2x faster forward and 1.8-2.1x forward + backward on ViT-B's layer shapes
(measured 2026-12-03; ms, MKL / oneDNN, fwd + bwd: 8x50x768 -> 3072 30.7 / 17.5, 8x197x512 -> 2048
46.5 / 24.1, 8x50x3072 -> 768 27.3 / 13.0), with fp32 rounding (relative error 1e-6 against float64, as
MKL's). Which one wins depends on the CPU, so ``auto`` measures both once, on a ViT-B MLP product, and takes
oneDNN when it is at least ``MIN_SPEEDUP`` times faster; ``MMSSL_CPU_LINEAR=onednn`` or ``blas`` decides
instead. GPUs, bf16 / fp16, autocast and ``torch.compile`` keep ``F.linear`` (autocast already sends bf16 to
oneDNN). torch's FLOP counter learns the op's formula here, so FLOP counts stay right.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import flop_counter

MODES = ("auto", "onednn", "blas")
MIN_SPEEDUP = 1.2  # oneDNN must win clearly: near parity the BLAS (torch's default) stays


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight^T + bias by oneDNN (torch's own op, as its CPU compiler emits it); any strides."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """F.linear with oneDNN forward and backward: grad_x = g W, grad_W = g^T x (transposed views, no copies),
    grad_b = sum(g). Saves what F.linear's autograd saves (x and W)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _onednn(g, weight.t(), None).view(*grad.shape[:-1], weight.shape[1]) if need_x else None
        grad_w = _onednn(g.t(), x.reshape(-1, x.shape[-1]).t(), None) if need_w else None
        grad_b = g.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def _register_flops() -> None:
    """FLOPs of the oneDNN product for ``torch.utils.flop_counter`` (2 M K N, as its ``mm``), once."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        rows = math.prod(x_shape[:-1])
        return 2 * rows * x_shape[-1] * w_shape[0]


_register_flops()


_override: str | None = None  # set by ``library`` for a block of code; else the environment decides


def mode() -> str:
    value = _override or os.environ.get("MMSSL_CPU_LINEAR", "auto")
    if value not in MODES:
        raise ValueError(f"MMSSL_CPU_LINEAR={value!r}: must be one of {MODES}")
    return value


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def onednn_speedup() -> float:
    """BLAS time / oneDNN time for one fp32 (256 x 768) @ (768 x 3072) product on this CPU with torch's
    threads, best of 5 after a warm-up (about 20 ms, once per process); 0 without oneDNN."""
    if not available():
        return 0.0
    x, w = torch.randn(256, 768), torch.randn(3072, 768)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        return best(lambda: F.linear(x, w)) / best(lambda: _onednn(x, w, None))
    except RuntimeError:  # a torch built without the op's kernel
        return 0.0


@contextlib.contextmanager
def library(name: str) -> Iterator[None]:
    """Use ``name`` (as ``MMSSL_CPU_LINEAR`` would) inside the block, in this process only, then what was
    before: e.g. ``"blas"`` to compute exactly what a plain timm / torch model computes on this machine."""
    global _override
    if name not in MODES:
        raise ValueError(f"linear library {name!r}: must be one of {MODES}")
    before, _override = _override, name
    try:
        yield
    finally:
        _override = before


def use_onednn() -> bool:
    chosen = mode()
    if chosen == "onednn" and not available():
        raise RuntimeError("MMSSL_CPU_LINEAR=onednn: this torch build has no oneDNN; use auto or blas")
    return chosen == "onednn" or (chosen == "auto" and onednn_speedup() >= MIN_SPEEDUP)


def describe() -> str:
    """One line for logs and benchmarks: what fp32 CPU linear layers run on, and why."""
    chosen = mode()
    if chosen != "auto":
        return f"fp32 CPU linear: {chosen} (MMSSL_CPU_LINEAR)"
    speedup = onednn_speedup()
    return f"fp32 CPU linear: {'onednn' if use_onednn() else 'blas'} (oneDNN {speedup:.2f}x the BLAS here)"


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters and state-dict keys) whose fp32 CPU product outside autocast runs
    on oneDNN when :func:`use_onednn`; everything else is ``F.linear``."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.dim() >= 2
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()  # inductor lowers F.linear itself (and wants packed weights)
            and use_onednn()
        ):
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_fast_linear(module: nn.Module) -> int:
    """Make every plain ``nn.Linear`` inside ``module`` a :class:`Linear`, in place (parameters, hooks and
    state-dict keys unchanged; subclasses of ``nn.Linear`` are left alone). Returns how many changed."""
    changed = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
            changed += 1
    if changed and mode() == "auto":
        onednn_speedup()  # measure now, not inside a caller's first forward (a FLOP counter would count it)
    return changed
