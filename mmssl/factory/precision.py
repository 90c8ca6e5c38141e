"""``trainer.precision=auto``: bf16 autocast where the hardware runs it natively, fp32 elsewhere.

bf16 autocast pays off where the matrix units take bf16 natively: GPUs from Ampere on, and CPUs with AVX-512
BF16 or AMX, where oneDNN's bf16 matmuls make a ViT-B step about 2x faster than fp32. On a CPU without them
(AVX2 only) bf16 is emulated and far slower than fp32: measured on an AVX2-only EPYC (family 25), the MAE ViT-B
benchmark's bf16 pass (14 steps of batch 8) had not finished after six minutes, while fp32 ran at 1.5 img/s
(issue 17). So ``auto`` picks ``bf16-mixed`` on those and ``32-true`` otherwise, and an explicit bf16 on a CPU
without native support warns. fp16 (``16-mixed``) is never picked: it needs loss scaling, a choice for the
user.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 CPUs with native bf16 dot products
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where there is no such file.

    The one probe of the hardware: tests replace it to play other CPUs."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def native_bf16_flags() -> list[str]:
    """Which of :data:`BF16_CPU_FLAGS` this CPU has (empty: bf16 would be emulated)."""
    flags = cpu_flags()
    return [f for f in BF16_CPU_FLAGS if f in flags]


def describe_cpu() -> str:
    """One line for benchmark output: threads, ISA level torch dispatches to, native bf16 or not."""
    bf16 = native_bf16_flags()
    return (
        f"CPU: {torch.get_num_threads()} torch threads, {torch.backends.cpu.get_cpu_capability()}, "
        f"native bf16: {'yes (' + ', '.join(bf16) + ')' if bf16 else 'no (no avx512_bf16 / amx_bf16)'}"
    )


def device_of(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "auto":
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return accelerator


def resolve_precision(requested: str, accelerator: str) -> tuple[str, str]:
    """``trainer.precision`` and ``trainer.accelerator`` -> (the precision Lightning gets, why)."""
    device = device_of(accelerator)
    if requested != "auto":
        if requested.startswith("bf16") and device == "cpu" and not native_bf16_flags():
            warnings.warn(
                f"trainer.precision={requested} on a CPU without native bf16 (no avx512_bf16 / amx_bf16): "
                "bf16 is emulated there and can be many times slower than fp32; "
                "use trainer.precision=auto or 32-true",
                stacklevel=2,
            )
        return requested, "set by trainer.precision"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", f"auto: {name} computes in bf16 natively"
        return "32-true", f"auto: {name} has no native bf16"
    if device == "cpu":
        bf16 = native_bf16_flags()
        if bf16:
            return "bf16-mixed", f"auto: the CPU has native bf16 ({', '.join(bf16)})"
        return (
            "32-true",
            "auto: the CPU has no native bf16 (no avx512_bf16 / amx_bf16), where bf16 is emulated",
        )
    return "32-true", f"auto: no bf16 probe for accelerator {device!r}"
