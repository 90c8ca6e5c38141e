import numpy as np
import torch

from mmssl.ops import gather_tokens, patchify, random_masking, sincos_2d, unpatchify


def reference_sincos_2d(dim: int, size: int) -> np.ndarray:
    """MAE util/pos_embed.py written out with numpy, as an independent check of the layout."""
    grid_h = np.arange(size, dtype=np.float32)
    grid_w = np.arange(size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, -1)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_sincos_matches_reference_layout():
    ours = sincos_2d(32, (5, 5), num_prefix_tokens=1)[0].numpy()
    np.testing.assert_allclose(ours, reference_sincos_2d(32, 5), atol=1e-6)


def test_patchify_layout_and_roundtrip():
    x = torch.randn(2, 3, 16, 24)
    p = patchify(x, 8)
    assert p.shape == (2, 6, 8 * 8 * 3)
    # patch (row 1, col 2) = index 1*3+2; inner layout (p, q, c) as in MAE's einsum 'nchpwq->nhwpqc'
    expected = x[0, :, 8:16, 16:24].permute(1, 2, 0).reshape(-1)
    assert torch.equal(p[0, 5], expected)
    assert torch.equal(unpatchify(p, 8, (2, 3)), x)


def test_random_masking_keeps_lowest_noise():
    noise = torch.rand(4, 16)
    keep, restore, mask = random_masking(noise, 0.75)
    assert keep.shape == (4, 4) and mask.sum(1).tolist() == [12.0] * 4
    for b in range(4):
        assert set(keep[b].tolist()) == set(noise[b].argsort()[:4].tolist())
        assert (mask[b, keep[b]] == 0).all()
    tokens = torch.randn(4, 16, 3)
    assert torch.equal(gather_tokens(gather_tokens(tokens, noise.argsort(1)), restore), tokens)


def test_mask_ratio_truncates_like_reference():
    keep, _, mask = random_masking(torch.rand(2, 196), 0.75)
    assert keep.shape[1] == 49 and mask.sum().item() == 2 * 147
