"""HOG target throughput: mmssl's HOGTarget (torch, the whole batch at once) vs skimage.feature.hog (one call per
image and colour channel, which is what a per-channel HOG costs there), on the same real photos, same process.

    python benchmarks/bench_hog.py                   # 224 px, batch 32, one torch thread (skimage has one)
    python benchmarks/bench_hog.py --threads 0       # torch's default thread count

Both sides compute the same thing: 8x8 cells, 9 unsigned bins, per-cell L2 norm, for each of 3 channels
(skimage: ``cells_per_block=(1, 1)``, ``block_norm="L2"``). mmssl runs twice: with its training default (Sobel
gradients) and with ``gradient="central"``, skimage's own gradient. Rounds alternate between the three so
machine drift hits all alike; the median round counts. Besides wall-clock images/s it prints images per
CPU-second of the process (``time.process_time``, all threads): on a shared machine, where other jobs take
cores away at random, that is the steadier measure of how much work each side needs. The crops come from the photos bundled with
scikit-image and scikit-learn (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import Ratio, machine_line
from skimage.feature import hog

from mmssl.data import demo
from mmssl.targets.hog import HOGTarget, hog_cells

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def photos(n: int, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8 random crops of the bundled photographs."""
    crops = demo.photo_crops(demo.photo_sources(), n, size, seed=0, max_side=2 * size)
    return np.stack([np.asarray(crop.convert("RGB")) for _, crop in crops])


def skimage_hog(images: np.ndarray) -> list[np.ndarray]:
    return [
        hog(img[..., c], orientations=9, pixels_per_cell=(8, 8), cells_per_block=(1, 1), block_norm="L2",
            feature_vector=False)
        for img in images
        for c in range(3)
    ]  # fmt: skip


# the batch 32: 3 rounds of 16 images (~12 ms each) were too noisy for a ratio
QUICK = ["--batch", "32", "--rounds", "5"]


def measure(argv: list[str] | None = None) -> list[Ratio]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    images = photos(args.batch, args.img)  # uint8 (B, H, W, 3), as skimage users hold them
    batch = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD  # as the model sees it
    sobel, central = HOGTarget(16), HOGTarget(16, gradient="central")

    # Same numbers first: skimage's angle is ours on the transposed image (see mmssl/targets/hog.py).
    grey = torch.from_numpy(images[:1]).permute(0, 3, 1, 2).float()
    ours = hog_cells(grey.transpose(-1, -2), gradient="central").transpose(-1, -2)[0, 0].permute(1, 2, 0)
    theirs = skimage_hog(images[:1])[0][:, :, 0, 0, :]
    print(f"check: max |mmssl central - skimage| on one channel = {np.abs(ours.numpy() - theirs).max():.1e}")

    runs = {
        "mmssl HOGTarget (sobel)": lambda: sobel(batch),
        "mmssl HOGTarget (central)": lambda: central(batch),
        "skimage.feature.hog x3 channels": lambda: skimage_hog(images),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    print(machine_line())
    print(
        f"HOG {args.img}px, batch {args.batch}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    work = {name: args.batch / statistics.median(t) for name, t in cpu.items()}
    for name in runs:
        print(f"  {name:34s} {rate[name]:8.1f} images/s {work[name]:8.1f} images/CPU-s")
    peer = "skimage.feature.hog x3 channels"
    results = []
    for name in list(runs)[:2]:
        print(
            f"  ratio {name} / skimage: {rate[name] / rate[peer]:.1f}x wall-clock, "
            f"{work[name] / work[peer]:.1f}x per CPU-second"
        )
        gradient = name.split("(")[1].rstrip(")")
        case = f"{gradient}, {args.img}px, batch {args.batch}, {torch.get_num_threads()} thread(s)"
        results.append(
            Ratio.of_rates("HOG target", case, "-", work[name], work[peer], "img/CPU-s", "skimage hog")
        )
    return results


if __name__ == "__main__":
    measure()
