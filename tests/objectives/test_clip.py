"""CLIP: parity with open_clip's model + ClipLoss and a manual formula, gradients, the temperature clamp,
weight-decay groups, local weights for both image towers, and the offline refusal of hub weights."""

from __future__ import annotations

import math
import time

import lightning.pytorch as L
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmssl import config as C
from mmssl.data import shapes
from mmssl.data.transforms import eval_view
from mmssl.factory import build_backbone, build_objective, build_tokenizer
from mmssl.lit import PretrainModule
from mmssl.objectives.clip import open_clip_model, open_clip_text_tower, text_features
from mmssl.optim import create_optimizer

TINY = [
    "backbone.img_size=32",
    "backbone.depth=1",
    "backbone.embed_dim=64",
    "backbone.num_heads=2",
    "clip.embed_dim=32",
    "clip.text_cfg={context_length: 16, width: 32, heads: 2, layers: 1}",
]
OPEN_CLIP_TOWER = [
    "clip.image_tower=open_clip",
    "clip.vision_cfg={layers: 1, width: 64, head_width: 32, patch_size: 8}",
]


def tiny(*overrides: str):
    return C.load("clip_demo", [*TINY, *overrides])


def batch(cfg, n: int = 6, seed: int = 0) -> dict:
    """Random images with real shapes captions ("a small red circle at the top left"), tokenised."""
    captions = [caption for _, _, caption, _, _ in shapes.samples("train", n, seed)]
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "tokens": build_tokenizer(cfg)(captions)}


def reference_model(cfg) -> torch.nn.Module:
    """open_clip's own CustomTextCLIP with the same architecture, built independently of mmssl."""
    c = cfg.clip
    base = open_clip.get_model_config(c.model)
    return open_clip.create_model(
        c.model,
        force_custom_text=True,
        embed_dim=c.embed_dim,
        text_cfg={**base["text_cfg"], **c.text_cfg},
        vision_cfg={**base["vision_cfg"], **c.vision_cfg, "image_size": 32},
    )


def test_loss_matches_open_clip_model_and_clip_loss_and_the_paper_formula():
    cfg = tiny(*OPEN_CLIP_TOWER)
    ours = build_objective(cfg)
    ref = reference_model(cfg)
    ref.visual.load_state_dict(ours.image_tower.state_dict())
    ref.text.load_state_dict(ours.text_tower.state_dict())
    ref.logit_scale.data.copy_(ours.logit_scale.data)
    b = batch(cfg)
    out = ours(b)
    image, text, scale = ref(b["image"], b["tokens"])  # normalised features and exp(logit_scale)
    assert torch.allclose(out["image_features"], image, atol=1e-6)
    assert torch.allclose(out["text_features"], text, atol=1e-6)
    expected = open_clip.ClipLoss()(image, text, scale)
    assert torch.allclose(out["loss"], expected, atol=1e-6)
    # the paper's pseudo-code (Fig. 3): symmetric cross-entropy over scaled cosine similarities
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(len(logits))
    manual = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(out["loss"], manual, atol=1e-5)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)  # CLIP §2.5


def test_text_features_cut_after_the_last_end_token_equal_the_towers_own():
    """The text path runs only up to the batch's last end token (objectives/clip.py ``text_features``): features
    and every parameter's gradient equal open_clip's full-context forward; a 'last'-pooled tower is not cut."""
    torch.manual_seed(0)
    tower = open_clip_text_tower(
        "ViT-B-32", embed_dim=32, text_cfg={"context_length": 32, "width": 32, "heads": 2, "layers": 2}
    )
    captions = ["a cat", "a small red circle at the top left of a big blue square", "dog"]
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=32)(captions)
    assert int(tokens.argmax(-1).max()) + 1 < 32  # the cut path runs
    grads = []
    for fn in (text_features, lambda t, x: t(x)):
        tower.zero_grad()
        out = fn(tower, tokens)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters()}))
    (ours, ours_g), (ref, ref_g) = grads
    assert torch.allclose(ours, ref, atol=1e-6)
    assert ours_g.keys() == ref_g.keys()
    for (
        name,
        g,
    ) in ref_g.items():  # fp32 sums in another order: differences of about 1e-6 of the gradient's scale
        assert (ours_g[name] - g).abs().max() <= 1e-5 * g.abs().max(), name
    tower.pool_type = "last"  # pooled at the last position: every position counts, nothing is cut
    assert torch.equal(text_features(tower, tokens), tower(tokens))


