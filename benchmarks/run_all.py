"""Run every benchmark in this folder (``bench_*.py``) and print one table of speed ratios, mmssl / peer.

    python benchmarks/run_all.py                  # full sizes (tens of minutes on a 2-core CPU)
    python benchmarks/run_all.py --quick          # small sizes, one round each (a few minutes)
    python benchmarks/run_all.py --only hog data --json runs/bench.json

Each ``bench_NAME.py`` exposes ``measure(argv) -> list[Ratio]`` (and ``QUICK``, its ``--quick`` arguments);
they are imported and run one after another in this process, their own output printed as it comes, then the
table: one row per comparison, ratio > 1 meaning mmssl is faster (fp32 and bf16 rows for training steps; bf16
only on CPUs with native bf16). A benchmark that fails (e.g. a peer library missing) is reported and skipped.

Ratios measured while other work runs are not comparable (the two sides of a comparison alternate, but
contention is not uniform): before each benchmark the CPU time other processes use over one second is
measured (``/proc/stat`` minus this process; the load average would count this process's previous benchmark)
and a warning printed above the table when the machine was not quiet. The JSON holds the rows, the machine
line, the load averages and the other processes' CPU use.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import Ratio, load_average, machine_line, other_cpu_load  # noqa: E402

QUIET_OTHERS = 0.2  # cores busy with other processes on an idle machine stay below this


def discover() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def table(rows: list[Ratio]) -> str:
    header = f"{'benchmark':20s} {'case':48s} {'prec':5s} {'mmssl':>10s} {'peer':>10s} {'unit':11s} {'ratio':>7s}  peer"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.bench:20s} {r.case[:48]:48s} {r.precision:5s} {r.ours:10.4g} {r.peer:10.4g} {r.unit:11s} "
            f"{r.ratio:6.2f}x  {r.peer_name}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="each benchmark's small QUICK arguments")
    p.add_argument("--only", nargs="+", choices=discover(), help="run only these (names without bench_)")
    p.add_argument(
        "--bench-args",
        default="",
        metavar="ARGS",
        help="arguments for the benchmark named by --only, e.g. --only mae_step --bench-args '--batch 32'",
    )
    p.add_argument("--json", type=Path, default=Path("runs/benchmarks.json"), help="where to write results")
    args = p.parse_args(argv)
    names = args.only or discover()
    if args.bench_args and len(names) != 1:
        p.error("--bench-args needs exactly one benchmark in --only")
    threads = torch.get_num_threads()
    rows: list[Ratio] = []
    loads: dict[str, list[float] | None] = {}
    others: dict[str, float | None] = {}
    failed: dict[str, str] = {}
    start = time.perf_counter()
    print(machine_line())
    for name in names:
        loads[name] = list(load_average() or []) or None
        others[name] = other_cpu_load()
        busy_now = "n/a" if others[name] is None else f"{others[name]:.2f}"
        print(
            f"\n===== bench_{name} (load average {loads[name][0] if loads[name] else 'n/a'}, "
            f"other processes {busy_now} cores) =====",
            flush=True,
        )
        torch.set_num_threads(threads)  # benchmarks may pin one thread; each starts from the default
        try:
            module = importlib.import_module(f"bench_{name}")
            rows += module.measure([*(module.QUICK if args.quick else []), *shlex.split(args.bench_args)])
        except SystemExit as exn:  # a benchmark whose peer is missing says so and exits (bench_simclr_step)
            failed[name] = f"stopped: {exn}"
        except Exception as exn:  # one broken or unrunnable benchmark must not hide the others
            failed[name] = f"{type(exn).__name__}: {exn}"
            traceback.print_exc()
    torch.set_num_threads(threads)
    busy = {n: v for n, v in others.items() if v is not None and v >= QUIET_OTHERS}
    print(f"\n===== {len(rows)} ratios from {len(names) - len(failed)} benchmarks, "
          f"{(time.perf_counter() - start) / 60:.1f} min{' (--quick)' if args.quick else ''} =====")  # fmt: skip
    print(f"{datetime.date.today()}, {platform.node()}, {machine_line()}")
    if busy:
        print(
            f"WARNING: the machine was not quiet (other processes used >= {QUIET_OTHERS} cores before "
            f"{', '.join(f'{n} ({v:.2f})' for n, v in busy.items())}): other work was running and these "
            "ratios are not comparable; rerun on an idle machine"
        )
    print(table(rows))
    for name, why in failed.items():
        print(f"FAILED bench_{name}: {why}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": machine_line(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "quick": args.quick,
        "load_before": loads,
        "other_cores_before": others,
        "busy": busy,
        "rows": [r.as_dict() for r in rows],
        "failed": failed,
    }
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
