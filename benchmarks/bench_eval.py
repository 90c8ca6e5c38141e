"""Evaluation speed, each against a peer in the same process on the same features:

* weighted kNN (``mmssl.eval.knn``, both published (k, T) settings from one similarity pass) vs scikit-learn's
  ``KNeighborsClassifier(metric="cosine", algorithm="brute", weights=exp((1 - d) / T))`` run once per setting;
* a linear-probe grid of G learning rates trained in one pass (``train_probes(base_lrs=[...G])``) vs the same
  G probes trained one after another.

    python benchmarks/bench_eval.py                  # 20k x 384 bank, 2k queries, 100 classes; grid of 4
    python benchmarks/bench_eval.py --bank 50000 --dim 768 --grid 8

Features are synthetic class clusters (speed only; accuracy is checked in the tests). Rounds alternate between
the two sides so machine drift hits both alike; the median of the rounds counts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import Ratio, machine_line
from sklearn.neighbors import KNeighborsClassifier

from mmssl.eval.features import Features
from mmssl.eval.knn import SETTINGS, knn_accuracy
from mmssl.eval.linear_probe import train_probes


def clusters(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, classes, (n,), generator=gen)
    return centres[labels] + 4.0 * torch.randn(n, dim, generator=gen), labels  # overlapping classes


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


QUICK = ["--bank", "5000", "--queries", "500", "--rounds", "3", "--probe-epochs", "2"]  # ~0.1 s a round


def measure(argv: list[str] | None = None) -> list[Ratio]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bank", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--probe-epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    bank, bank_y = clusters(args.bank, args.dim, args.classes, 1)
    queries, query_y = clusters(args.queries, args.dim, args.classes, 2)

    def ours_knn():
        return knn_accuracy(bank, bank_y, queries, query_y, SETTINGS, num_classes=args.classes)

    def sklearn_knn():
        out = []
        for k, t in SETTINGS:
            model = KNeighborsClassifier(
                k, metric="cosine", algorithm="brute", weights=lambda d, t=t: np.exp((1 - d) / t)
            )
            pred = model.fit(bank.numpy(), bank_y.numpy()).predict(queries.numpy())
            out.append(100 * (pred == query_y.numpy()).mean())
        return out

    ours_acc, ref_acc = [r["top1"] for r in ours_knn()], sklearn_knn()
    knn_times = {"mmssl": [], "sklearn": []}
    for _ in range(args.rounds):
        knn_times["mmssl"].append(timed(ours_knn))
        knn_times["sklearn"].append(timed(sklearn_knn))

    train = Features({"f": bank}, bank_y)
    val = Features({"f": queries}, query_y)
    lrs = [0.1 * 2**i for i in range(args.grid)]
    kw = dict(batch_size=1024, epochs=args.probe_epochs, warmup_epochs=1, progress=False)
    probe_runs = {
        "one pass": lambda: train_probes(train, val, base_lrs=lrs, **kw),
        "one by one": lambda: [train_probes(train, val, base_lrs=[b], **kw) for b in lrs],
    }
    for fn in probe_runs.values():  # warm-up: the first call pays one-off costs (allocator, first kernels),
        fn()  # which made a single --quick round of the grid look 2x slower than the probes one by one
    probe_times = {name: [] for name in probe_runs}
    for _ in range(args.rounds):
        for name, fn in probe_runs.items():
            probe_times[name].append(timed(fn))

    med = {k: statistics.median(v) for k, v in {**knn_times, **probe_times}.items()}
    print(machine_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; bank {args.bank} x {args.dim}, "
          f"{args.queries} queries, {args.classes} classes; median of {args.rounds} rounds")  # fmt: skip
    print(f"kNN, settings {list(SETTINGS)}: mmssl {med['mmssl']:.3f} s, sklearn {med['sklearn']:.3f} s "
          f"-> mmssl is {med['sklearn'] / med['mmssl']:.1f}x faster; top-1 mmssl {[round(a, 2) for a in ours_acc]} vs sklearn "
          f"{[round(float(a), 2) for a in ref_acc]}")  # fmt: skip
    print(f"linear probe, grid of {args.grid} lrs x {args.probe_epochs} epochs: one pass {med['one pass']:.2f} s, "
          f"one by one {med['one by one']:.2f} s -> {med['one by one'] / med['one pass']:.2f}x")  # fmt: skip
    return [
        Ratio.of_times("kNN eval", f"{args.bank} x {args.dim} bank, {len(SETTINGS)} settings", "-",
                       med["mmssl"], med["sklearn"], "sklearn KNeighborsClassifier"),
        Ratio.of_times("linear probe grid", f"{args.grid} lrs x {args.probe_epochs} epochs", "-",
                       med["one pass"], med["one by one"], "the same probes one by one"),
    ]  # fmt: skip


if __name__ == "__main__":
    measure()
