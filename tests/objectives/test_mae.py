"""MAE: parity with transformers' ViTMAE, the reference parameter count, gradients and learning."""

import pytest
import torch
from conftest import tiny_cfg

from mmssl import config as C
from mmssl.factory import build_objective
from mmssl.interop.hf_mae import to_vit_mae

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_transformers_vitmae(norm_pix):
    cfg = tiny_cfg(f"mae.norm_pix_loss={norm_pix}")
    objective = build_objective(cfg).eval()
    hf = to_vit_mae(objective)  # transformers' independent ViTMAE with our weights (mmssl/interop/hf_mae.py)
    assert hf.config.norm_pix_loss == norm_pix
    images = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, objective.backbone.num_patches)
    ours = objective({"image": images}, noise=noise)
    theirs = hf(pixel_values=images, noise=noise)
    torch.testing.assert_close(ours["mask"], theirs.mask)
    torch.testing.assert_close(ours["pred"], theirs.logits, atol=1e-5, rtol=1e-5)
    assert abs(ours["loss"].item() - theirs.loss.item()) < 1e-5


def test_sincos_pos_embed_matches_transformers():
    cfg = tiny_cfg()
    objective = build_objective(cfg)
    hf_cfg = transformers.ViTMAEConfig(hidden_size=64, image_size=32, patch_size=8, decoder_hidden_size=32)
    hf = transformers.ViTMAEForPreTraining(hf_cfg)
    # transformers 5 marks modules initialised after post_init; recompute its sin-cos tables explicitly
    hf.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
    hf.vit.embeddings.initialize_weights()
    hf.decoder.initialize_weights(objective.backbone.num_patches)
    torch.testing.assert_close(objective.backbone.model.pos_embed, hf.vit.embeddings.position_embeddings)
    torch.testing.assert_close(objective.decoder.pos_embed, hf.decoder.decoder_pos_embed)


def test_vitb_recipe_has_reference_parameter_count():
    """MAE ViT-B/16 + 8x512 decoder: the same count as transformers' ViTMAE with the facebook/vit-mae-base shape."""
    objective = build_objective(C.load("mae_vitb"))
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig())  # defaults = vit-mae-base
    ours = sum(p.numel() for p in objective.parameters())
    assert ours == sum(p.numel() for p in hf.parameters()) == 111_907_840


def test_encoder_sees_only_visible_patches():
    """Changing a masked patch must not change the encoder output (MAE §3: encoder on visible tokens only)."""
    objective = build_objective(tiny_cfg()).eval()
    b = objective.backbone
    noise = torch.rand(1, b.num_patches)
    images = torch.randn(1, 3, 32, 32)
    keep = noise.argsort(1)[:, : b.num_patches // 4]
    masked_patch = noise.argsort(1)[0, -1].item()
    r, c = divmod(masked_patch, b.grid_size[1])
    edited = images.clone()
    edited[..., r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 5
    torch.testing.assert_close(b.forward_tokens(images, keep), b.forward_tokens(edited, keep))
    assert b.forward_tokens(images, keep).shape == (1, 1 + b.num_patches // 4, b.embed_dim)


def test_reconstruction_picture_columns():
    objective = build_objective(tiny_cfg())
    images, generator = torch.randn(2, 3, 32, 32), torch.Generator().manual_seed(0)
    pics = objective.visualize({"image": images}, lambda x: (x * 0.2 + 0.5).clamp(0, 1), generator)
    assert set(pics) == {"original", "masked", "recon. (true patch μ/σ)"}
    for img in pics.values():
        assert img.shape == (2, 3, 32, 32) and img.min() >= 0 and img.max() <= 1


def test_vit_size_overrides_on_a_cnn_name_the_key():
    from mmssl.backbones import create_backbone

    with pytest.raises(ValueError, match=r"backbone\.embed_dim.*resnet18"):
        create_backbone("resnet18", img_size=32, embed_dim=64)
