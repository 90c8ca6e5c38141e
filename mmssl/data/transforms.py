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

import io
import math
import struct
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.nn.functional import interpolate
from torchvision.io import ImageReadMode, decode_jpeg

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

    @property
    def decodes(self) -> bool:
        """Whether the view decodes the image itself (it starts with a ScaledRandomResizedCrop), so that
        the pipeline may hand it an undecoded JPEG (``SampleDecoder(..., lazy=True)``)."""
        first = self.transform.transforms[0] if isinstance(self.transform, T.Compose) else self.transform
        return isinstance(first, ScaledRandomResizedCrop)

    def __repr__(self) -> str:
        return f"ImageView(key={self.key!r}, transform={self.transform})"


class ApplyView:
    """Decoded sample ``{"image", "label"?, "caption"?, "json"?, "has_image"?}`` -> view outputs + label +
    caption (a string; batches carry a list) + ``tokens = text_fn(caption)`` when a ``text_fn`` is given + json
    (passed through; batches carry it as a list) + has_image. Keys as declared in objectives/base.py."""

    def __init__(self, view: Callable, text_fn: Callable | None = None) -> None:
        self.view, self.text_fn = view, text_fn

    def __call__(self, sample: dict) -> dict:
        out = dict(self.view(sample["image"]))
        if "label" in sample:
            out["label"] = sample["label"]
        if "caption" in sample:
            out["caption"] = sample["caption"]
            if self.text_fn is not None:
                out["tokens"] = self.text_fn(sample["caption"])
        if "json" in sample:
            out["json"] = sample["json"]
        if "has_image" in sample:
            out["has_image"] = sample["has_image"]
        return out


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    # Equivalent of the classic ToTensor + Normalize: uint8 HWC -> float CHW in [0, 1] -> standardized.
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(mean), std=list(std))]


class DecodeError(Exception):
    """A lazily opened image failed to decode inside a view (the pipeline skips and counts the sample)."""


