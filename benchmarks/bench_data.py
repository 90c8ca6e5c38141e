"""Input-pipeline throughput: mmssl's webdataset train loader vs torchvision ImageFolder + DataLoader.

Both read the same JPEG bytes (an ImageFolder on disk and shards holding those files unchanged), apply the
same ``mae_view`` (RandomResizedCrop + flip + normalise, decoded with PIL) with the same batch size and
worker count, side by side in one process. Warm-up batches (worker start, shuffle-buffer fill) are
excluded. Images are random crops of the photos bundled with scikit-image/scikit-learn, 256 px, so
nothing is downloaded.

    python benchmarks/bench_data.py [--n 2000] [--workers 2] [--batch-size 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from mmssl.data.demo import encode, photo_crops, photo_sources
from mmssl.data.module import ShardDataModule
from mmssl.data.shards import write_shards
from mmssl.data.transforms import mae_view


def make_data(root: Path, n: int, size: int) -> None:
    sources = photo_sources()
    names = sorted(sources)
    samples = []
    for i, (name, crop) in enumerate(photo_crops(sources, n, size, seed=0)):
        data = encode(crop, quality=90)
        path = root / "folder" / name / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        samples.append({"__key__": f"{i:06d}", "jpg": data, "cls": names.index(name)})
    write_shards(samples, root / "shards", "train", maxcount=500)


def images_per_second(loader, warmup: int) -> tuple[float, int]:
    seen, start = 0, None
    for i, batch in enumerate(loader):
        images = batch["image"] if isinstance(batch, dict) else batch[0]["image"]
        if i == warmup - 1:
            start = time.perf_counter()
        elif i >= warmup:
            seen += images.shape[0]
    assert start is not None and seen > 0, "not enough batches after warm-up: raise --n"
    return seen / (time.perf_counter() - start), seen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="number of JPEGs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--source-size", type=int, default=256, help="side of the stored JPEGs")
    parser.add_argument("--shuffle-buffer", type=int, default=2000, help="mmssl sample shuffle buffer")
    parser.add_argument("--warmup", type=int, default=3, help="batches excluded from timing")
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating runs of each loader; median reported"
    )
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="mmssl-bench-"))
    torch.set_num_threads(1)  # the workers do the work; keep the main process from competing for cores
    try:
        t0 = time.perf_counter()
        make_data(root, args.n, args.source_size)
        print(
            f"wrote {args.n} JPEGs ({args.source_size} px) as ImageFolder and shards in {time.perf_counter() - t0:.1f}s"
        )
        view = mae_view(args.img_size)
        dm = ShardDataModule(
            str(root / "shards" / "train-*.tar"),
            train_view=view,
            batch_size=args.batch_size,
            num_workers=args.workers,
            shuffle_buffer=args.shuffle_buffer,
        )
        folder = ImageFolder(str(root / "folder"), transform=view)
        loaders = {
            "mmssl webdataset": lambda: dm.train_dataloader(),
            "torchvision ImageFolder": lambda: DataLoader(
                folder, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
            ),
        }
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(args.repeats):
            for name, make in loaders.items():
                rate, seen = images_per_second(make(), args.warmup)
                rates[name].append(rate)
                print(f"  {name:<24} {rate:8.1f} images/s  ({seen} images timed)")
        med = {name: statistics.median(r) for name, r in rates.items()}
        cores = len(os.sched_getaffinity(0))
        print(
            f"\nbatch {args.batch_size}, {args.workers} workers, {args.img_size} px view, {cores} CPU cores, "
            f"median of {args.repeats}:"
        )
        for name, rate in med.items():
            print(f"  {name:<24} {rate:8.1f} images/s")
        print(f"  ratio mmssl / torchvision: {med['mmssl webdataset'] / med['torchvision ImageFolder']:.2f}")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
