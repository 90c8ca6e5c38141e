"""iGPT palette fitting: mmssl's ``fit_kmeans`` (mini-batch k-means + 3 Lloyd passes, torch) vs scikit-learn's
``MiniBatchKMeans`` with the same batch size followed by the same 3 Lloyd passes (``KMeans(init=...)``), one
thread each, on the same pixels; time and inertia (mean squared distance to the nearest centre) side by side.

    python benchmarks/bench_palette.py                 # k = 512 on ~1M pixels (4000 photos at 32 px)
    python benchmarks/bench_palette.py --k 64 --images 500

Pixels are drawn as ``tools/fit_palette.py`` draws them, from the demo photo shards (nothing downloaded).
scikit-learn's default ``MiniBatchKMeans`` (batch 1024, early stopping) is timed once too, for reference.
The ratio is scikit-learn's time over mmssl's; mmssl's inertia should be no higher than scikit-learn's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import Ratio, machine_line
from sklearn.cluster import KMeans, MiniBatchKMeans
from threadpoolctl import threadpool_limits

from mmssl.targets.palette import fit_kmeans, inertia

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import fit_palette  # noqa: E402

QUICK = ["--k", "128", "--images", "800", "--rounds", "1"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--images", type=int, default=4000, help="demo photos to sample (at most 4000)")
    p.add_argument("--pixels-per-image", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8192, help="mini-batch size on both sides")
    p.add_argument("--refine", type=int, default=3, help="Lloyd passes after the mini-batches, both sides")
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


def measure(argv: list[str] | None = None) -> list[Ratio]:
    a = parse_args(argv)
    torch.set_num_threads(1)
    pixels, n = fit_palette.sample_pixels(
        "demo:photos/train", "train", 32, a.images, a.pixels_per_image, 0, "bicubic"
    )
    X = pixels.numpy()

    def ours() -> torch.Tensor:
        return fit_kmeans(pixels, a.k, batch_size=a.batch_size, refine=a.refine, progress=False)

    def sklearn() -> torch.Tensor:
        mbk = MiniBatchKMeans(a.k, batch_size=a.batch_size, n_init=1, random_state=0).fit(X)
        if not a.refine:
            return torch.from_numpy(mbk.cluster_centers_)
        lloyd = KMeans(a.k, init=mbk.cluster_centers_, n_init=1, max_iter=a.refine).fit(X)
        return torch.from_numpy(lloyd.cluster_centers_)

    def sklearn_default() -> torch.Tensor:
        return torch.from_numpy(MiniBatchKMeans(a.k, n_init=1, random_state=0).fit(X).cluster_centers_)

    print(machine_line())
    print(f"k = {a.k}, {len(pixels):,} pixels from {n} photos, batch {a.batch_size}, {a.refine} Lloyd passes")
    times: dict[str, list[float]] = {"mmssl": [], "sklearn": []}
    fits = {}
    with threadpool_limits(1):
        for _ in range(a.rounds):
            for name, fn in (("mmssl", ours), ("sklearn", sklearn)):
                start = time.process_time()
                fits[name] = fn()
                times[name].append(time.process_time() - start)
        start = time.process_time()
        fits["sklearn default"] = sklearn_default()
        times["sklearn default"] = [time.process_time() - start]
    med = {name: statistics.median(t) for name, t in times.items()}
    err = {name: inertia(pixels, c.float()) for name, c in fits.items()}
    labels = {
        "mmssl": "mmssl fit_kmeans",
        "sklearn": f"sklearn MiniBatchKMeans({a.batch_size}) + {a.refine} Lloyd",
        "sklearn default": "sklearn MiniBatchKMeans() defaults",
    }
    for name in times:
        print(f"  {labels[name]:44s} {med[name]:7.2f} CPU-s  inertia {err[name]:.4e}")
    ratio = med["sklearn"] / med["mmssl"]
    print(
        f"  ratio sklearn time / mmssl time: {ratio:.2f}x; inertia mmssl / sklearn: "
        f"{err['mmssl'] / err['sklearn']:.3f} (<= 1: mmssl fits at least as well)"
    )
    case = f"k={a.k}, {len(pixels) // 1000}k px (inertia x{err['mmssl'] / err['sklearn']:.2f})"
    return [Ratio.of_times("palette k-means", case, "-", med["mmssl"], med["sklearn"], labels["sklearn"])]


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    measure()
