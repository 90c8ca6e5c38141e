"""Fit an iGPT colour palette: mini-batch k-means on pixels sampled from shards (Chen et al. 2020,
§"Context Reduction": k-means with k = 512 on (R, G, B) pixel values).

    python tools/fit_palette.py --shards demo:digits/train --k 16 --resolution 16    # runs/palettes/k16_16px.safetensors
    python tools/fit_palette.py --shards '/data/in1k/train-{000000..001023}.tar' --out runs/palettes/in1k_512.safetensors \\
        --images 50000 --val-shards '/data/in1k/val-{000000..000049}.tar'

Images go through the iGPT evaluation view first (shorter side to ``--resolution``, centre crop), so the
palette is fitted on the low-resolution pixels the model will see. Pixels are drawn at random from each
image; shards are read in a shuffled order, so ``--images`` can stop early on a large set. The file is
safetensors (centres in sRGB [0, 1] and string metadata: k, colour space, shards, images, pixels, resolution,
seed, round-trip RMSE). Prints the round-trip error on the fitted pixels, and on ``--val-shards`` if given.
"""

from __future__ import annotations

import argparse
import random
import sys

from mmssl.cli import is_program


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="webdataset spec or demo:NAME/SPLIT")
    p.add_argument(
        "--out",
        help="palette file to write (.safetensors); default runs/palettes/k<K>_<resolution>px.safetensors "
        "(runs/ is where every run's output goes, outside version control)",
    )
    p.add_argument("--k", type=int, default=512, help="colours (the paper's 9-bit palette: 512)")
    p.add_argument("--resolution", type=int, default=32, help="images are downsampled to this first")
    p.add_argument("--images", type=int, default=20_000, help="read at most this many images")
    p.add_argument("--pixels-per-image", type=int, default=64)
    p.add_argument("--iters", type=int, default=300, help="mini-batch k-means iterations")
    p.add_argument("--batch-size", type=int, default=8192, help="pixels per k-means mini-batch")
    p.add_argument("--val-shards", help="report the round-trip error on these images too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interpolation", default="bicubic")
    return p.parse_args(argv)


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    parse_args(None)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mmssl.data.module import resolve_shards  # noqa: E402
from mmssl.data.shards import SampleDecoder, count_samples, eval_pipeline  # noqa: E402
from mmssl.data.transforms import eval_view  # noqa: E402
from mmssl.targets.palette import Palette, fit_kmeans, inertia  # noqa: E402


def sample_pixels(
    spec: str, key: str, resolution: int, images: int, per_image: int, seed: int, interpolation: str
) -> tuple[torch.Tensor, int]:
    """(N, 3) pixels in [0, 1] drawn from up to ``images`` low-resolution images; returns (pixels, images)."""
    urls = resolve_shards(spec, key)
    random.Random(seed).shuffle(urls)
    view = eval_view(resolution, crop_pct=1.0, interpolation=interpolation, mean=(0, 0, 0), std=(1, 1, 1))
    pipeline = eval_pipeline(urls, view, 256, rank=0, world_size=1, decoder=SampleDecoder(label_key=None))
    g = torch.Generator().manual_seed(seed)
    chunks, seen = [], 0
    total = min(images, count_samples(urls) or images)
    with tqdm(total=total, desc=f"reading {key}", unit="img") as bar:
        for batch in pipeline:
            x = batch["image"][: images - seen]  # (B, 3, R, R)
            pixels = x.permute(0, 2, 3, 1).reshape(len(x), -1, 3)  # (B, R*R, 3)
            pick = torch.randint(pixels.shape[1], (len(x), min(per_image, pixels.shape[1])), generator=g)
            chunks.append(torch.gather(pixels, 1, pick.unsqueeze(-1).expand(-1, -1, 3)).reshape(-1, 3))
            seen += len(x)
            bar.update(len(x))
            if seen >= images:
                break
    if not chunks:
        raise ValueError(f"{key}={spec!r}: no image could be read")
    return torch.cat(chunks), seen


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = a.out or f"runs/palettes/k{a.k}_{a.resolution}px.safetensors"
    try:
        pixels, n_images = sample_pixels(
            a.shards, "--shards", a.resolution, a.images, a.pixels_per_image, a.seed, a.interpolation
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(pixels) < a.k:
        print(f"error: only {len(pixels)} pixels sampled, fewer than --k {a.k}", file=sys.stderr)
        return 2
    centroids = fit_kmeans(pixels, a.k, a.iters, a.batch_size, a.seed)
    rmse = inertia(pixels, centroids) ** 0.5 / 3**0.5  # per channel, in [0, 1] units
    report = {"fitted pixels": rmse}
    if a.val_shards:
        val, _ = sample_pixels(
            a.val_shards, "--val-shards", a.resolution, a.images, a.pixels_per_image, a.seed, a.interpolation
        )
        report["val pixels"] = inertia(val, centroids) ** 0.5 / 3**0.5
    path = Palette(centroids).save(
        out, fitted_on=a.shards, images=n_images, pixels=len(pixels), resolution=a.resolution,
        seed=a.seed, iters=a.iters, rmse=f"{rmse:.5f}",
    )  # fmt: skip
    errors = ", ".join(f"{k} {v:.4f} ({v * 255:.2f}/255)" for k, v in report.items())
    print(f"palette of {a.k} colours from {len(pixels):,} pixels of {n_images:,} images -> {path}")
    print(f"round-trip RMSE per channel: {errors}")
    print(f"use it: tools/pretrain.py ... igpt.palette={path} igpt.num_colors={a.k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
