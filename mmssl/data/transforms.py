"""Per-method image views: ``PIL.Image -> dict[str, Tensor]``.

Each view reproduces the augmentation of the paper's reference code with its defaults, and returns a dict
so that methods needing several views (SimCLR's ``view1``/``view2``) fit the same batch contract as
single-view methods (``image``). Views run inside DataLoader workers, which may be started with ``spawn``,
so they are built from picklable pieces (torchvision transforms and small module-level classes), never
lambdas or closures.

Keep this a flat list of small functions, one per method, below the few shared pieces (RGB conversion,
the picklable view wrappers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

View = Callable[[Image.Image], dict[str, torch.Tensor]]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited on white (what a viewer would show)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        # PIL's own I;16 -> L conversion clips at 255 instead of rescaling, turning 16-bit images white.
        arr = np.asarray(img, dtype=np.float32)
        peak = float(arr.max(initial=0.0))
        if mode.startswith("I;16") or peak > 255:
            arr = arr / 257.0
        elif mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


class ImageView:
    """Apply one transform and name the result ``key`` (picklable, unlike a lambda)."""

    def __init__(self, transform: Callable, key: str = "image") -> None:
        self.transform = transform
        self.key = key

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {self.key: self.transform(img)}

    def __repr__(self) -> str:
        return f"ImageView(key={self.key!r}, transform={self.transform})"


class ApplyView:
    """Decoded sample ``{"image", "label"?, "text"?, "json"?}`` -> view outputs + label + ``text_fn(text)``
    + json (passed through; batches carry it as a list)."""

    def __init__(self, view: Callable, text_fn: Callable | None = None) -> None:
        self.view, self.text_fn = view, text_fn

    def __call__(self, sample: dict) -> dict:
        out = dict(self.view(sample["image"]))
        if "label" in sample:
            out["label"] = sample["label"]
        if "text" in sample:
            out["text"] = self.text_fn(sample["text"]) if self.text_fn is not None else sample["text"]
        if "json" in sample:
            out["json"] = sample["json"]
        return out


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    # Equivalent of the classic ToTensor + Normalize: uint8 HWC -> float CHW in [0, 1] -> standardized.
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(mean), std=list(std))]


def mae_view(
    img_size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    interpolation: str = "bicubic",
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> View:
    """MAE pretraining view (He et al. 2022; facebookresearch/mae ``main_pretrain.py``).

    ``RandomResizedCrop(scale=(0.2, 1.0), interpolation=3)`` + horizontal flip, nothing else: the paper
    (Sec. 4, "Data augmentation") finds MAE works with cropping only, colour jitter hurts.
    The crop runs on the PIL image, as in the reference, so the resize is PIL's antialiased one.
    """
    return ImageView(
        T.Compose(
            [
                T.RandomResizedCrop(
                    img_size,
                    scale=tuple(scale),
                    interpolation=T.InterpolationMode(interpolation),
                    antialias=True,
                ),
                T.RandomHorizontalFlip(hflip),
                *_to_normalized_tensor(mean, std),
            ]
        )
    )


def eval_view(
    img_size: int,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> View:
    """Deterministic evaluation view: resize the shorter side to ``img_size / crop_pct``, centre crop.

    This is the standard ImageNet eval transform (256 -> 224 at ``crop_pct=0.875``) used by MAE's linear probe
    and timm's ``transforms_factory`` (which floors the scaled size the same way).
    """
    return ImageView(
        T.Compose(
            [
                T.Resize(
                    math.floor(img_size / crop_pct),
                    interpolation=T.InterpolationMode(interpolation),
                    antialias=True,
                ),
                T.CenterCrop(img_size),
                *_to_normalized_tensor(mean, std),
            ]
        )
    )


def igpt_view(
    resolution: int,
    resize_range: tuple[float, float] = (256 / 224, 384 / 224),
    interpolation: str = "bicubic",
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
) -> View:
    """iGPT pretraining view (Chen et al. 2020, §"Dataset and Data Augmentation"): the shorter side is resized
    to a random length in [256, 384], a random 224 x 224 crop is taken and downsampled to the input
    resolution (32 x 32 for iGPT-S). Here the crop is cut at the target resolution directly (shorter side to
    ``resolution`` x U[256/224, 384/224], random ``resolution`` crop): the same crop geometry with one
    antialiased resize instead of two. No flip, no colour change (the palette quantises the colours).

    ``mean``/``std`` default to none at all (pixels in [0, 1]); the iGPT objective undoes whatever is used
    before quantising. Evaluation: ``eval_view(resolution, crop_pct=1.0)`` (shorter side to the resolution,
    centre crop), as the paper's "shorter side 224, centre 224 crop" before downsampling.
    """
    lo, hi = resize_range
    if not 1.0 <= lo <= hi:
        raise ValueError(f"resize_range must satisfy 1 <= min <= max (the crop must fit), got {resize_range}")
    return ImageView(
        T.Compose(
            [
                T.RandomResize(
                    round(resolution * lo),
                    round(resolution * hi) + 1,  # max_size is exclusive
                    interpolation=T.InterpolationMode(interpolation),
                    antialias=True,
                ),
                T.RandomCrop(resolution),
                *_to_normalized_tensor(mean, std),
            ]
        )
    )
