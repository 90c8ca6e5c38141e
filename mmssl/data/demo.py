"""Demo data sets made from real images that ship inside installed packages: nothing is downloaded.

* ``photos``: random crops (96x96 JPEG, varied scale) of the photographs bundled with scikit-image and
  scikit-learn. Split by *source image*: the val crops come from whole images never seen in training, so a
  validation loss or reconstruction there is measured on held-out pictures, not on overlapping crops.
* ``digits``: scikit-learn's 1797 real 8x8 handwritten digits (UCI optdigits) upsampled to 32x32 with
  ``.cls`` labels, stratified 70/30 split; enough for linear-probe and kNN tests that must beat chance.
* ``shapes``: generated pictures of coloured shapes with captions, class ids and question-answer turns
  (``data/shapes.py``); splits ``train``/``val`` and ``heldout`` (colour-shape pairs never in train).
  Stored as 8-bit grayscale PNG: lossless (JPEG's ringing would be large relative to 8x8 sources), a few
  hundred bytes each, and it exercises the decoder's L -> RGB path.

Sets are written once as shards under ``$MMSSL_DATA`` (default ``~/.cache/mmssl``) in a versioned folder;
generation takes a few seconds and is deterministic (same bytes on every machine with the same library
versions). It is written to a temporary folder that is renamed into place, so DDP ranks may call
``ensure_demo`` concurrently: one rename wins, the others discard their copy.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from mmssl.data import shapes
from mmssl.data.shards import read_manifest, write_shards

VERSION = 1
SETS = ("photos", "digits", "shapes")

# Real photographs only (skimage's synthetic images and ``cat``, an alias of ``chelsea``, are left out).
# Several skimage images need ``pooch`` to download; those are skipped if they fail to load.
PHOTO_SOURCES = (
    "astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "china",
    "camera", "brick", "grass", "gravel", "moon", "clock", "page", "text", "cell",
    "coffee", "flower", "coins",
)  # fmt: skip
PHOTO_VAL_SOURCES = ("coffee", "flower", "coins")  # held out whole: two colour, one grey
PHOTO_TRAIN_CROPS = 4000
PHOTO_VAL_CROPS = 510
PHOTO_SIZE = 96


def default_root() -> Path:
    return Path(os.environ.get("MMSSL_DATA") or Path.home() / ".cache" / "mmssl")


def photo_sources(names: tuple[str, ...] = PHOTO_SOURCES) -> dict[str, np.ndarray]:
    """Name -> uint8 array (H, W) or (H, W, 3) for the bundled photos that load offline."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sklearn_images = dict(zip(("china", "flower"), load_sample_images().images, strict=True))
    out = {}
    for name in names:
        if name in sklearn_images:
            out[name] = sklearn_images[name]
            continue
        try:
            out[name] = np.asarray(getattr(skimage.data, name)())
        except Exception:  # pooch-backed images raise ModuleNotFoundError/ValueError offline
            continue
    return out


def photo_crops(
    sources: dict[str, np.ndarray], n: int, size: int, seed: int, levels: int = 8, max_side: int = 512
) -> Iterator[tuple[str, Image.Image]]:
    """``n`` random ``size`` x ``size`` crops at varied scale, sources interleaved; deterministic in ``seed``.

    Each source is resized once to a pyramid of ``levels`` scales (shorter side from ``size`` to
    ``max_side``) and crops are cut from a random level without resampling: a crop covers between all and
    ``size / max_side`` of the shorter side. Per-crop PIL resizing was several times slower on small CPUs.
    """
    names = sorted(sources)
    pyramids = {}
    for name in names:
        img = Image.fromarray(sources[name])
        short = min(img.size)
        sides = np.geomspace(size, max(size, min(short, max_side)), levels)
        pyramids[name] = [
            img.resize(
                (max(size, round(img.width * s / short)), max(size, round(img.height * s / short))),
                Image.Resampling.LANCZOS,
                reducing_gap=3.0,
            )
            for s in sides
        ]
    rng = np.random.default_rng(seed)
    # Interleave sources so that every shard mixes images, as a shuffled real data set would.
    for src in rng.permutation(np.arange(n) % len(names)):
        level = pyramids[names[src]][int(rng.integers(levels))]
        x, y = int(rng.integers(0, level.width - size + 1)), int(rng.integers(0, level.height - size + 1))
        yield names[src], level.crop((x, y, x + size, y + size))


