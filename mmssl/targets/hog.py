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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

GRADIENTS = ("sobel", "central")


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
    x = F.pad(images, (1, 1, 1, 1), mode="reflect")  # (B, C, H+2, W+2)
    if gradient == "central":
        return x[..., 1:-1, 2:] - x[..., 1:-1, :-2], x[..., 2:, 1:-1] - x[..., :-2, 1:-1]
    if gradient == "sobel":
        s = x[..., :-2, :] + x[..., 2:, :]
        s.add_(x[..., 1:-1, :], alpha=2)  # [1, 2, 1] down the rows: (B, C, H, W+2)
        gx = s[..., 2:] - s[..., :-2]
        s = x[..., :-2] + x[..., 2:]
        s.add_(x[..., 1:-1], alpha=2)  # [1, 2, 1] along the columns: (B, C, H+2, W)
        gy = s[..., 2:, :] - s[..., :-2, :]
        return gx, gy
    raise ValueError(f"HOG gradient must be one of {GRADIENTS}, got {gradient!r}")


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
    patch = patch_size or cell_size
    if patch % cell_size:
        raise ValueError(f"HOG: patch size {patch} is not a multiple of the cell size {cell_size}")
    if H % patch or W % patch:
        raise ValueError(f"HOG: image size {H}x{W} is not a multiple of the patch size {patch}")
    k, L = patch // cell_size, (H // patch) * (W // patch)
    gx, gy = image_gradients(images.contiguous(), gradient)  # (channels-last inputs would stay so throughout)
    magnitude = torch.hypot(gx, gy)  # (B, C, H, W)
    if weight is not None:
        magnitude.mul_(weight)
    # SlowFast bins by floor(atan2(gx, gy) / pi * nbins) % nbins. atan(gx / gy) is the same angle modulo pi
    # (gy = 0 gives +-inf -> +-pi/2, signed zeros keep their side) and cheaper than atan2 on CPU; it lands in
    # [-pi/2, pi/2], so floor(...) takes nbins + 1 values ("slots"), folded onto the bins below.
    # 0 / 0 (no gradient) is NaN, sent to 0: its magnitude is 0 anyway.
    steps = gx.div_(gy).atan_().nan_to_num_(0.0).mul_(nbins / math.pi).floor_()
    lo = -((nbins + 1) // 2)  # the lowest floor value: -5 for 9 bins; the highest is nbins // 2
    slots = nbins + 1
    # The histogram is scattered straight into the per-patch layout (patch, channel, slot, cell row, cell col),
    # so no permutation is needed afterwards. Each pixel's index within its image is built in place in float
    # (exact below 2^24, else float64), then offset per image in int32 while that fits (2^31: 90k images).
    per_image = L * C * slots * k * k
    y, x = torch.arange(H, device=images.device), torch.arange(W, device=images.device)
    patch_id = (y[:, None] // patch) * (W // patch) + x[None, :] // patch  # (H, W)
    in_patch = (y[:, None] % patch // cell_size) * k + x[None, :] % patch // cell_size  # (H, W)
    channel = torch.arange(C, device=images.device).view(C, 1, 1)
    offset = (patch_id * C + channel) * (slots * k * k) + in_patch - lo * k * k  # (C, H, W)
    if per_image >= 2**24 and steps.dtype != torch.float64:
        steps = steps.double()
    itype = torch.int32 if B * per_image < 2**31 else torch.int64
    index = steps.mul_(k * k).add_(offset.to(steps.dtype)).to(itype).view(B, C * H * W)
    index.add_(torch.arange(B, device=images.device, dtype=itype).view(B, 1) * per_image)
    hist = torch.zeros(B * per_image, dtype=magnitude.dtype, device=images.device)
    hist.index_add_(0, index.view(-1), magnitude.view(-1))
    # Fold slots onto bins: floor values 0.. are bins 0..; -1, -2, ... wrap to nbins - 1, ...; the lowest
    # (atan = -pi/2) shares bin nbins + lo with the highest (+pi/2).
    hist = hist.view(B, L, C, slots, k * k)
    out = torch.cat([hist[:, :, :, -lo:], hist[:, :, :, 1:-lo]], dim=3)  # (B, L, C, nbins, k * k)
    out[:, :, :, nbins + lo] += hist[:, :, :, 0]
    # L2 per cell and channel, eps 1e-12 as the reference's F.normalize (whose norm over a middle dimension
    # is ~30x slower on CPU than this sum of squares)
    out = out / out.square().sum(dim=3, keepdim=True).sqrt_().clamp_min_(1e-12)
    return out.view(B, L, C, nbins, k, k)


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