def load_rgb(img: Image.Image, reduce: int = 1) -> tuple[Image.Image, float]:
    """Decode an image opened lazily (a no-op once loaded) -> (RGB image, original pixels per decoded pixel).

    A JPEG is decoded at 1/2, 1/4 or 1/8 of its size when ``reduce`` allows it: libjpeg's DCT-domain scaling
    (PIL's ``draft``) skips most of the decoding work instead of resampling afterwards.
    """
    scale = 1.0
    try:
        if reduce > 1 and img.format == "JPEG" and img.tile:  # a tile list: not decoded yet
            width = img.width
            drafted = img.draft(img.mode, (max(1, img.width // reduce), max(1, img.height // reduce)))
            if drafted is not None:  # (mode, the whole original image as a box in decoded pixels)
                scale = width / drafted[1][2]
        img.load()
        return to_rgb(img), scale
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise DecodeError(f"{type(exn).__name__}: {exn}") from exn


# Start-of-frame markers: SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC), as in PIL's JpegImagePlugin.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's start-of-frame marker, reading a few bytes per marker segment
    (1 us instead of PIL's 15 us ``Image.open``); ``None`` when the bytes do not start like a JPEG or no frame
    header is found before the scan (PIL then opens the file, and reports it if it is corrupt)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 10 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            i += 2
        elif marker in _SOF:
            _, height, width, components = struct.unpack_from(">BHHB", data, i + 4)
            return (width, height, components) if width and height else None
        elif marker in (0xD8, 0xD9, 0xDA):  # SOI, EOI or a scan before any frame header
            return None
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


class EncodedJpeg:
    """A colour (3-component) JPEG still encoded, with its size read from the frame header (``jpeg_header``):
    what ``SampleDecoder(lazy=True)`` hands a view that decodes the picture itself (``ScaledRandomResizedCrop``).
    ``open()`` gives the PIL image (undecoded) for the paths that decode with PIL."""

    format = "JPEG"
    mode = "RGB"

    def __init__(self, data: bytes, width: int, height: int) -> None:
        self.data, self.width, self.height = data, width, height

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def open(self) -> Image.Image:
        try:
            return Image.open(io.BytesIO(self.data))
        except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
            raise DecodeError(f"{type(exn).__name__}: {exn}") from exn

    def __repr__(self) -> str:
        return f"EncodedJpeg({self.width}x{self.height}, {len(self.data)} bytes)"


def jpeg_to_tensor(img: Image.Image | EncodedJpeg) -> torch.Tensor | None:
    """An undecoded RGB JPEG in memory (an ``EncodedJpeg``, or a PIL image opened from bytes and not loaded) ->
    (3, H, W) uint8 tensor (channels-last in memory), decoded by torchvision's libjpeg-turbo straight into the
    tensor; ``None`` for anything else (already decoded, grey, CMYK, a file on disk) and for bytes libjpeg
    refuses, which ``load_rgb`` then decodes or reports.

    The pixels are PIL's (both are libjpeg-turbo with its default IDCT and upsampling), but PIL decodes into
    its own 4-bytes-per-pixel buffer that ``pil_to_tensor`` then copies: on a 500x375 photo 0.55 + 0.09 ms
    against 0.49 ms here (one core, benchmarks/bench_data.py's ImageNet-like JPEGs). torchvision marks its
    decoders deprecated in favour of TorchCodec (0.29); this is the only call, to swap when that is a dependency.
    """
    if isinstance(img, EncodedJpeg):
        data = img.data
    elif img.format == "JPEG" and img.tile and img.mode == "RGB" and isinstance(img.fp, io.BytesIO):
        data = img.fp.getvalue()
    else:
        return None
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:  # truncated or corrupt
        return None


# The deepest DCT reduction used. At 1/8 libjpeg's scaled IDCT is sharper than torchvision's antialiased bicubic
# and the crop drifts from the reference by more than bilinear-vs-bicubic does (astronaut at 1536 px, 112 px
# crops: mean 1.6-2.6, 99th percentile 12-19 of 255 vs 2.0 / 12 for bilinear-vs-bicubic); at 1/4 and 1/2 it
# stays well inside (mean 0.7, 99th percentile 4-5). 1/8 would only apply to boxes >= 8x the output side.
MAX_REDUCE = 4


def crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    log_ratio: Sequence[float] | None = None,
) -> tuple[int, int, int, int]:
    """(top, left, height, width): torchvision's ``RandomResizedCrop.get_params`` (v1 and v2 ``make_params``)
    step for step, drawing the same numbers from torch's generator in the same order (float32 uniforms, the
    aspect ratio's exp in float32, ``randint`` for the corner), without its per-call tensor set-up (6 instead of
    17 us). ``log_ratio``: the float32 logs of ``ratio`` as torchvision computes them (pass them to save 3 us)."""
    if log_ratio is None:
        log_ratio = torch.log(torch.tensor(ratio)).tolist()
    area = height * width
    u = torch.empty(1)
    for _ in range(10):
        target_area = area * u.uniform_(scale[0], scale[1]).item()
        aspect_ratio = u.uniform_(log_ratio[0], log_ratio[1]).exp_().item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)))
            left = int(torch.randint(0, width - w + 1, size=(1,)))
            return top, left, h, w
    # torchvision's fallback: the central crop at the nearest allowed aspect ratio
    in_ratio, lo, hi = width / height, min(ratio), max(ratio)
    w, h = width, height
    if in_ratio < lo:
        h = int(round(w / lo))
    elif in_ratio > hi:
        w = int(round(h * hi))
    return (height - h) // 2, (width - w) // 2, h, w


