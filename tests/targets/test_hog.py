"""HOG targets: parity with a plain loop reference written from the definition and with skimage.feature.hog,
the per-patch layout, input checks, precision, and the glyph picture."""

import math

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from skimage.feature import hog as skimage_hog

from mmssl.targets.hog import HOGTarget, glyph_stencils, hog_cells, image_gradients


def real_image(name: str, size: tuple[int, int], top: int = 0, left: int = 0) -> np.ndarray:
    """An RGB crop (H, W, 3) uint8 of a photograph bundled with scikit-image."""
    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[top : top + size[0], left : left + size[1], :3]


def as_batch(*images: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    """uint8 (H, W, 3) -> (B, 3, H, W) grey levels 0..255: integer values, so gradients are exact in fp32 too."""
    return torch.stack([torch.from_numpy(i).permute(2, 0, 1) for i in images]).to(dtype)


def reference_hog(
    image: np.ndarray,
    patch: int = 16,
    cell: int = 8,
    nbins: int = 9,
    gradient: str = "sobel",
    gaussian: int = 0,
) -> np.ndarray:
    """MaskFeat's HOG written out plainly: (C, H, W) float64 -> (L, C * nbins * (patch / cell)^2).

    Reflect padding, 3x3 Sobel (or [-1, 0, 1]) correlation per channel, magnitude, unsigned orientation
    atan2(gx, gy) hard-binned into nbins over 180 degrees, magnitudes summed per cell, each cell's histogram
    L2-normalised per channel, then per patch in raster order as (channel, bin, cell row, cell col).
    """
    C, H, W = image.shape
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    if gradient == "sobel":
        kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    else:
        kx = np.array([[0, 0, 0], [-1, 0, 1], [0, 0, 0]], dtype=np.float64)
    ky = kx.T
    gx = np.zeros((C, H, W))
    gy = np.zeros((C, H, W))
    for i in range(3):
        for j in range(3):
            gx += kx[i, j] * padded[:, i : i + H, j : j + W]
            gy += ky[i, j] * padded[:, i : i + H, j : j + W]
    magnitude = np.sqrt(gx**2 + gy**2)
    if gaussian:
        n = np.arange(gaussian) - (gaussian - 1) / 2
        g = np.exp(-0.5 * (n / (gaussian // 2)) ** 2)
        window = np.outer(g, g) / np.outer(g, g).sum()
        magnitude = magnitude * np.tile(window, (H // gaussian, W // gaussian))
    bins = np.floor(np.arctan2(gx, gy) / math.pi * nbins).astype(int) % nbins
    hist = np.zeros((C, H // cell, W // cell, nbins))
    for c in range(C):
        for r in range(H // cell):
            for q in range(W // cell):
                for y in range(r * cell, (r + 1) * cell):
                    for x in range(q * cell, (q + 1) * cell):
                        hist[c, r, q, bins[c, y, x]] += magnitude[c, y, x]
                norm = np.sqrt((hist[c, r, q] ** 2).sum())
                hist[c, r, q] /= max(norm, 1e-12)
    k = patch // cell
    rows = []
    for pr in range(H // patch):
        for pc in range(W // patch):
            block = hist[:, pr * k : (pr + 1) * k, pc * k : (pc + 1) * k, :]  # (C, k, k, nbins)
            rows.append(block.transpose(0, 3, 1, 2).reshape(-1))  # (channel, bin, cell row, cell col)
    return np.stack(rows)


@pytest.mark.parametrize("gradient", ["sobel", "central"])
@pytest.mark.parametrize("gaussian", [0, 16])
def test_matches_plain_loop_reference(gradient, gaussian):
    """fp64 on both sides: the vectorised target equals the loop reference to rounding (Sobel included).

    Grey levels 0..255 keep gradients exact, so no pixel lands on the other side of a bin edge by rounding.
    (On rescaled inputs, gradients that are exactly 0 in integers, horizontal edges, can come out as +-1e-17,
    and hard binning then puts them in bin 0 or nbins - 1: a property of the reference HOG, not of this code.)
    """
    images = [real_image("astronaut", (48, 64), 80, 180), real_image("coffee", (48, 64), 200, 260)]
    target = HOGTarget(16, gradient=gradient, gaussian_window=gaussian)
    ours = target(as_batch(*images))
    assert ours.shape == (2, 3 * 4, 108) and ours.dtype == torch.float64
    for b, img in enumerate(images):
        expected = reference_hog(img.transpose(2, 0, 1).astype(float), gradient=gradient, gaussian=gaussian)
        np.testing.assert_allclose(ours[b].numpy(), expected, rtol=0, atol=1e-12)


def test_fp32_target_matches_reference_on_real_images():
    img = real_image("chelsea", (96, 112), 40, 100)
    ours = HOGTarget(16)(as_batch(img, dtype=torch.float32))
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(
        ours[0].numpy(), reference_hog(img.transpose(2, 0, 1).astype(float)), atol=2e-6
    )


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_central_difference_cells_match_skimage_hog_per_channel(name):
    """skimage.feature.hog with 8x8 cells, 9 unsigned bins, 1x1-cell blocks and L2 norm, run per channel.

    skimage measures the gradient angle from the horizontal axis, atan2(g_row, g_col); the reference HOG
    (SlowFast) from the vertical one, atan2(gx, gy); so ours on the transposed image is compared with skimage on
    the image. Every cell is compared, borders included: with reflect padding the outermost pixels get a zero
    normal gradient, which is exactly skimage's border rule (it sets g_row[0], g_row[-1], g_col[:, 0],
    g_col[:, -1] to 0). Tolerance 1e-6: skimage's L2 has eps inside the root, h / sqrt(|h|^2 + 1e-10), and
    divides sums by the 64 pixels of a cell; on 0..255 grey levels a non-flat cell has |h| >= 1/64, so that eps
    changes a value by at most 0.5e-10 * 64^2 = 2e-7 relative; fp32 rounding adds ~1e-7. Inputs are integer grey
    levels, so gradients are exact and no pixel can fall on the other side of a bin edge by rounding.
    """
    img = real_image(name, (224, 224), 0, 0)
    x = as_batch(img, dtype=torch.float32)
    ours = hog_cells(x.transpose(-1, -2), gradient="central").transpose(-1, -2)[0]  # (3, 9, 28, 28)
    untransposed = hog_cells(x, gradient="central")[0]
    for c in range(3):
        ref = skimage_hog(
            img[..., c], orientations=9, pixels_per_cell=(8, 8), cells_per_block=(1, 1),
            block_norm="L2", feature_vector=False,
        )[:, :, 0, 0, :]  # fmt: skip
        np.testing.assert_allclose(ours[c].permute(1, 2, 0).numpy(), ref, rtol=0, atol=1e-6)
        # the comparison can fail: the orientation convention matters
        assert np.abs(untransposed[c].permute(1, 2, 0).numpy() - ref).max() > 0.1


def test_orientation_bins_are_edge_directions():
    """A horizontal edge lands in bin 0 and a vertical one in bin nbins // 2 (SlowFast's atan2(gx, gy))."""
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    horizontal = (y >= 12).float().expand(1, 3, -1, -1)
    vertical = (x >= 12).float().expand(1, 3, -1, -1)
    for image, expected in ((horizontal, 0), (vertical, 4)):
        cells = hog_cells(image)  # (1, 3, 9, 4, 4)
        strongest = cells[0, :, :, 1, 1].argmax(dim=1)  # the cell holding the edge
        assert strongest.tolist() == [expected] * 3


def test_patch_layout_follows_encoder_patch_order():
    """Patch (row r, col c) holds the 2x2 cells of that patch, as the per-cell histograms (computed with a
    different flat index, one cell per group) place them; to_cells inverts the layout."""
    img = torch.from_numpy(real_image("astronaut", (64, 96), 0, 150)).permute(2, 0, 1)[None].float()
    target = HOGTarget(16)
    full = target(img)  # (1, 24, 108)
    cells = hog_cells(img)  # (1, 3, 9, 8, 12)
    r, c = 2, 5
    patch_cells = cells[0, :, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(-1)  # (channel, bin, i, j)
    torch.testing.assert_close(full[0, r * 6 + c], patch_cells)
    torch.testing.assert_close(target.to_cells(full, (4, 6)), cells)


def test_invariant_to_per_channel_scale():
    """Gradients scale with each channel's std and the per-channel L2 norm cancels it (as for normalised
    inputs); a power-of-two scale keeps every float exact, so the equality is exact too."""
    img = as_batch(real_image("coffee", (64, 64), 100, 100), dtype=torch.float32)
    scale = torch.tensor([0.25, 2.0, 8.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(HOGTarget(16)(img * scale), HOGTarget(16)(img), atol=1e-6, rtol=0)


def test_fp32_without_gradients_even_under_bf16_autocast():
    img = as_batch(real_image("rocket", (64, 64), 100, 100), dtype=torch.float32).requires_grad_()
    target = HOGTarget(16)
    plain = target(img)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = target(img)
        from_bf16 = target(img.detach().bfloat16())
    assert auto.dtype == from_bf16.dtype == torch.float32
    assert not auto.requires_grad
    torch.testing.assert_close(auto, plain)
    assert (from_bf16 - plain).abs().max() < 0.5  # bf16 input is coarser, but still a HOG of the same picture


def test_bad_sizes_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        HOGTarget(16)(torch.rand(1, 3, 40, 48))
    with pytest.raises(ValueError, match="patch size 12 is not a multiple of the cell size 8"):
        HOGTarget(12)
    with pytest.raises(ValueError, match="gaussian_window 16"):
        HOGTarget(8, gaussian_window=16)(torch.rand(1, 3, 24, 24))
    with pytest.raises(ValueError, match="expected images"):
        HOGTarget(16)(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="gradient"):
        HOGTarget(16, gradient="prewitt")


def test_glyphs_point_along_edges_and_picture_columns():
    stencils = glyph_stencils(9, 16)
    rows, cols = stencils.sum(dim=2), stencils.sum(dim=1)  # mass per row, per column
    assert rows[0].max() > 3 * cols[0].max()  # bin 0 (10 degrees): a near-horizontal line
    assert cols[4].max() > 3 * rows[4].max()  # bin 4 (90 degrees): vertical

    target = HOGTarget(16)
    images = torch.randn(2, 3, 32, 48)
    mask = torch.zeros(2, 6)
    mask[:, :2] = 1
    pics = target.picture(images, torch.rand(2, 6, 108), mask, lambda x: (x * 0.2 + 0.5).clamp(0, 1))
    assert list(pics) == ["original", "masked", "HOG input", "HOG predicted"]
    for img in pics.values():
        assert img.shape == (2, 3, 64, 96) and img.min() >= 0 and img.max() <= 1
    assert pics["masked"][:, :, :32, :64].abs().sum() == 0  # masked patches drawn black
    assert pics["HOG input"].amax() == pytest.approx(1.0)


@pytest.mark.parametrize("nbins", [4, 8, 12])
def test_other_bin_counts_match_the_atan2_formula(nbins):
    """The binning (floor values summed per slot, folded onto bins afterwards) equals SlowFast's
    floor(atan2(gx, gy) / pi * n) for even and odd bin counts (dense per-bin sums as an independent path)."""
    x = torch.from_numpy(real_image("astronaut", (32, 48), 120, 200)).permute(2, 0, 1)[None].double()
    gx, gy = image_gradients(x)
    bins = torch.floor(torch.atan2(gx, gy) / math.pi * nbins).long() % nbins
    magnitude = torch.hypot(gx, gy)
    ref = torch.stack([F.avg_pool2d(magnitude * (bins == b), 8) for b in range(nbins)], dim=2)
    ref = ref / ref.norm(dim=2, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(hog_cells(x, nbins=nbins), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk", ["planes", "images", "int64 index"])
def test_cpu_chunking_paths_match_the_reference(chunk, monkeypatch):
    """hog() works through a CPU batch in chunks: single channel planes (large images), several whole images
    with a partial last chunk, and an int64 index when the input's dtype cannot hold every index exactly. Each
    path gives the loop reference's histograms; inputs in channels-last memory (as a permuted uint8 batch
    normalises to) are read as they are."""
    import mmssl.targets.hog as hog_module

    images = [real_image(name, (32, 48), 60, 120) for name in ("astronaut", "coffee", "chelsea")]
    if chunk == "planes":
        monkeypatch.setattr(hog_module, "CHUNK_ELEMENTS", 32 * 48)  # one plane per chunk
    elif chunk == "images":
        monkeypatch.setattr(hog_module, "CHUNK_ELEMENTS", 2 * 3 * 32 * 48)  # two images, then one
    else:
        monkeypatch.setattr(hog_module, "_exact_integers", lambda dtype: 0)
    batch = as_batch(*images).contiguous(memory_format=torch.channels_last)
    ours = HOGTarget(16)(batch)
    for b, img in enumerate(images):
        expected = reference_hog(img.transpose(2, 0, 1).astype(float))
        np.testing.assert_allclose(ours[b].numpy(), expected, rtol=0, atol=1e-12)


def test_non_finite_images_are_refused():
    images = torch.rand(2, 3, 16, 16)
    images[1, 2, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        HOGTarget(16)(images)
