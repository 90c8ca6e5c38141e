"""Input-pipeline throughput on realistic JPEGs: mmssl's webdataset train loader vs torchvision ImageFolder + PIL,
with JPEG decoding alone as the ceiling.

Two kinds of data, both made of real photographs (the ones bundled with scikit-image / scikit-learn, nothing
is downloaded) saved as JPEG quality 90 (``realistic_jpegs``):

* ImageNet-like: 500 x 375 (or 375 x 500), ImageNet's typical size, crops of one photo near its own scale;
* web-like: long side 1024-2048 px, aspect 1:1 to 16:9, as in web-crawled image-text sets (mosaics of photo
  crops near their own scale: no bundled photo is that large, and an enlarged one decodes unrealistically fast).

Each loader runs MAE's training view (RandomResizedCrop(224, scale=(0.2, 1)), bicubic, flip, normalise):
mmssl's ``mae_view`` through ``ShardDataModule`` (shards holding the same JPEG bytes), and MAE's own
``main_pretrain.py`` pipeline (torchvision v1 transforms on ``ImageFolder``'s PIL loader). mmssl's training
loader, as built for training (``normalize_on_device=True``), hands over uint8 batches and normalises them on
the training device; "mmssl, normalised on CPU" also does that cast and normalisation in this process (what a
CPU-only run pays). Reported per kind, in images/s per core:

* with ``--workers`` DataLoader workers (wall clock / workers; warm-up batches excluded), and
* in one process (no workers), per CPU-second of the process: the steadier measure on a shared machine;
* decoding alone (``Image.open(...).convert("RGB")`` on the bytes in memory), per CPU-second.

    python benchmarks/bench_data.py                    # 1000 ImageNet-like + 240 web-like JPEGs, 2 workers
    python benchmarks/bench_data.py --quick
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as v1
from common import Ratio, machine_line
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg

from mmssl.data.demo import photo_sources
from mmssl.data.module import ShardDataModule
from mmssl.data.shards import write_shards
from mmssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, mae_view

QUICK = ["--imagenet", "256", "--web", "64", "--repeats", "1", "--batch-size", "16"]


def realistic_jpegs(kind: str, n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` (source name, JPEG bytes) at quality 90, built from real photos without upsampling them much, so
    that the files hold a photo's detail (and cost a photo's decoding time), not a blurred enlargement:

    * ImageNet-like: 500x375 (a quarter portrait), a crop of one colour source at 0.8-1.25x its own scale
      (capped by the source's size; 45-46 kB at quality 90 as measured, smaller than ImageNet's ~110 kB average,
      so decoding is cheaper and the fixed resize cost weighs more than on ImageNet);
    * web-like: long side 1024-2048 px, aspect 1:1 to 16:9, a mosaic of crops of several sources at
      0.8-1.25x their own scale (no bundled photo is that large).
    """
    # colour photos only (ImageNet and web images are nearly all colour; a grey source saved as RGB JPEG has
    # flat chroma and decodes unrealistically fast)
    sources = {k: Image.fromarray(v) for k, v in photo_sources().items() if v.ndim == 3 and v.shape[2] == 3}
    names = sorted(sources)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if kind == "imagenet":
            w, h = 500, 375
        else:
            long, aspect = int(rng.integers(1024, 2049)), float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9]))
            w, h = long, round(long / aspect)
        if rng.random() < 0.25:  # a quarter portrait
            w, h = h, w
        name = names[i % len(names)]
        if kind == "imagenet":  # near the photo's own scale: a downscaled crop would be too smooth
            img = _crop_resized(sources[name], w, h, rng, scale=rng.uniform(0.8, 1.25))
        else:
            img = Image.new("RGB", (w, h))
            tile = int(rng.integers(384, 641))  # mosaic cells of a few hundred pixels
            for y in range(0, h, tile):
                for x in range(0, w, tile):
                    src = sources[names[int(rng.integers(len(names)))]]
                    scale = rng.uniform(0.8, 1.25)
                    cell = _crop_resized(src, tile, tile, rng, scale=scale)
                    img.paste(cell, (x, y))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append((name, buf.getvalue()))
    return out