def encode(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo_samples(sources: dict[str, np.ndarray], n: int, seed: int, split: str) -> Iterator[dict]:
    for i, (_, crop) in enumerate(photo_crops(sources, n, PHOTO_SIZE, seed)):
        yield {"__key__": f"{split}_{i:06d}", "jpg": encode(crop, quality=90)}


def _write_photos(out: Path) -> None:
    sources = photo_sources()
    val = {k: v for k, v in sources.items() if k in PHOTO_VAL_SOURCES}
    train = {k: v for k, v in sources.items() if k not in PHOTO_VAL_SOURCES}
    if not val or not train:
        raise RuntimeError(f"too few bundled photos could be loaded: {sorted(sources)}")
    for split, srcs, n, maxcount, seed in (
        ("train", train, PHOTO_TRAIN_CROPS, 1500, 0),  # 1500 + 1500 + 1000: unequal shards on purpose
        ("val", val, PHOTO_VAL_CROPS, 400, 1),  # 400 + 110
    ):
        info = {"sources": sorted(srcs), "size": PHOTO_SIZE, "seed": seed}
        write_shards(_photo_samples(srcs, n, seed, split), out, split, maxcount=maxcount, total=n, info=info)


def _write_digits(out: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255, (N, 8, 8)
    index = np.arange(len(pixels))
    train_idx, val_idx = train_test_split(index, test_size=0.3, stratify=digits.target, random_state=0)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        samples = (
            {
                "__key__": f"digit_{i:04d}",  # index into load_digits(), so a sample can be traced back
                "png": encode(
                    Image.fromarray(pixels[i], "L").resize((32, 32), Image.Resampling.BILINEAR), "PNG"
                ),
                "cls": int(digits.target[i]),
            }
            for i in idx
        )
        info = {"source": "sklearn.datasets.load_digits", "size": 32, "split_seed": 0, "stratified": True}
        write_shards(samples, out, split, maxcount=500, total=len(idx), info=info)


def _write_shapes(out: Path) -> None:
    for split, n, seed in (("train", 6000, 0), ("val", 600, 1), ("heldout", 600, 2)):
        rows = shapes.samples(split, n, seed)
        samples = (
            {"__key__": key, "jpg": encode(img, quality=95), "txt": caption, "cls": cls, "json": meta}
            for key, img, caption, cls, meta in rows
        )
        info = {
            "classes": list(shapes.CLASSES),
            "held_out": [" ".join(c) for c in shapes.HELD_OUT],
            "seed": seed,
        }
        write_shards(samples, out, split, maxcount=2000, total=n, info=info)


_WRITERS = {"photos": _write_photos, "digits": _write_digits, "shapes": _write_shapes}


def ensure_demo(name: str, root: str | Path | None = None) -> Path:
    """Generate demo set ``name`` under ``root`` unless present; return its folder."""
    if name not in _WRITERS:
        raise ValueError(f"unknown demo set {name!r}; available: {', '.join(SETS)}")
    base = Path(root) if root is not None else default_root()
    final = base / "demo" / f"{name}-v{VERSION}"
    if (final / "manifest.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}-tmp-"))
    try:
        _WRITERS[name](tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(spec: str, root: str | Path | None = None) -> str:
    """``"demo:photos/train"`` -> ``"<dir>/train-{000000..000002}.tar"`` (generating the set if needed)."""
    body = spec.removeprefix("demo:")
    name, _, split = body.partition("/")
    folder = ensure_demo(name, root)
    splits = read_manifest(folder).get("splits", {})
    if split not in splits:
        raise ValueError(
            f"demo spec {spec!r}: split must be one of {sorted(splits)} (e.g. 'demo:{name}/train')"
        )
    n = splits[split]["shards"]
    return (
        str(folder / f"{split}-{{{0:06d}..{n - 1:06d}}}.tar")
        if n > 1
        else str(folder / f"{split}-000000.tar")
    )