class ScaledRandomResizedCrop:
    """torchvision's ``RandomResizedCrop`` on a PIL image or ``EncodedJpeg`` that may still be undecoded: the
    crop box is drawn first (``crop_box``: torchvision's distribution and the same random numbers), then a
    JPEG is decoded at the largest DCT scale 1/2 or 1/4 that leaves the box at least ``size`` pixels a side
    (only when the box is at least twice the output side), and the box is resized to ``size``.

    ``tensor=False`` returns a PIL image resized by PIL, exactly torchvision's crop when the image is decoded
    in full. ``tensor=True`` returns a (3, size, size) uint8 tensor resized by torch's native uint8
    antialiased kernels (within a grey level or two of PIL's, ~4x faster: 0.2 instead of 0.85 ms for a
    500x375 photo at 224 px, a bigger share of a step than the JPEG decode itself).

    On web-sized photos (1-2k px) most boxes qualify for a reduced decode, which is 2-4x cheaper; an
    ImageNet-sized photo (500x375) never qualifies at 224 px and is decoded in full.
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float],
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        tensor: bool = False,
    ) -> None:
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.interpolation, self.tensor = interpolation, tensor
        self.resample = Image.Resampling[interpolation.upper()]
        self.log_ratio = tuple(torch.log(torch.tensor(self.ratio)).tolist())  # float32, as torchvision's

    def params(self, img: Image.Image | EncodedJpeg) -> tuple[int, int, int, int, int]:
        """(top, left, height, width) of the box in the full image, and the largest decode reduction (1, 2
        or 4) that leaves it at least ``size`` pixels a side. Reads only the image's size."""
        width, height = img.size
        top, left, h, w = crop_box(width, height, self.scale, self.ratio, self.log_ratio)
        reduce = MAX_REDUCE
        while reduce > 1 and min(h, w) < reduce * self.size:
            reduce //= 2
        return top, left, h, w, reduce

    def _resized_crop(self, x: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
        if self.interpolation != "bicubic":
            mode = T.InterpolationMode(self.interpolation)
            return TF.resized_crop(x, top, left, h, w, [self.size, self.size], mode)
        # torchvision's resized_crop for a uint8 CPU tensor and bicubic (crop_image, then resize_image's native
        # uint8 antialiased kernel: the same call and the same pixels) without its dispatch (14 us a picture).
        # The kernel copies a box that is not contiguous channels-last anyway; copied here, and restrided as
        # torchvision's resize_image does for (1, C, H, W) channels-last input (pytorch/pytorch#68430), the
        # output is channels-last too: the kernel then writes its pixels as they come instead of repacking them
        # into planes (0.16 instead of 0.20 ms a 500x375 photo at 224 px; collate keeps the layout).
        box = x[None, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
        box = box.as_strided(box.shape, (box.numel(), *box.stride()[1:]))
        out = interpolate(
            box, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True
        )
        return out[0]

    def __call__(self, img: Image.Image | EncodedJpeg) -> Image.Image | torch.Tensor:
        top, left, h, w, reduce = self.params(img)
        if self.tensor and reduce == 1 and (x := jpeg_to_tensor(img)) is not None:
            return self._resized_crop(x, top, left, h, w)
        if isinstance(img, EncodedJpeg):
            img = img.open()
        img, s = load_rgb(img, reduce)
        if s == 1 and self.tensor:  # (3, H, W) uint8, channels-last in memory: torch's fast uint8 path
            return self._resized_crop(TF.pil_to_tensor(img), top, left, h, w)
        if s == 1:  # crop, then resize: exactly torchvision's resized_crop on PIL images
            return img.crop((left, top, left + w, top + h)).resize((self.size, self.size), self.resample)
        # The box in decoded pixels stays fractional (PIL's resize takes a float box): rounding it to whole
        # decoded pixels shifts the picture by up to half an output pixel (mean error 4-6 grey levels at 1/8).
        # The decoded box is at most 2x the output side here, so PIL's resize is cheap.
        box = (left / s, top / s, (left + w) / s, (top + h) / s)
        out = img.resize((self.size, self.size), self.resample, box=box)
        return TF.pil_to_tensor(out) if self.tensor else out

    def __repr__(self) -> str:
        return (
            f"ScaledRandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"interpolation={self.interpolation}, tensor={self.tensor})"
        )


class HorizontalFlip:
    """Mirror a (..., H, W) tensor with probability ``p``: torchvision's ``RandomHorizontalFlip`` on a tensor, with
    the same draw from torch's generator (``torch.rand(1) < p``), without the v2 dispatch (3 instead of 8 us a
    picture). Picklable."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1) if torch.rand(1) < self.p else x  # a tensor comparison, as torchvision's

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class NormalizeUint8:
    """(..., C, H, W) uint8 -> float32 ``(x / 255 - mean) / std`` in one pass after the cast, on ``x``'s device:
    one picture in a view, or a whole batch (``NormalizeBatch``). Picklable."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale = torch.tensor([1 / (255 * s) for s in std]).view(-1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale = self.shift.to(x.device), self.scale.to(x.device)  # no-ops on the CPU
        # contiguous (C, H, W) planes out, whatever the layout in (channels-last pictures and batches)
        y = x.to(torch.float32, memory_format=torch.contiguous_format)
        return torch.addcmul(shift, y, scale, out=y)

    def __repr__(self) -> str:
        return f"NormalizeUint8(mean={self.mean}, std={self.std})"


class NormalizeBatch:
    """The batch half of a view whose normalisation was deferred (``defer_normalize``): a (B, C, H, W) uint8
    tensor under ``key`` -> float32 normalised, once per batch on the batch's device (the accelerator, in
    ``ShardDataModule.on_after_batch_transfer``). Anything else (e.g. a float validation batch) passes as is."""

    def __init__(self, key: str, normalize: NormalizeUint8) -> None:
        self.key, self.normalize = key, normalize

    def __call__(self, batch: dict) -> dict:
        x = batch.get(self.key)
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            batch = {**batch, self.key: self.normalize(x)}
        return batch

    def __repr__(self) -> str:
        return f"NormalizeBatch(key={self.key!r}, {self.normalize})"


def defer_normalize(view: View) -> tuple[View, NormalizeBatch | None]:
    """Split a view ending in ``NormalizeUint8`` (``mae_view``, ``clip_view``) into the same view without it,
    whose pictures stay uint8 (a quarter of the bytes between processes), and the ``NormalizeBatch`` that makes
    the same tensors from the batch later: per picture the cast and normalisation cost 0.09 ms of a data worker
    (a 224 px crop; the JPEG decode of a 500x375 photo costs 0.5 ms), on an accelerator next to nothing. Any
    other view -> ``(view, None)``."""
    transform = getattr(view, "transform", None)
    if not (isinstance(view, ImageView) and isinstance(transform, T.Compose)):
        return view, None
    *head, last = transform.transforms
    if not (head and isinstance(last, NormalizeUint8)):
        return view, None
    return ImageView(T.Compose(head), view.key), NormalizeBatch(view.key, last)


def random_resized_crop(
    img_size: int, scale: Sequence[float], interpolation: str, tensor: bool = False
) -> ScaledRandomResizedCrop:
    """The crop every pretraining view starts from: area ``scale``, aspect 3/4-4/3, antialiased resize."""
    return ScaledRandomResizedCrop(img_size, scale, interpolation=interpolation, tensor=tensor)


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
    (Sec. 4, "Data augmentation") finds MAE works with cropping only, colour jitter hurts. The crop decodes
    the JPEG at the scale it needs and is resized as uint8 by torch's antialiased bicubic (within a grey
    level or two of the reference's PIL resize; see ``ScaledRandomResizedCrop``), flipped, then normalised.
    """
    return ImageView(
        T.Compose(
            [
                random_resized_crop(img_size, scale, interpolation, tensor=True),
                HorizontalFlip(hflip),
                NormalizeUint8(mean, std),
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


class PadToSquare:
    """Pad the shorter side symmetrically with ``fill`` (an RGB 0-255 tuple) to make a square picture."""

    def __init__(self, fill: tuple[int, int, int]) -> None:
        self.fill = tuple(fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w == h:
            return img
        side = max(w, h)
        out = Image.new(img.mode, (side, side), self.fill)
        out.paste(img, ((side - w) // 2, (side - h) // 2))
        return out

    def __repr__(self) -> str:
        return f"PadToSquare(fill={self.fill})"


LLAVA_ASPECT_RATIOS = ("pad", "crop")


def llava_view(
    img_size: int,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    image_aspect_ratio: str = "crop",
) -> View:
    """LLaVA-1.5 image preparation (llava/train/train.py ``LazySupervisedDataset``), by ``image_aspect_ratio``:

    * ``pad`` (``--image_aspect_ratio pad``, scripts/v1_5/finetune.sh): ``expand2square`` pads the whole
      picture to a square with the mean colour, then the resize; nothing at the borders is lost.
    * ``crop`` (any other value: pretrain.sh leaves the default ``'square'``): the CLIPImageProcessor alone,
      shortest side to ``img_size`` and a centre crop.

    No flip in either (left and right can be answers). The same view serves training and evaluation.
    """
    if image_aspect_ratio not in LLAVA_ASPECT_RATIOS:
        raise ValueError(
            f"llava.image_aspect_ratio: must be one of {LLAVA_ASPECT_RATIOS}, got {image_aspect_ratio!r}"
        )
    resample = T.InterpolationMode(interpolation)
    if image_aspect_ratio == "pad":
        fill = tuple(int(255 * m) for m in mean)  # expand2square's background: int(x * 255), truncated
        geometry = [PadToSquare(fill), T.Resize((img_size, img_size), interpolation=resample, antialias=True)]
    else:
        geometry = [T.Resize(img_size, interpolation=resample, antialias=True), T.CenterCrop(img_size)]
    return ImageView(T.Compose([*geometry, *_to_normalized_tensor(mean, std)]))


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip/constants.py OPENAI_DATASET_MEAN/STD
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_view(
    img_size: int,
    scale: tuple[float, float] = (0.9, 1.0),
    interpolation: str = "bicubic",
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> View:
    """CLIP training view, open_clip's ``image_transform(is_train=True)`` with its default
    ``AugmentationCfg(scale=(0.9, 1.0))``: RandomResizedCrop(scale=(0.9, 1.0), bicubic), nothing else.

    No horizontal flip, as in open_clip: captions name left and right ("a red circle at the top left").
    Evaluation uses ``eval_view(img_size, crop_pct=1.0)`` (open_clip: resize the shorter side, centre crop).
    """
    return ImageView(
        T.Compose(
            [
                random_resized_crop(img_size, scale, interpolation, tensor=True),
                NormalizeUint8(mean, std),
            ]
        )
    )


class CaptionTokens:
    """``text_fn`` for the data workers: caption -> (L,) int64 token ids. open_clip tokenizers map a string to
    (1, L): zero-padded, lower-cased, and an over-long caption is cut to L keeping the end token last (the text
    tower pools there). Empty captions never get here: ``SampleDecoder(require_text=True)`` skips them."""

    def __init__(self, tokenizer: Callable) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer(text)
        return tokens.reshape(-1).long()  # (1, L) -> (L,)


class TwoViews:
    """Two independent draws of one random transform, named ``view1`` and ``view2`` (picklable)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"view1": self.transform(img), "view2": self.transform(img)}

    def __repr__(self) -> str:
        return f"TwoViews({self.transform})"


