"""HOG targets for MaskFeat (Wei et al., "Masked Feature Prediction for Self-Supervised Visual Pre-Training",
CVPR 2022, §3 and §4.1): histograms of oriented gradients of the input image, one per 8x8-pixel cell and colour
channel, laid out per patch in the encoder's patch order.

The computation follows the official implementation, ``HOGLayerC`` in facebookresearch/SlowFast
(``slowfast/models/operators.py``), as MaskFeat builds it for images (``slowfast/models/masked.py``:
``nbins=9, pool=8``): per-channel gradients from 3x3 Sobel filters on the reflect-padded image, magnitude
``hypot(gx, gy)``, *unsigned* orientation ``atan2(gx, gy)`` hard-assigned to ``nbins`` bins over 180 degrees,
magnitudes summed per cell, and each cell's histogram L2-normalised per channel (the paper's "local contrast
normalization", §3, found essential). ``atan2(gx, gy)`` measures the gradient's angle from the *vertical*
axis, which is the edge's own angle: a horizontal edge falls in bin 0, a vertical one in bin ``nbins // 2``.
``skimage.feature.hog`` measures from the horizontal axis (``atan2(g_row, g_col)``), so the two give the same
bins on the transposed image (the parity test uses exactly that).

Where the two public implementations differ: MMPretrain/MMSelfSup's ``HOGGenerator`` (their MaskFeat config)
weights every pixel's magnitude by a 16x16 Gaussian (std 8, normalised to sum 1) tiled over the image;
SlowFast's MaskFeat uses none. ``gaussian_window=0`` (the default) follows SlowFast; ``gaussian_window=16``
reproduces MMPretrain. ``gradient="central"`` swaps Sobel for ``[-1, 0, 1]`` differences, the gradient of
Dalal & Triggs and of scikit-image (used for the parity test; with reflect padding the outermost pixels get a
zero normal gradient, exactly as ``skimage`` sets its border gradient to 0).

The histograms are invariant to a per-channel affine map of the input in exact arithmetic (gradients scale,
the normalisation cancels it), so normalised and [0, 1] images give the same target, with one caveat of hard
binning that the reference shares: a pixel whose gx is exactly 0 (a horizontal edge, frequent in 8-bit images)
sits on the boundary between bin 0 and bin ``nbins - 1``, and rounding after normalisation (gx = +-1e-8 instead
of 0) sends it to either side.

Speed (``benchmarks/bench_hog.py``: ~24-29x ``skimage.feature.hog`` on one thread, 224 px): on CPU the batch
goes through in chunks of one image with preallocated buffers (cache-resident, no page faults), the reflect
padding is written by hand, bins are floor values of one ``atan2`` with the "mod nbins" applied to the summed
histogram rather than per pixel, and one ``scatter_add_`` sums magnitudes into the output layout. Per call,
only the arithmetic is left in the loop: the pixels' histogram offsets are cached per shape, the buffers' views
built once, and the L2 normalisation runs once for the batch (measured ~5 % faster than per chunk: 26-27x
skimage at batch 32). Per image (224 px, 1 thread, ~0.65 ms): gradients ~25 %, atan2 and binning ~25 %,
magnitude ~15 %, scatter-add ~13 %, index ~9 %.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

GRADIENTS = ("sobel", "central")
CHUNK_ELEMENTS = (
    2**18
)  # pixels per chunk in hog(): one 224 px RGB image (measured fastest: 1 plane or 2 images are slower)


def gaussian_kernel(size: int, std: float) -> Tensor:
    """(size, size) Gaussian normalised to sum 1, centred between the middle pixels (SlowFast ``get_gkern``)."""
    n = torch.arange(size, dtype=torch.float64)
    g = torch.exp(-0.5 * ((n - n.mean()) / std) ** 2)
    g2 = torch.outer(g, g)
    return g2 / g2.sum()  # float64; callers cast


def image_gradients(images: Tensor, gradient: str = "sobel") -> tuple[Tensor, Tensor]:
    """(B, C, H, W) -> (gx, gy), each (B, C, H, W): derivatives along columns (x) and rows (y), per channel,
    on the reflect-padded image. Sobel = central difference along one axis, [1, 2, 1] smoothing along the other.
    """
    _check_gradient(gradient)
    gx, gy = torch.empty_like(images), torch.empty_like(images)
    _gradients(
        gradient, images.new_empty(*images.shape[:-2], images.shape[-2] + 2, images.shape[-1] + 2), gx, gy
    )(images)
    return gx, gy


def _check_gradient(gradient: str) -> None:
    if gradient not in GRADIENTS:
        raise ValueError(f"HOG gradient must be one of {GRADIENTS}, got {gradient!r}")


def _gradients(gradient: str, padded: Tensor, gx: Tensor, gy: Tensor) -> Callable[[Tensor], None]:
    """A function writing the gradients of x (..., H, W) into gx and gy through the buffer padded
    (..., H + 2, W + 2) and one scratch buffer: every temporary preallocated and every view of the buffers built
    here once, so that a call costs only the arithmetic (see :func:`hog`)."""
    inner, top, bottom = padded[..., 1:-1, 1:-1], padded[..., 0, 1:-1], padded[..., -1, 1:-1]
    left, right, second, third_last = padded[..., 0], padded[..., -1], padded[..., 2], padded[..., -3]
    *lead, H, W = gx.shape
    if gradient == "central":
        ops = [
            (torch.sub, padded[..., 1:-1, 2:], padded[..., 1:-1, :-2], gx),
            (torch.sub, padded[..., 2:, 1:-1], padded[..., :-2, 1:-1], gy),
        ]
    else:  # [1, 2, 1] down the rows, then the difference across; and the transpose
        scratch = padded.new_empty(padded.numel())
        rows = scratch[: padded[..., 1:-1, :].numel()].view(*lead, H, W + 2)
        cols = scratch[: padded[..., 1:-1].numel()].view(*lead, H + 2, W)
        ops = [
            (torch.add, padded[..., :-2, :], padded[..., 2:, :], rows, padded[..., 1:-1, :]),
            (torch.sub, rows[..., 2:], rows[..., :-2], gx),
            (torch.add, padded[..., :-2], padded[..., 2:], cols, padded[..., 1:-1]),
            (torch.sub, cols[..., 2:, :], cols[..., :-2, :], gy),
        ]

    def run(x: Tensor) -> None:
        inner.copy_(x)  # reflect padding by hand: F.pad's reflect kernel is slower than all of this
        top.copy_(x[..., 1, :])
        bottom.copy_(x[..., -2, :])
        left.copy_(second)
        right.copy_(third_last)
        for op, a, b, out, *twice in ops:
            op(a, b, out=out)
            if twice:
                out.add_(twice[0], alpha=2)

    return run


def hog(
    images: Tensor,
    cell_size: int = 8,
    nbins: int = 9,
    gradient: str = "sobel",
    weight: Tensor | None = None,
    patch_size: int | None = None,
) -> Tensor:
    """(B, C, H, W) -> (B, L, C, nbins, k, k): cell histograms L2-normalised per cell and channel, grouped by
    patches of ``patch_size`` pixels (default: one cell) in raster order, k = patch_size / cell_size a side.

    ``weight`` (H, W), if given, multiplies every pixel's magnitude (the tiled Gaussian). Computed in the
    input's dtype; callers wanting fp32 under autocast use :class:`HOGTarget`.
    """
    B, C, H, W = images.shape
    _check_gradient(gradient)
    patch = patch_size or cell_size
    if patch % cell_size:
        raise ValueError(f"HOG: patch size {patch} is not a multiple of the cell size {cell_size}")
    if H % patch or W % patch:
        raise ValueError(f"HOG: image size {H}x{W} is not a multiple of the patch size {patch}")
    k, L = patch // cell_size, (H // patch) * (W // patch)
    kk, slots = k * k, 2 * nbins + 1  # floor(atan2 / pi * nbins) takes the 2 nbins + 1 values -nbins..nbins
    # On CPU, a few channel planes at a time (one 224 px RGB image; one plane of a large image) through buffers
    # allocated once, so the dozen temporaries stay in cache: whole-batch temporaries (19 MB each at
    # 32 x 3 x 224^2 in fp32) spend more time in page faults and memory traffic than in arithmetic (measured:
    # the whole target ~2x slower). Accelerators take the batch at once (per-chunk launches would dominate).
    chunk = CHUNK_ELEMENTS if images.device.type == "cpu" else B * C * H * W
    per_plane = max(1, chunk // (H * W))
    n_img, n_ch = (min(B, per_plane // C), C) if per_plane >= C else (1, 1)
    exact = n_img * L * C * slots * kk < _exact_integers(images.dtype)
    # cached on CPU only: an accelerator's chunk is the whole batch (its offsets as large as the batch)
    offsets = _pixel_offsets if images.device.type == "cpu" else _pixel_offsets.__wrapped__
    offset = offsets(
        n_img, C, H, W, patch, cell_size, slots, images.dtype if exact else torch.int64, images.device
    )
    hist = images.new_empty(n_img, L, C, slots, kk)  # the output layout, with slots for bins
    out = images.new_empty(B, L, C, nbins, kk)
    buffers = _ChunkBuffers(gradient, n_img, n_ch, H, W, images)
    for i in range(0, B, n_img):
        b = min(n_img, B - i)
        views = buffers.of(b)
        hist.zero_()
        for c in range(0, C, n_ch):
            x = images[i : i + b, c : c + n_ch]  # any memory layout: copied into the padded buffer
            views.gradients(x)
            dx, dy, mag, idx = views.gx, views.gy, views.magnitude, views.index
            torch.mul(dx, dx, out=mag).addcmul_(dy, dy).sqrt_()  # the reference's sqrt(gx^2 + gy^2)
            if weight is not None:
                mag.mul_(weight)
            # SlowFast's bin floor(atan2(gx, gy) / pi * nbins), in that order of operations, so that angles
            # on a bin boundary (45 degrees when 4 divides nbins, 90 when 2 does) round as in the reference.
            # Slot = floor + nbins; the "mod nbins" is applied to the histogram below (remainder_ on every
            # pixel costs more than the atan2).
            steps = torch.atan2(dx, dy, out=dx).div_(math.pi).mul_(nbins).floor_()
            off = offset[:b] if n_ch == C else offset[:b, c : c + n_ch]
            if offset.is_floating_point():  # every index an exact integer in this dtype: one pass fewer
                idx.copy_(torch.add(off, steps, alpha=kk, out=steps))
            else:
                idx.copy_(steps).mul_(kk).add_(off)
            try:
                hist.view(-1).scatter_add_(0, idx.view(-1), mag.view(-1))
            except (IndexError, RuntimeError) as err:  # a NaN angle casts to an out-of-range index
                if x.isfinite().all():
                    raise
                raise ValueError("HOG: the images contain NaN or infinite values") from err
        # Slots -> bins: floor values -nbins..-1 (slots 0..nbins-1) wrap to bins 0..nbins-1, as do
        # 0..nbins-1 (slots nbins..2 nbins-1); nbins (atan2 = pi) is bin 0.
        o = torch.add(hist[:b, :, :, :nbins], hist[:b, :, :, nbins:-1], out=out[i : i + b])
        o[:, :, :, 0] += hist[:b, :, :, -1]
    # L2 per cell and channel, eps 1e-12 as the reference's F.normalize (whose norm over a middle dimension is
    # ~30x slower on CPU than this sum of squares), once for the batch: per chunk, these small ops cost more in
    # dispatch than in arithmetic
    out.div_(torch.mul(out, out).sum(dim=3, keepdim=True).sqrt_().clamp_min_(1e-12))
    return out.view(B, L, C, nbins, k, k)


class _ChunkBuffers:
    """The per-pixel buffers of one chunk (images, channels, H, W), allocated once per :func:`hog` call, and
    their views for a chunk of b images (the last chunk may be smaller), built once per size."""

    def __init__(self, gradient: str, n_img: int, n_ch: int, H: int, W: int, like: Tensor):
        self.gradient = gradient
        self.padded = like.new_empty(n_img, n_ch, H + 2, W + 2)
        self.gx, self.gy = like.new_empty(n_img, n_ch, H, W), like.new_empty(n_img, n_ch, H, W)
        self.magnitude = like.new_empty(n_img, n_ch, H, W)
        self.index = like.new_empty(n_img, n_ch, H, W, dtype=torch.int64)  # scatter_add_ wants int64
        self._views: dict[int, SimpleNamespace] = {}

    def of(self, b: int) -> SimpleNamespace:
        if b not in self._views:
            gx, gy = self.gx[:b], self.gy[:b]
            self._views[b] = SimpleNamespace(
                gradients=_gradients(self.gradient, self.padded[:b], gx, gy),
                gx=gx,
                gy=gy,
                magnitude=self.magnitude[:b],
                index=self.index[:b],
            )
        return self._views[b]


@functools.lru_cache(maxsize=4)
def _pixel_offsets(
    images: int,
    C: int,
    H: int,
    W: int,
    patch: int,
    cell: int,
    slots: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """(images, C, H, W): each pixel's flat index in the (image, patch, channel, slot, cell) histogram for the
    floor value 0 (slot nbins = slots // 2), so that a floor value f lands at offset + f * k^2; in ``dtype``
    (the input's while every index is an exact integer there, then the index costs one pass fewer; int64
    otherwise). Cached (on CPU, see :func:`hog`): the same for every batch of a run, and a dozen integer passes over a 224 px image
    (measured ~0.3 ms, ~3 % of a batch of 16). Callers must not modify the result.
    """
    k, L = patch // cell, (H // patch) * (W // patch)
    y, x = torch.arange(H, device=device), torch.arange(W, device=device)
    patch_id = (y[:, None] // patch) * (W // patch) + x[None, :] // patch  # (H, W)
    in_patch = (y[:, None] % patch // cell) * k + x[None, :] % patch // cell  # (H, W)
    image = torch.arange(images, device=device).view(images, 1, 1, 1)
    channel = torch.arange(C, device=device).view(1, C, 1, 1)
    offset = ((image * L + patch_id) * C + channel) * (slots * k * k) + slots // 2 * k * k + in_patch
    return offset.to(dtype)


def _exact_integers(dtype: torch.dtype) -> int:
    """Integers below this are exact in dtype (2^24 in fp32); a function so tests can force the int64 path."""
    return int(2 / torch.finfo(dtype).eps)


def hog_cells(
    images: Tensor, cell_size: int = 8, nbins: int = 9, gradient: str = "sobel", weight: Tensor | None = None
) -> Tensor:
    """(B, C, H, W) -> (B, C, nbins, H / cell, W / cell): the same histograms laid out as an image."""
    hist = hog(images, cell_size, nbins, gradient, weight)  # (B, hc * wc, C, nbins, 1, 1)
    return rearrange(hist, "b (h w) c n 1 1 -> b c n h w", h=images.shape[-2] // cell_size)


class HOGTarget(nn.Module):
    """(B, C, H, W) -> (B, L, C * nbins * (p / cell)^2): each patch's cells' HOG, laid out (channel, bin,
    cell row, cell col) as in SlowFast's ``_get_hog_label_2d``; 108 values for 16-px patches and 8-px cells.

    Computed without gradients in fp32 (fp64 if the input is fp64), also under bf16 autocast.
    """

    def __init__(
        self,
        patch_size: int,
        cell_size: int = 8,  # MaskFeat §4.1 / SlowFast masked.py: 8x8-pixel cells
        nbins: int = 9,  # 9 orientation bins over 180 degrees
        gradient: str = "sobel",
        gaussian_window: int = 0,  # 0: SlowFast (none); 16: MMPretrain's HOGGenerator
        channels: int = 3,
    ):
        super().__init__()
        if patch_size % cell_size:
            raise ValueError(f"HOG: patch size {patch_size} is not a multiple of the cell size {cell_size}")
        if gradient not in GRADIENTS:
            raise ValueError(f"HOG gradient must be one of {GRADIENTS}, got {gradient!r}")
        if nbins < 1 or gaussian_window < 0:
            raise ValueError(
                f"HOG: need nbins >= 1 and gaussian_window >= 0 (got {nbins}, {gaussian_window})"
            )
        self.patch_size, self.cell_size, self.nbins, self.gradient = patch_size, cell_size, nbins, gradient
        self.channels, self.gaussian_window = channels, gaussian_window
        self.cells_per_side = patch_size // cell_size
        self.out_dim = channels * nbins * self.cells_per_side**2

    def _weight(self, H: int, W: int) -> Tensor | None:
        if not self.gaussian_window:
            return None
        g = self.gaussian_window
        if H % g or W % g:
            raise ValueError(f"HOG: image size {H}x{W} is not a multiple of gaussian_window {g}")
        # Built per call (16x16, negligible) rather than kept as a buffer that .to(bfloat16) would round.
        return gaussian_kernel(g, g // 2).repeat(H // g, W // g)  # tiled over the image, as in the reference

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"HOG: expected images (B, {self.channels}, H, W), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"HOG: image size {H}x{W} is not a multiple of the patch size {self.patch_size}; "
                "crop or resize the images (data.img_size) to a multiple of it"
            )
        with torch.autocast(images.device.type, enabled=False):
            x = images.to(torch.promote_types(images.dtype, torch.float32))
            weight = self._weight(H, W)
            weight = None if weight is None else weight.to(x)
            hist = hog(x, self.cell_size, self.nbins, self.gradient, weight, self.patch_size)
            return hist.flatten(2)  # (B, L, C * nbins * k * k), (channel, bin, cell row, cell col)

    def cells(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, nbins, H / cell, W / cell), as :meth:`forward` computes them."""
        H, W = images.shape[-2:]
        return self.to_cells(self(images), (H // self.patch_size, W // self.patch_size))

    def to_cells(self, per_patch: Tensor, grid: tuple[int, int]) -> Tensor:
        """The inverse layout: (B, L, out_dim) -> (B, C, nbins, H / cell, W / cell)."""
        k = self.cells_per_side
        return rearrange(
            per_patch,
            "b (h w) (c n i j) -> b c n (h i) (w j)",
            h=grid[0],
            w=grid[1],
            c=self.channels,
            i=k,
            j=k,
        )

    @torch.no_grad()
    def picture(self, images: Tensor, pred: Tensor, mask: Tensor, denormalize: Callable) -> dict[str, Tensor]:
        """[0, 1] images: original | masked | HOG of the input | HOG predicted (MaskFeat Fig. 1 and 9).

        HOG is drawn as orientation glyphs: in every cell, one line per bin along the edge direction with
        brightness from the bin's value (averaged over colour channels). In the prediction column masked
        patches show the model's prediction at full brightness; visible patches show the input's HOG, dimmed.
        Cells are drawn at least 16 pixels wide (all columns upscaled alike) so the glyphs stay legible.
        """
        H, W = images.shape[-2:]
        grid = (H // self.patch_size, W // self.patch_size)
        scale = max(1, 16 // self.cell_size)
        target = self.cells(images)  # (B, C, n, hc, wc)
        predicted = self.to_cells(pred.float(), grid)
        patch_mask = mask.float().view(-1, 1, *grid)  # 1 = masked
        cell_mask = F.interpolate(patch_mask, size=target.shape[-2:], mode="nearest").unsqueeze(2)
        mixed = predicted * cell_mask + target * (1 - cell_mask)
        pixel_mask = F.interpolate(patch_mask, size=(H * scale, W * scale), mode="nearest")  # (B, 1, sH, sW)
        shown = F.interpolate(denormalize(images), scale_factor=scale, mode="nearest")
        glyph = self.cell_size * scale
        return {
            "original": shown,
            "masked": shown * (1 - pixel_mask),
            "HOG input": hog_glyphs(target, glyph).expand(-1, 3, -1, -1),
            "HOG predicted": (hog_glyphs(mixed, glyph) * (0.35 + 0.65 * pixel_mask)).expand(-1, 3, -1, -1),
        }


def glyph_stencils(nbins: int, size: int) -> Tensor:
    """(nbins, size, size) anti-aliased lines through the cell centre, bin k at angle (k + 0.5) * 180 / nbins
    counter-clockwise from horizontal as seen on screen (the edge direction of that bin, see module doc)."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    y, x = torch.meshgrid(-coords, coords, indexing="ij")  # y up on screen
    angles = (torch.arange(nbins, dtype=torch.float32) + 0.5) * math.pi / nbins
    c, s = angles.cos()[:, None, None], angles.sin()[:, None, None]
    across = (x * s - y * c).abs()  # distance from the line
    along = (x * c + y * s).abs()  # distance along it from the centre
    lines = (1 - across).clamp(min=0) * (along <= (size - 1) / 2).float()
    return lines / lines.amax(dim=(1, 2), keepdim=True)  # every line peaks at 1, whatever its angle


def hog_glyphs(cells: Tensor, size: int) -> Tensor:
    """(B, C, nbins, hc, wc) histograms -> (B, 1, hc * size, wc * size) glyph image in [0, 1].

    Each pixel takes the largest of the bins whose line passes through it (not their sum, which would turn
    every cell centre into a bright dot); brightness is relative to the image's largest bin value.
    """
    hist = cells.float().clamp(min=0).mean(dim=1)  # (B, n, hc, wc): averaged over colour channels
    stencils = glyph_stencils(hist.shape[1], size).to(hist.device)  # (n, p, q)
    img = (hist[..., None, None] * stencils[None, :, None, None]).amax(dim=1)  # (B, hc, wc, p, q)
    img = rearrange(img, "b h w p q -> b 1 (h p) (w q)")
    peak = hist.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
    return (img / peak).clamp(0, 1)
