"""iGPT: palette, sequence transformer, both objectives, sampling, probe features (Chen et al. 2020)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_igpt as tiny
from torch import nn

from mmssl import config as C
from mmssl.data.transforms import eval_view
from mmssl.eval.features import encode, labelled_loader, resolve_layers
from mmssl.factory import build_objective
from mmssl.objectives.igpt import IGPTEncoder, ImageGPT
from mmssl.sequence import SequenceTransformer, sample_logits
from mmssl.targets.palette import Palette, fit_kmeans, inertia

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import fit_palette  # noqa: E402


def load_labelled(spec: str, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled demo images at side x side in [0, 1] (iGPT's evaluation view: shorter side, centre crop)."""
    loader, _ = labelled_loader(spec, eval_view(side, crop_pct=1.0, mean=(0.0,) * 3, std=(1.0,) * 3), 256, 0)
    batches = list(loader)
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


def probe_accuracy(train_x, train_y, val_x, val_y) -> float:
    """Logistic regression on standardised features (scikit-learn), an independent probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(clf.fit(train_x.numpy(), train_y.numpy()).score(val_x.numpy(), val_y.numpy()))


def randomise_head(objective: ImageGPT) -> None:
    # the logits projection starts at zero (paper); tests of what the outputs depend on need it non-zero
    nn.init.normal_(objective.transformer.head.weight, std=0.5)


# ---- palette -----------------------------------------------------------------------------------------------
def test_quantize_is_one_vectorised_nearest_centre_search():
    centroids = torch.rand(37, 3)
    images = torch.rand(5, 3, 6, 7)
    ids = Palette(centroids).quantize(images)
    assert ids.shape == (5, 42) and ids.dtype == torch.int64
    pixels = images.permute(0, 2, 3, 1).reshape(-1, 3)  # raster order: row after row
    brute = torch.stack([((centroids - p) ** 2).sum(1).argmin() for p in pixels]).view(5, 42)
    assert torch.equal(ids, brute)
    back = Palette(centroids).dequantize(ids, (6, 7))
    assert torch.equal(back[2, :, 3, 4], centroids[ids[2, 3 * 7 + 4]])


@pytest.fixture(scope="module")
def digit_images():
    """Demo digits (scikit-learn's load_digits) at 8x8 in [0, 1], with labels: train and val."""
    return load_labelled("demo:digits/train", 8), load_labelled("demo:digits/val", 8)


def test_bundled_digits_palette_round_trip_is_small_on_held_out_digits():
    palette = Palette.load(ROOT / "assets" / "palettes" / "digits16.safetensors")
    val, _ = load_labelled("demo:digits/val", 16)
    back = palette.dequantize(palette.quantize(val), (16, 16))
    rmse = (back - val).pow(2).mean().sqrt().item()
    assert rmse < 0.025, rmse  # measured 0.0176 (4.5/255 per channel): 16 greys for grey digits
    assert palette.metadata["k"] == "16" and "digits" in palette.metadata["fitted_on"]


def test_kmeans_on_real_photo_pixels_matches_sklearn_and_round_trips_held_out_photos():
    from sklearn.cluster import KMeans

    pixels, _ = fit_palette.sample_pixels("demo:photos/train", "train", 32, 150, 32, 0, "bicubic")
    val, _ = fit_palette.sample_pixels("demo:photos/val", "val", 32, 100, 32, 1, "bicubic")
    ours = fit_kmeans(pixels, k=64, iters=100, batch_size=2048, progress=False)
    ref = KMeans(64, n_init=1, random_state=0).fit(pixels.numpy())
    ref_inertia = ref.inertia_ / len(pixels)
    assert inertia(pixels, ours) < 1.1 * ref_inertia  # as good as full-batch Lloyd to 10%
    rmse = math.sqrt(inertia(val, ours) / 3)  # per channel, on photos never used for fitting
    assert rmse < 0.08, rmse  # measured 0.056 (14/255) with 64 colours on the held-out photo sources


def test_palette_file_round_trip_and_refusals(tmp_path):
    palette = Palette(torch.rand(8, 3))
    path = palette.save(tmp_path / "p.safetensors", fitted_on="x")
    again = Palette.load(path)
    assert torch.equal(again.centroids, palette.centroids) and again.metadata["fitted_on"] == "x"
    from safetensors.torch import save_file

    save_file({"centroids": torch.rand(8, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an mmssl palette"):
        Palette.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="fit_palette"):
        Palette.load(tmp_path / "missing.safetensors")
    with pytest.raises(RuntimeError, match="not fitted"):
        Palette.unfitted(8).quantize(torch.rand(1, 3, 2, 2))


# ---- the transformer ---------------------------------------------------------------------------------------
def test_ar_output_before_t_ignores_token_t_and_after_sees_it():
    objective = tiny("ar").eval()
    randomise_head(objective)
    ids = torch.randint(0, 8, (2, 64))
    t = 20
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 3) % 8
    a, b = objective.transformer(ids), objective.transformer(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)  # outputs 0..t predict 0..t
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax(-1).min() > 1e-4  # every later output changes


def test_bert_sees_every_unmasked_token_and_no_masked_one():
    objective = tiny("bert").eval()
    randomise_head(objective)
    ids = torch.randint(0, 8, (1, 64))
    keep = torch.rand(1, 64) > 0.15
    keep[0, 10], keep[0, 40] = True, False
    base = objective.transformer(ids, keep=keep)
    for t, visible in ((10, True), (40, False)):
        changed = ids.clone()
        changed[0, t] = (ids[0, t] + 3) % 8
        diff = (objective.transformer(changed, keep=keep) - base).abs().amax(-1)[0]  # (L,)
        if visible:
            assert diff.min() > 1e-5  # every position, before and after t, sees token t
        else:
            assert diff.max() == 0  # a masked token's id is invisible everywhere


def test_matches_transformers_imagegpt_logits():
    """Parity with Hugging Face's port of openai/image-gpt (independent code), weights copied across by the
    library's exporter (mmssl/interop/hf_igpt.py)."""
    from mmssl.interop.hf_igpt import hf_input, to_imagegpt

    k, L = 8, 16
    objective = tiny("ar", k=k, side=4).eval()
    randomise_head(objective)
    for blk in objective.transformer.blocks:  # non-trivial gains
        nn.init.normal_(blk.norm1.weight, 1.0, 0.2)
        nn.init.normal_(blk.norm2.weight, 1.0, 0.2)
    hf = to_imagegpt(objective)
    ids = torch.randint(0, k, (3, L))
    with torch.no_grad():
        ref = hf(hf_input(ids, k)).logits  # HF: the start token is the extra last id k
        torch.testing.assert_close(objective.transformer(ids), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["ar", "bert"])
def test_loss_is_log_k_at_init(mode):
    # gradients, weight-decay names, the palette as a checkpointed buffer: tests/objectives/test_contract.py
    objective = tiny(mode)
    out = objective({"image": torch.rand(4, 3, 8, 8)})
    assert math.isclose(out["loss"].item(), math.log(8), rel_tol=1e-5)  # zero-initialised logits: uniform
    assert "palette.centroids" in objective.state_dict() and not objective.palette.centroids.requires_grad


def test_bert_loss_counts_masked_positions_only():
    objective = tiny("bert")
    randomise_head(objective)
    images = torch.rand(2, 3, 8, 8)
    keep = torch.ones(2, 64, dtype=torch.bool)
    keep[:, 5] = False
    out = objective({"image": images}, keep=keep)
    ids = objective.tokens(images)
    expected = torch.nn.functional.cross_entropy(out["logits"][:, 5], ids[:, 5])
    torch.testing.assert_close(out["loss"], expected)


def test_wrong_resolution_and_mismatched_parts_fail_clearly():
    with pytest.raises(ValueError, match="igpt.resolution"):
        tiny()({"image": torch.rand(1, 3, 16, 16)})
    with pytest.raises(ValueError, match="causal"):
        ImageGPT(SequenceTransformer(8, 64, 32, 1, 4, causal=False), Palette(torch.rand(8, 3)), mode="ar")
    with pytest.raises(ValueError, match="colours"):
        ImageGPT(SequenceTransformer(8, 64, 32, 1, 4), Palette(torch.rand(9, 3)))


def test_sample_logits_top_k_and_argmax():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample_logits(logits, temperature=1.0, top_k=2, generator=g)
    assert set(drawn.tolist()) == {1, 2}
    assert sample_logits(logits, temperature=0).eq(1).all()


# ---- learning, sampling, probing on real digits -------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(digit_images):
    """A 4-block iGPT trained for 150 steps on the 1257 training digits at 8x8 with an 8-grey palette."""
    (images, _), _ = digit_images
    torch.manual_seed(0)
    pixels = images.permute(0, 2, 3, 1).reshape(-1, 3)
    palette = Palette(fit_kmeans(pixels, k=8, iters=50, batch_size=4096, progress=False))
    objective = tiny("ar", depth=4, palette=palette)
    fresh = {k: v.clone() for k, v in objective.state_dict().items()}
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster than two fighting over shared cores
    for _ in range(150):
        batch = images[torch.randint(len(images), (64,), generator=g)]
        loss = objective({"image": batch})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.set_num_threads(threads)
    return objective.eval(), fresh, losses


def test_loss_falls_on_real_digits_below_the_pixel_frequency_baseline(pretrained, digit_images):
    objective, _, losses = pretrained
    (_, _), (val, _) = digit_images
    ids = objective.tokens(val)
    freq = torch.bincount(ids.flatten(), minlength=8).float() / ids.numel()
    unigram = -(freq[freq > 0] * freq[freq > 0].log()).sum().item()  # the best context-free model
    with torch.no_grad():
        held_out = objective({"image": val})["loss"].item()
    assert losses[0] == pytest.approx(math.log(8), rel=1e-4)
    assert held_out < 0.8 * unigram, (held_out, unigram)  # measured ~0.75 vs 1.5 nats


def test_completions_keep_the_top_half_and_are_deterministic_for_a_seed(pretrained, digit_images):
    objective, _, _ = pretrained
    (_, _), (val, _) = digit_images
    batch = {"image": val[:3]}
    a = objective.visualize(batch, lambda x: x, torch.Generator().manual_seed(0))
    b = objective.visualize(batch, lambda x: x, torch.Generator().manual_seed(0))
    c = objective.visualize(batch, lambda x: x, torch.Generator().manual_seed(1))
    assert list(a) == ["original", "quantised", "given half", "completion 1", "completion 2"]
    assert all(v.shape == (3, 3, 8, 8) and 0 <= v.min() and v.max() <= 1 for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["completion 1"], c["completion 1"])
    torch.testing.assert_close(a["completion 1"][..., :4, :], a["quantised"][..., :4, :])


def test_cached_sampling_equals_rerunning_the_prefix(pretrained, digit_images):
    objective, _, _ = pretrained
    ids = objective.tokens(digit_images[1][0][:2])
    runs = [
        objective.complete(ids, 44, generator=torch.Generator().manual_seed(3), cache=c)
        for c in (True, False)
    ]
    assert torch.equal(*runs) and torch.equal(runs[0][:, :44], ids[:, :44])
    assert torch.equal(
        objective.complete(ids, 0, temperature=0), objective.complete(ids, 0, temperature=0, cache=False)
    )


def layerwise_probe(objective: ImageGPT, train, val) -> list[float]:
    """Probe accuracy of every layer (0 = embeddings) through the evaluation path's encoder contract."""
    encoder = IGPTEncoder(objective, objective.transformer.depth)  # every layer, not only up to the middle
    layers = resolve_layers(encoder, list(range(encoder.num_layers)))
    with torch.no_grad():
        ftr, fval = encode(encoder, train[0], layers), encode(encoder, val[0], layers)
    return [probe_accuracy(ftr[k], train[1], fval[k], val[1]) for k in ftr]


def test_layerwise_probe_beats_random_init_at_the_best_layer(pretrained, digit_images):
    objective, fresh, _ = pretrained
    train, val = digit_images
    baseline = tiny("ar", depth=4, palette=objective.palette)
    baseline.load_state_dict(fresh)
    trained = layerwise_probe(objective, train, val)
    random_init = layerwise_probe(baseline.eval(), train, val)
    print("\npretrained", [round(a, 3) for a in trained], "\nrandom init", [round(a, 3) for a in random_init])
    assert len(trained) == 5  # embeddings + 4 blocks
    assert max(trained) > max(random_init) + 0.03, (trained, random_init)


def test_features_of_a_layer_match_the_per_layer_stack():
    objective = tiny("ar", depth=3).eval()
    images = torch.rand(2, 3, 8, 8)
    stack = objective.features_per_layer(images)
    assert stack.shape == (2, 4, 32)
    torch.testing.assert_close(objective.features(images, layer=2), stack[:, 2])
    assert objective.feature_layer == 1  # depth // 2: the paper's best layers are in the middle

    # the encoder behind the backbone contract: the transformer up to feature_layer, the paper's pooling
    encoder = objective.backbone
    assert isinstance(encoder, IGPTEncoder) and encoder.num_layers == 2 and not encoder.training
    assert (encoder.embed_dim, encoder.grid_size, encoder.num_patches, encoder.input_size) == (
        32,
        (8, 8),
        64,
        8,
    )
    torch.testing.assert_close(encoder.forward_pooled(images), stack[:, 1])
    for pool in ("default", "avg"):
        out = encode(encoder, images, resolve_layers(encoder, [0, -1]), pool)
        torch.testing.assert_close(out["layer0"], stack[:, 0])
        torch.testing.assert_close(out["layer1"], stack[:, 1])
    tokens = encoder.forward_tokens(images)  # (B, L, D), parameter-free layer-normed
    assert tokens.shape == (2, 64, 32)
    torch.testing.assert_close(tokens.mean(1), stack[:, 1])
    with pytest.raises(ValueError, match="no CLS token"):
        encode(encoder, images, [1], "cls")
    with pytest.raises(ValueError, match="layer 2 out of range"):
        resolve_layers(encoder, [2])
    assert set(objective.state_dict()) == set(tiny("ar", depth=3).state_dict())  # no new keys


def test_demo_config_builds_the_documented_model():
    cfg = C.load("igpt_demo")
    objective = build_objective(cfg)
    t = objective.transformer
    assert (t.seq_len, t.vocab_size, t.depth, t.embed_dim) == (256, 16, 4, 64)
    assert objective.palette.fitted
    s32 = C.load("igpt_s32")
    assert (s32.igpt.depth, s32.igpt.embed_dim, s32.igpt.num_heads, s32.igpt.resolution, s32.igpt.num_colors) == (
        24, 512, 8, 32, 512)  # fmt: skip