class UnionView:
    """Several views of the same picture in one dict (a composition's parts, e.g. SLIP: CLIP's ``image`` and
    SimCLR's ``view1``/``view2``); two views that make the same key are refused (picklable)."""

    def __init__(self, views: Sequence[Callable]) -> None:
        self.views = list(views)

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for view in self.views:
            made = view(img)
            clash = sorted(set(made) & set(out))
            if clash:
                raise ValueError(
                    f"views of a composition both make batch key(s) {clash}: compose objectives whose views "
                    f"make different keys ({view})"
                )
            out.update(made)
        return out

    def __repr__(self) -> str:
        return f"UnionView({self.views})"


def simclr_blur_kernel(img_size: int) -> int:
    """Reference ``random_blur``: kernel_size = side // 10, made odd as 2 * (kernel_size // 2) + 1."""
    return 2 * (img_size // 10 // 2) + 1


def simclr_view(
    img_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    interpolation: str = "bicubic",
    hflip: float = 0.5,
    color_jitter: float = 1.0,
    color_p: float = 0.8,
    gray_p: float = 0.2,
    blur_p: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> View:
    """SimCLR's two views (Chen et al. 2020, Appendix A; reference ``data_util.preprocess_for_train``).

    Each view independently: RandomResizedCrop (area 0.08-1, aspect 3/4-4/3, bicubic) + horizontal flip;
    colour jitter of strength s (brightness, contrast, saturation 0.8s, hue 0.2s, in random order) with
    p=0.8; grayscale with p=0.2; Gaussian blur with p=0.5, kernel 10% of the side, sigma in [0.1, 2.0]
    (ImageNet; the paper drops blur on CIFAR: ``blur_p=0``). s = 1 for ImageNet, 0.5 on CIFAR.
    Returns ``{"view1", "view2"}``.
    """
    s = color_jitter
    ops = [
        random_resized_crop(img_size, scale, interpolation),
        T.RandomHorizontalFlip(hflip),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=color_p),
        T.RandomGrayscale(gray_p),
    ]
    # Colour ops are fastest on PIL images, the blur on a uint8 tensor (on PIL it round-trips through one).
    ops.append(T.ToImage())
    kernel = simclr_blur_kernel(img_size)
    if blur_p > 0 and kernel > 1:  # below 20 px the reference kernel is 1 px wide: no blur at all
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
    return TwoViews(T.Compose([*ops, *_to_normalized_tensor(mean, std)]))


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