def _crop_resized(
    src: Image.Image, w: int, h: int, rng, min_fraction: float = 0.6, scale: float | None = None
) -> Image.Image:
    """A w x h picture from a crop of ``src`` with that aspect: ``scale`` source pixels per output pixel
    (capped by the source), else a crop between ``min_fraction`` of the output size and the largest one."""
    largest = min(src.width, src.height * w / h)  # crop width
    if scale is not None:
        cw = min(largest, w * scale)
    else:
        cw = rng.uniform(min(largest, w * min_fraction), largest)
    ch = cw * h / w
    x, y = rng.uniform(0, src.width - cw), rng.uniform(0, src.height - ch)
    return src.resize((w, h), Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))


def write_sets(root: Path, jpegs: list[tuple[str, bytes]]) -> None:
    """The same bytes as an ImageFolder (class = source photo) and as shards."""
    names = sorted({name for name, _ in jpegs})
    samples = []
    for i, (name, data) in enumerate(jpegs):
        path = root / "folder" / name / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        samples.append({"__key__": f"{i:06d}", "jpg": data, "cls": names.index(name)})
    write_shards(samples, root / "shards", "train", maxcount=500)


def mae_reference_transform(img_size: int) -> v1.Compose:
    """facebookresearch/mae main_pretrain.py's transform_train."""
    return v1.Compose(
        [
            v1.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=v1.InterpolationMode.BICUBIC),
            v1.RandomHorizontalFlip(),
            v1.ToTensor(),
            v1.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def rate(loader, warmup: int, transform=None) -> tuple[float, float]:
    """(images per wall-second, images per CPU-second of this process) after ``warmup`` batches; ``transform``
    is applied to every batch here (the deferred normalisation)."""
    seen, start = 0, None
    for i, batch in enumerate(loader):
        batch = transform(batch) if transform is not None else batch
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        if i == warmup - 1:
            start = time.perf_counter(), time.process_time()
        elif i >= warmup:
            seen += images.shape[0]
    assert start is not None and seen > 0, "not enough batches after warm-up: raise --imagenet / --web"
    return seen / (time.perf_counter() - start[0]), seen / max(time.process_time() - start[1], 1e-9)


def decode_rate(jpegs: list[tuple[str, bytes]], torchvision: bool = False) -> float:
    """Full-size decodes per CPU-second: PIL (the ceiling the acceptance names), or torchvision's
    ``decode_jpeg`` into a tensor (what ``mae_view`` uses for crops that need the full size)."""
    start = time.process_time()
    for _, data in jpegs:
        if torchvision:
            decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        else:
            Image.open(io.BytesIO(data)).convert("RGB")
    return len(jpegs) / (time.process_time() - start)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenet", type=int, default=1000, help="ImageNet-like JPEGs (0: skip)")
    p.add_argument("--web", type=int, default=240, help="web-like JPEGs (0: skip)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2, help="batches excluded from timing")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each loader; median reported")
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    return p.parse_args(argv)


def measure(argv: list[str] | None = None) -> list[Ratio]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the loaders' work is per image; one thread everywhere, as in the workers
    print(machine_line())
    print(
        f"MAE view {args.img_size} px, batch {args.batch_size}, {args.workers} workers; images/s per core "
        f"(wall-clock rate / workers, or images per CPU-second in one process)"
    )
    results = []
    for kind, n in (("imagenet", args.imagenet), ("web", args.web)):
        if not n:
            continue
        root = (args.dir / kind) if args.dir else Path(tempfile.mkdtemp(prefix=f"mmssl-bench-{kind}-"))
        try:
            results += _measure_kind(kind, n, root, args)
        finally:
            if args.dir is None:
                shutil.rmtree(root, ignore_errors=True)
    return results


def _measure_kind(kind: str, n: int, root: Path, args: argparse.Namespace) -> list[Ratio]:
    start = time.perf_counter()
    jpegs = realistic_jpegs(kind, n)
    if not (root / "shards").is_dir():
        write_sets(root, jpegs)
    sizes = np.array([Image.open(io.BytesIO(d)).size for _, d in jpegs])
    print(
        f"\n{kind}-like: {n} JPEGs, mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} px, "
        f"{np.mean([len(d) for _, d in jpegs]) / 1e3:.0f} kB (made in {time.perf_counter() - start:.0f} s)"
    )
    folder = ImageFolder(str(root / "folder"), transform=mae_reference_transform(args.img_size))

    # Each worker's shuffle buffer reads two samples per sample it yields until it is full (wds.shuffle), a
    # start-up cost that a training epoch of millions of samples amortises but a run of a few hundred does not
    # (a 500-sample buffer over 800 images read 1.5 tar members per image): a small buffer, and its filling
    # counted as warm-up.
    buffer = max(4, min(n // 8, 500))

    def mmssl(workers: int, cpu_normalize: bool = False):
        dm = ShardDataModule(
            str(root / "shards" / "train-*.tar"), train_view=mae_view(args.img_size),
            batch_size=args.batch_size, num_workers=workers, shuffle_buffer=buffer, normalize_on_device=True,
        )  # fmt: skip
        filling = math.ceil(0.8 * buffer * max(workers, 1) / args.batch_size)  # wds.shuffle starts at 1/5
        return dm.train_dataloader(), args.warmup + filling, dm.batch_transform if cpu_normalize else None

    def mmssl_cpu(workers: int):
        return mmssl(workers, cpu_normalize=True)

    def imagefolder(workers: int):
        loader = DataLoader(folder, args.batch_size, shuffle=True, num_workers=workers, drop_last=True)
        return loader, args.warmup, None

    loaders = {"mmssl": mmssl, "mmssl, normalised on CPU": mmssl_cpu, "ImageFolder + PIL": imagefolder}
    wall: dict[str, list[float]] = {name: [] for name in loaders}
    cpu: dict[str, list[float]] = {name: [] for name in loaders}
    decode, tv_decode = [], []
    for _ in range(args.repeats):
        for name, make in loaders.items():
            wall[name].append(rate(*make(args.workers))[0] / max(args.workers, 1))
            cpu[name].append(rate(*make(0))[1])
        decode.append(decode_rate(jpegs))
        tv_decode.append(decode_rate(jpegs, torchvision=True))
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ceiling = statistics.median(decode)
    for name in loaders:
        print(
            f"  {name:26s} {med_wall[name]:7.1f} img/s per core with {args.workers} workers, "
            f"{med_cpu[name]:7.1f} img/CPU-s in one process"
        )
    print(f"  {'decode only':26s} {ceiling:7.1f} img/CPU-s (PIL, full size)")
    print(
        f"  {'decode only, torchvision':26s} {statistics.median(tv_decode):7.1f} img/CPU-s (the decoder mmssl uses)"
    )
    peer = "ImageFolder + PIL"
    rows = []
    for name, label in (("mmssl", ""), ("mmssl, normalised on CPU", ", normalised on CPU")):
        r_wall, r_cpu = med_wall[name] / med_wall[peer], med_cpu[name] / med_cpu[peer]
        print(
            f"  ratio {name} / ImageFolder: {r_wall:.2f}x ({args.workers} workers), {r_cpu:.2f}x (per CPU-s); "
            f"/ decode only: {med_cpu[name] / ceiling:.0%} (per CPU-s)"
        )
        rows += [
            Ratio.of_rates("data loader", f"{kind}-like, {args.workers} workers{label}", "-", med_wall[name],
                           med_wall[peer], "img/s/core", peer),
            Ratio.of_rates("data loader", f"{kind}-like, per CPU-s{label}", "-", med_cpu[name], med_cpu[peer],
                           "img/CPU-s", peer),
            Ratio.of_rates("data loader", f"{kind}-like, vs decode only{label}", "-", med_cpu[name], ceiling,
                           "img/CPU-s", "PIL decode only"),
        ]  # fmt: skip
    return rows


if __name__ == "__main__":
    measure()
