"""Shared by the benchmarks: the ratio record each ``bench_*.measure()`` returns (``run_all.py`` collects them),
and the machine line every benchmark prints (threads, ISA, native bf16, load)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from mmssl import linear
from mmssl.factory.precision import describe_cpu, native_bf16_flags


@dataclass
class Ratio:
    """One comparison: ``ratio`` > 1 means mmssl is faster (ours / peer for rates, peer / ours for times)."""

    bench: str
    case: str
    precision: str  # "fp32", "bf16" or "-" (not a model step)
    ours: float
    peer: float
    unit: str  # of ours and peer, e.g. "img/s" or "s"
    peer_name: str
    ratio: float

    @classmethod
    def of_rates(
        cls, bench: str, case: str, precision: str, ours: float, peer: float, unit: str, peer_name: str
    ):
        return cls(bench, case, precision, ours, peer, unit, peer_name, ours / peer)

    @classmethod
    def of_times(cls, bench: str, case: str, precision: str, ours: float, peer: float, peer_name: str):
        return cls(bench, case, precision, ours, peer, "s", peer_name, peer / ours)

    def as_dict(self) -> dict:
        return asdict(self)


def load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(float(x) for x in open("/proc/loadavg").read().split()[:3])  # type: ignore[return-value]
    except OSError:
        return None


def other_cpu_load(seconds: float = 1.0) -> float | None:
    """Cores kept busy by *other* processes over ``seconds``: the machine's busy time (``/proc/stat``) minus this
    process's own. The load average cannot tell: it counts this process too, so right after one benchmark it
    reads about 2 on an otherwise idle 2-core machine."""
    import time

    def busy() -> float:
        fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait

    try:
        mine, total, start = sum(os.times()[:2]), busy(), time.perf_counter()
        time.sleep(seconds)
        mine, total = sum(os.times()[:2]) - mine, busy() - total
        return max(0.0, (total - mine) / (time.perf_counter() - start))
    except (OSError, ValueError, IndexError):
        return None


def machine_line() -> str:
    """Threads, ISA, native bf16, mmssl's fp32 linear library and the 1-minute load average: printed at the
    top of every benchmark."""
    load = load_average()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{describe_cpu()}; {cores} cores; {linear.describe()}; load average {load[0] if load else 'n/a'}"


def add_precision_arg(parser) -> None:
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "both"),
        default="auto",
        help="auto: fp32, plus bf16 autocast where the CPU has native bf16 (AVX-512 BF16 / AMX)",
    )


def precisions(choice: str) -> list[str]:
    """The passes a step benchmark runs: ["fp32"], ["bf16"] or both; auto adds bf16 only on native bf16."""
    if choice == "auto":
        return ["fp32", "bf16"] if native_bf16_flags() else ["fp32"]
    return ["fp32", "bf16"] if choice == "both" else [choice]
