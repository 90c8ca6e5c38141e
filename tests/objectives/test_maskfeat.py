"""MaskFeat: block masking, mask-token replacement inside the encoder, the objective contract, the recipe, and
end-to-end runs through the CLI (learning on held-out digits, 2-process DDP)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, metrics

from mmssl import config as C
from mmssl.factory import build_objective
from mmssl.ops import block_masking

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import masked_report  # noqa: E402
import pretrain  # noqa: E402

TINY = [
    "backbone.img_size=32",
    "backbone.patch_size=16",
    "maskfeat.cell_size=8",  # the paper's 2x2 cells per 16 px patch (the digits demo: 4 px cells of 8 px patches)
    "backbone.depth=2",
    "backbone.embed_dim=64",
    "backbone.num_heads=4",
    "data.num_workers=0",
    "data.shuffle_buffer=100",
    "trainer.log_every_n_steps=1",
]


def tiny(*overrides: str):
    return build_objective(C.load("maskfeat_demo", [*TINY, *overrides]))


def test_block_mask_has_the_ratio_within_one_block():
    """MaskFeat ViT-B: 78 of 196 patches in blocks of >= 15 (SlowFast's loader); the BEiT generator never
    exceeds the count and stops less than one block short of it."""
    masks = block_masking(400, (14, 14), 78, 15, generator=torch.Generator().manual_seed(0))
    counts = masks.sum(dim=1)
    assert masks.shape == (400, 196) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert counts.max() <= 78 and counts.min() > 78 - 15
    assert counts.mean() / 196 == pytest.approx(0.4, abs=0.01)


def test_block_mask_is_deterministic_for_a_seed():
    def draw(seed):
        return block_masking(16, (14, 14), 78, 15, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    torch.manual_seed(5)
    first = block_masking(4, (6, 6), 14, 2)
    torch.manual_seed(5)
    assert torch.equal(block_masking(4, (6, 6), 14, 2), first)  # the global RNG (seed_everything) too


def test_block_masks_are_blocky():
    """Masked patches come in rectangles: far more masked neighbours than a random mask of the same ratio."""
    g = torch.Generator().manual_seed(0)
    blocks = block_masking(200, (14, 14), 78, 15, generator=g).view(200, 14, 14)
    random = (
        (torch.rand(200, 14, 14, generator=g).flatten(1).argsort(1).argsort(1) < 78).float().view(200, 14, 14)
    )

    def neighbour_fraction(m):  # of masked patches, those whose right neighbour is masked too
        return ((m[:, :, :-1] * m[:, :, 1:]).sum() / m[:, :, :-1].sum()).item()

    assert neighbour_fraction(blocks) > 0.75 > 0.5 > neighbour_fraction(random)


def test_masked_patches_are_replaced_by_the_mask_token_in_the_encoder():
    """Editing a masked patch's pixels changes the HOG target but not one prediction: the encoder never sees
    it. Editing a visible patch changes the predictions (the test would fail if masking did nothing)."""
    objective = tiny("backbone.img_size=64").eval()
    images = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16)
    mask[0, [5, 6, 9, 10]] = 1
    base = objective({"image": images}, mask=mask)

    edited = images.clone()
    edited[..., 16:32, 16:32] = torch.randn(3, 16, 16) * 3  # patch 5 (row 1, col 1): masked
    out = objective({"image": edited}, mask=mask)
    torch.testing.assert_close(out["pred"], base["pred"])
    assert not torch.allclose(objective.target(edited), objective.target(images))
    assert out["loss"] != base["loss"]  # the target did change

    edited = images.clone()
    edited[..., 0:16, 0:16] = torch.randn(3, 16, 16) * 3  # patch 0: visible
    assert not torch.allclose(objective({"image": edited}, mask=mask)["pred"], base["pred"])


def test_mask_token_enters_before_the_position_embedding():
    objective = tiny()
    b = objective.backbone
    mask = torch.ones(2, b.num_patches)
    tokens = b.embed_patches(torch.randn(2, 3, 32, 32), mask, objective.mask_token)
    expected = objective.mask_token + b.model.pos_embed[:, b.num_prefix_tokens :]
    torch.testing.assert_close(tokens, expected.expand(2, -1, -1))
    with pytest.raises(ValueError, match="mask_token"):
        b.embed_patches(torch.randn(2, 3, 32, 32), mask)


def test_loss_is_mse_on_masked_patches_only():
    objective = tiny()
    images = torch.randn(3, 3, 32, 32)
    out = objective({"image": images})
    target = objective.target(images)
    per_patch = ((out["pred"] - target) ** 2).mean(dim=-1)
    m = out["mask"].bool()
    assert out["pred"].shape == target.shape == (3, 4, 108)
    assert out["loss"].item() == pytest.approx(per_patch[m].mean().item(), rel=1e-6)
    assert 0 < m.sum() < m.numel()


def test_no_token_is_exempt_from_weight_decay():
    # gradients and frozen parameters: tests/objectives/test_contract.py (MaskFeat freezes nothing); SlowFast decays every
    # token (tests/test_optim.py)
    assert tiny().no_weight_decay() == set()


def test_bf16_autocast_keeps_the_target_in_fp32():
    objective = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective({"image": torch.randn(2, 3, 32, 32)})
    assert out["pred"].dtype == torch.bfloat16 and torch.isfinite(out["loss"])
    assert objective.target(torch.randn(2, 3, 32, 32)).dtype == torch.float32


def test_overfits_one_batch_of_real_photos_far_below_the_best_constant():
    """Eight 48 px crops of scikit-image photographs, one fixed block mask, 80 AdamW steps with fixed seeds: the
    masked-patch loss ends below half of the best constant prediction's (the mean HOG of those masked patches),
    so the target, the mask-token path and the head learn together (starts near predicting zeros, 1/9)."""
    import numpy as np
    import skimage.data

    torch.manual_seed(0)
    photos = [np.asarray(getattr(skimage.data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    crops = [p[t : t + 48, c : c + 48, :3].copy() for p in photos for t, c in ((60, 200), (150, 100))]
    images = torch.stack([torch.from_numpy(c).permute(2, 0, 1) for c in crops]).float() / 255
    objective = tiny("backbone.img_size=48")
    mask = objective.draw_mask(8, images.device)  # 4 of 9 patches each
    masked = objective.target(images)[mask.bool()]  # (32, 108)
    constant = ((masked - masked.mean(dim=0)) ** 2).mean().item()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=2e-3)
    losses = []
    for _ in range(80):
        loss = objective({"image": images}, mask=mask)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > constant and losses[-1] < 0.5 * constant, (losses[0], losses[-1], constant)


def test_constructor_refuses_inconsistent_paths():
    from mmssl.objectives.masked import MaskedModeling

    objective = tiny()
    b, t, head = objective.backbone, objective.target, objective.head
    with pytest.raises(ValueError, match="not both"):
        MaskedModeling(b, t, decoder=head, head=head)
    with pytest.raises(ValueError, match="block masks"):
        MaskedModeling(b, t, decoder=head, mask="block")
    with pytest.raises(ValueError, match="mask must be one of"):
        MaskedModeling(b, t, head=head, mask="grid")
    random = MaskedModeling(b, t, head=head, mask="random", mask_ratio=0.5)  # SimMIM-style, same code
    assert random({"image": torch.randn(2, 3, 32, 32)})["mask"].sum(1).tolist() == [2.0, 2.0]


def test_the_design_example_runs_without_lightning():
    from mmssl.backbones import create_backbone
    from mmssl.objectives.masked import MaskedModeling
    from mmssl.targets.hog import HOGTarget

    vit = create_backbone("vit_tiny_patch16_224", img_size=64, depth=2)
    objective = MaskedModeling(vit, target=HOGTarget(patch_size=16), mask="block", mask_ratio=0.4)
    out = objective({"image": torch.randn(2, 3, 64, 64)})
    out["loss"].backward()
    assert out["pred"].shape == (2, 16, 108) and out["mask"].sum(1).tolist() == [6.0, 6.0]


def test_visualize_draws_hog_glyph_columns():
    objective = tiny()
    images, generator = torch.randn(2, 3, 32, 32), torch.Generator().manual_seed(0)
    pics = objective.visualize({"image": images}, lambda x: (x * 0.2 + 0.5).clamp(0, 1), generator)
    assert list(pics) == ["original", "masked", "HOG input", "HOG predicted"]
    for img in pics.values():
        assert img.shape == (2, 3, 64, 64) and img.min() >= 0 and img.max() <= 1


def test_config_errors_name_the_key():
    with pytest.raises(C.ConfigError, match="maskfeat.mask_ratio"):
        C.load("maskfeat_demo", ["maskfeat.mask_ratio=0"])
    with pytest.raises(C.ConfigError, match="maskfeat.gradient"):
        C.load("maskfeat_demo", ["maskfeat.gradient=prewitt"])
    with pytest.raises(ValueError, match="patch size 8 is not a multiple of the cell size 12"):
        build_objective(C.load("maskfeat_demo", ["maskfeat.cell_size=12"]))


def test_print_config_shows_the_vitb_recipe(capsys):
    assert pretrain.main(["--cfg", "maskfeat_vitb.yaml", "--print-config"]) == 0
    out = capsys.readouterr().out
    for line in ["objective: maskfeat", "mask_ratio: 0.4", "cell_size: 8", "nbins: 9", "gradient: sobel",
                 "base_lr: 0.0002", "weight_decay: 0.05", "- 0.999", "warmup_epochs: 30.0", "max_epochs: 300",
                 "gradient_clip_val: 0.02", "- 0.5", "batch_size: 256", "global_batch: 2048"]:  # fmt: skip
        assert line in out, line
    assert "mae:" not in out
    # ViT-B/16 (85,798,656) + mask token (768) + linear head 768 -> 108 (83,052): MMPretrain's 85.88 M
    assert "85,882,476 parameters" in out
    assert C.learning_rate(C.load("maskfeat_vitb")) == pytest.approx(2e-4 * 2048 / 256)


def test_demo_and_digits_recipes_train_the_same():
    """maskfeat_demo is maskfeat_digits (tools/digits_table.py's recipe), so the README's demo figures are the
    table's: the two differ only in their name and how often they save checkpoints and pictures."""
    demo, digits = (C.to_dict(C.load(name)) for name in ("maskfeat_demo", "maskfeat_digits"))
    for cfg in (demo, digits):
        del cfg["name"]
        for key in ("ckpt_every_n_steps", "picture_every_n_steps"):
            del cfg["trainer"][key]
    assert demo == digits


# The demo recipe (maskfeat_demo: 3040 steps, 21.1 % below the best constant and 50.7 % below the nearest copy
# at its end, README "MaskFeat") takes 4-10 minutes on 2 cores, too long for CI: here its schedule is annealed
# over STEPS steps instead (73 s on the 2-core machine, load 1.5). Measured at this length: held-out MSE 0.06612,
# 7.4 % below the best constant (0.07139) and 42.2 % below the nearest copy (0.11440). A model that learnt only
# the training set's mean HOG sits at or below 0 %; the 15 % bar needs the whole schedule (README).
STEPS = 1000
MIN_BELOW_CONSTANT, MIN_BELOW_COPY = 0.05, 0.40


@pytest.mark.slow
def test_demo_run_learns_hog_of_held_out_digits(tmp_path, demo_root, capsys, monkeypatch):  # noqa: F811
    """The demo recipe (ViT 128 x 4, 32 px digits, 8 px patches of 4 px HOG cells) shortened to STEPS steps of
    64. The run ends with its own held-out report (tools/pretrain.py -> masked_report.json, fixed masks): on the
    540 val digits the masked-patch loss is below the best constant prediction (the mean HOG of those very
    patches) and far below copying the nearest visible patch's HOG; tools/masked_report.py agrees."""
    run = tmp_path / "learn"
    args = ["--cfg", "maskfeat_demo", f"out_dir={tmp_path}", "name=learn", f"trainer.max_steps={STEPS}",
            "trainer.progress_bar=false"]  # fmt: skip
    res = cli(args, demo_root, timeout=900)  # a hang guard
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out masked-patch MSE" in res.stdout, res.stdout[-2000:]
    assert (run / "pictures" / "final.png").stat().st_size > 5_000

    train = [float(r["train/loss"]) for r in metrics(run) if r.get("train/loss")]
    assert sum(train[-10:]) / 10 < 0.95 * train[0], train  # the training views: noisy, near their constant
    report = json.loads((run / "masked_report.json").read_text())
    assert report["patches"] > 3000, report  # 540 digits, 6 of 16 patches masked (blocks may stop one short)
    assert report["below_constant"] > MIN_BELOW_CONSTANT, report
    assert report["below_copy"] > MIN_BELOW_COPY, report

    monkeypatch.setenv("MMSSL_DATA", demo_root)  # where the run's demo:digits/val shards are
    capsys.readouterr()
    assert masked_report.main([str(run / "checkpoints" / "last.ckpt")]) == 0
    tool = json.loads(capsys.readouterr().out)
    assert tool["model"] == pytest.approx(report["model"], rel=1e-6), (tool, report)