def test_text_tower_alone_is_open_clips_text_tower():
    cfg = tiny()
    objective = build_objective(cfg)  # backbone image tower: the text tower is built on its own
    ref = reference_model(cfg).text
    ours = objective.text_tower
    assert type(ours) is type(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    tokens = batch(cfg)["tokens"]
    ours.load_state_dict(ref.state_dict())
    assert torch.allclose(ours(tokens), ref(tokens), atol=1e-6)


@pytest.mark.parametrize("tower", ["backbone", "open_clip"])
def test_features_are_unit_norm_in_the_joint_space(tower):
    # gradients (the logit scale included) and checkpoints: tests/objectives/test_contract.py
    cfg = tiny(*(OPEN_CLIP_TOWER if tower == "open_clip" else []))
    out = build_objective(cfg)(batch(cfg))
    assert out["image_features"].shape == out["text_features"].shape == (6, 32)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(6), atol=1e-5)


def test_text_must_be_token_ids():
    cfg = tiny()
    objective = build_objective(cfg)
    with pytest.raises(TypeError, match="token ids"):
        objective({"image": torch.randn(2, 3, 32, 32), "tokens": ["a red circle", "a blue star"]})


def test_temperature_clamp_after_each_optimizer_step_through_lightning():
    cfg = tiny()
    objective = build_objective(cfg)
    assert objective.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        objective.logit_scale.fill_(math.log(1000.0))  # far above the cap; one small step cannot undo that
    module = PretrainModule(objective, lr=1e-4, total_steps=2, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    data = [batch(cfg, seed=s) for s in range(2)]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    assert trainer.global_step == 2
    # clamped to ln 100 after step 1; step 2's small update may then lower it a little
    assert math.log(100.0) - 1e-3 < objective.logit_scale.item() <= math.log(100.0) + 1e-7
    with torch.no_grad():
        objective.logit_scale.fill_(-1.0)
    objective.after_optimizer_step()
    assert objective.logit_scale.item() == 0.0  # open_clip clamps to [0, ln 100]


@pytest.mark.parametrize("tower", ["backbone", "open_clip"])
def test_no_weight_decay_on_temperature_gains_and_biases_as_open_clip(tower):
    objective = build_objective(tiny(*(OPEN_CLIP_TOWER if tower == "open_clip" else [])))
    opt = create_optimizer(objective, "adamw", 1e-3, 0.2, (0.9, 0.98), 1e-6)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.2 for p in g["params"]}

    # open_clip_train/main.py's rule, applied to the same parameters
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    params = list(objective.named_parameters())
    assert no_decay == {id(p) for n, p in params if exclude(n, p)}
    assert decay == {id(p) for n, p in params if not exclude(n, p)}
    assert id(objective.logit_scale) in no_decay
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_open_clip_checkpoint_loads_both_towers_and_temperature(tmp_path, suffix):
    cfg = tiny(*OPEN_CLIP_TOWER)
    c = cfg.clip
    base = open_clip.get_model_config(c.model)
    # a standard (not custom-text) open_clip CLIP, as released checkpoints are laid out
    src = open_clip.create_model(c.model, embed_dim=c.embed_dim, text_cfg={**base["text_cfg"], **c.text_cfg},
                                 vision_cfg={**base["vision_cfg"], **c.vision_cfg, "image_size": 32})  # fmt: skip
    with torch.no_grad():
        src.logit_scale.fill_(math.log(42.0))
    path = tmp_path / f"clip{suffix}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    objective = build_objective(tiny(*OPEN_CLIP_TOWER, f"clip.pretrained={path}"))
    assert torch.equal(objective.text_tower.token_embedding.weight, src.token_embedding.weight)
    assert torch.equal(objective.text_tower.text_projection, src.text_projection)
    assert torch.equal(objective.image_tower.conv1.weight, src.visual.conv1.weight)
    assert objective.logit_scale.exp().item() == pytest.approx(42.0, rel=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_timm_weights_load_into_the_backbone_tower(tmp_path, suffix):
    cfg = tiny()
    torch.manual_seed(123)
    source = build_backbone(cfg).model  # e.g. an MAE-pretrained encoder exported as a timm state dict
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(0)
    objective = build_objective(tiny(f"clip.backbone_weights={path}"))
    for name, value in source.state_dict().items():
        assert torch.equal(objective.backbone.model.state_dict()[name], value), name

    with pytest.raises(ValueError, match=r"clip\.backbone_weights=.*does not fit backbone"):
        build_objective(tiny(f"clip.backbone_weights={path}", "backbone.depth=2"))


def test_hub_weights_are_refused_at_once_without_touching_the_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_network)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", no_network)
    start = time.perf_counter()
    with pytest.raises(C.ConfigError, match=r"config key 'clip\.pretrained'.*not an existing local file"):
        tiny("clip.pretrained=laion2b_s34b_b79k")
    with pytest.raises(C.ConfigError, match=r"config key 'clip\.model'.*hub"):
        tiny("clip.model=hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    with pytest.raises(C.ConfigError, match=r"config key 'clip\.backbone_weights'"):
        tiny("clip.backbone_weights=vit_base_patch16_224.mae")
    # the library function refuses too, before building anything
    with pytest.raises(FileNotFoundError, match=r"clip\.pretrained='openai'.*never downloads"):
        open_clip_model("ViT-B-32", pretrained="openai")
    with pytest.raises(ValueError, match="Hugging Face hub"):
        open_clip_model("roberta-ViT-B-32")
    assert time.perf_counter() - start < 5.0


def test_override_typos_name_the_key():
    with pytest.raises(
        ValueError, match=r"clip\.text_cfg: unknown open_clip CLIPTextCfg field\(s\) \['widht'\]"
    ):
        build_objective(tiny("clip.text_cfg.widht=64"))


def test_vitb32_recipe_has_the_reference_size():
    cfg = C.load("clip_vitb32", ["data.train_shards=/nowhere-{000..001}.tar"])
    assert cfg.optim.betas == [0.9, 0.98] and cfg.optim.eps == 1e-6 and cfg.optim.weight_decay == 0.2
    objective = build_objective(cfg)
    # open_clip ViT-B-32: 151,277,313 parameters (87.8M image tower, 63.4M text tower, 1 temperature)
    assert sum(p.numel() for p in objective.parameters()) == 151_277_313


def test_overfits_one_batch_of_real_shapes_pictures():
    """Learning check on real pictures and captions: 40 AdamW steps (lr 3e-3) on one batch of 16 shapes samples take the
    contrastive loss (3.3 at random init, ln 16 = 2.8 for uniform scores) below half; a broken gradient path
    (e.g. detached features or a frozen tower) does not get there."""
    cfg = tiny()
    torch.manual_seed(0)
    objective = build_objective(cfg)
    view = eval_view(32, crop_pct=1.0)
    rows = list(shapes.samples("train", 16, 3))
    b = {
        "image": torch.stack([view(img)["image"] for _, img, _, _, _ in rows]),
        "tokens": build_tokenizer(cfg)([caption for _, _, caption, _, _ in rows]),
    }
    opt = create_optimizer(objective, "adamw", 3e-3, 0.2, (0.9, 0.98), 1e-6)
    first = objective(b)["loss"].item()
    for _ in range(40):
        loss = objective(b)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        objective.after_optimizer_step()
    last = objective(b)["loss"].item()
    assert first > 0.9 * math.log(16), first
    assert last < 0.5 * first, (first, last)
