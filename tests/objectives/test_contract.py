"""The objective contract (objectives/base.py; DESIGN.md §6.1, §9) for every entry of the objective table, on a
batch that the entry's own data views make from real pictures with captions and conversations:

* a finite scalar loss, in training (train view) and in eval mode (validation view);
* every trainable parameter gets a gradient, no frozen one does, and the frozen set is the documented one;
* ``no_weight_decay`` names exist; ``visualize`` draws (B, 3, H, W) pictures in [0, 1];
* a checkpoint round trip through ``factory.objective_from_checkpoint`` (the files named by the spec's
  ``weight_files`` gone, the ``data_buffers`` kept by a random-init baseline) and ``factory.load_encoder``;
* ``save_parts`` writes its files; every export format loads back in its own library.

A new table entry fails ``test_every_table_entry_has_tiny_configs`` until it gets tiny configs below; then
every check here covers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mmssl import config as C
from mmssl import factory
from mmssl.checkpoints import CheckpointError
from mmssl.data import shapes
from mmssl.data.shards import collate
from mmssl.data.transforms import ApplyView, CaptionTokens
from mmssl.export import export_backbone
from mmssl.lit import PretrainModule
from mmssl.objectives.base import BATCH_KEYS
from mmssl.viz import Denormalize
from mmssl.vlm.decoders import save_decoder, tiny_llama, word_tokenizer
from mmssl.vlm.prompt import ASSISTANT, USER

VIT = ["backbone.name=vit_tiny_patch16_224", "backbone.img_size=32", "backbone.patch_size=8",
       "backbone.depth=2", "backbone.embed_dim=32", "backbone.num_heads=2"]  # fmt: skip
TEXT = ["clip.embed_dim=16", "clip.text_cfg={context_length: 16, width: 32, heads: 2, layers: 1}"]
LLAVA = [*VIT, "data.img_size=null", "llava.vision=backbone", "llava.decoder=DECODER", "llava.system=''"]


@dataclass(frozen=True)
class Tiny:
    recipe: str
    overrides: tuple[str, ...]
    frozen: tuple[str, ...] = ()  # parameter names (or name prefixes ending in ".") that must not train


# objective -> variant -> tiny config. Frozen sets: MAE's fixed sin-cos position embeddings (MAE §A.1);
# SimCLR's last BN has no shift (reference center=False); LLaVA's encoder never trains, its decoder from stage 2.
TINY: dict[str, dict[str, Tiny]] = {
    "mae": {"vit": Tiny("mae_demo", (*VIT, "mae.decoder_embed_dim=16", "mae.decoder_depth=1",
                                      "mae.decoder_num_heads=2"), ("backbone.model.pos_embed", "decoder.pos_embed"))},
    "maskfeat": {
        "vit": Tiny("maskfeat_demo", (*VIT, "backbone.patch_size=16")),
        "pixel_hog": Tiny("maskfeat_pixel_hog_demo", (*VIT, "backbone.patch_size=16")),
    },
    "simclr": {
        "resnet": Tiny("simclr_digits", ("backbone.name=resnet10t", "backbone.img_size=32"), ("head.mlp.4.bias",)),
        "vit": Tiny("simclr_digits", (*VIT, "simclr.proj_hidden_dim=32", "simclr.proj_out_dim=16"),
                    ("head.mlp.4.bias",)),
    },
    "clip": {
        "backbone_tower": Tiny("clip_demo", (*VIT, *TEXT)),
        "open_clip_tower": Tiny("clip_demo", (*VIT, *TEXT, "clip.image_tower=open_clip",
                                              "clip.vision_cfg={layers: 1, width: 32, head_width: 16, patch_size: 8}")),
        "flip": Tiny("flip_demo", (*VIT, *TEXT, "clip.image_mask_ratio=0.75")),
    },
    "siglip": {"backbone_tower": Tiny("siglip_demo", (*VIT, *TEXT))},
    # SLIP: CLIP + SimCLR on one backbone; SLIP's head ends in a Linear (no frozen BN shift)
    "compose": {"slip": Tiny("slip_demo", (*VIT, *TEXT, "simclr.proj_hidden_dim=32", "simclr.proj_out_dim=16"))},
    "igpt": {
        mode: Tiny("igpt_demo", (f"igpt.mode={mode}", "igpt.resolution=8", "igpt.embed_dim=32", "igpt.depth=2",
                                 "igpt.num_heads=2", "igpt.resize_range=[1.0,1.0]"))
        for mode in ("ar", "bert")
    },
    "llava": {
        "stage1": Tiny("llava_demo_stage1", tuple(LLAVA), ("vision.", "decoder.")),
        "stage2": Tiny("llava_demo_stage2", (*LLAVA, "llava.projector_weights=null"), ("vision.",)),
    },
}  # fmt: skip
CASES = [(name, variant) for name, variants in TINY.items() for variant in variants]


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """A tiny Llama with a word vocabulary covering the shapes captions and conversations."""
    rows = list(shapes.samples("train", 64, seed=0))
    texts = [USER, ASSISTANT] + [cap for _, _, cap, _, _ in rows]
    texts += [t["value"].replace("<image>", " ") for *_, meta in rows for t in meta["conversations"]]
    tokenizer = word_tokenizer(texts)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("decoder")
    save_decoder(
        tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2), tokenizer, folder
    )
    return folder


def tiny_config(name: str, variant: str, decoder_dir) -> C.DictConfig:
    t = TINY[name][variant]
    overrides = [o.replace("DECODER", str(decoder_dir)) for o in t.overrides]
    return C.load(t.recipe, [f"objective={name}", *overrides])


def make_batch(cfg, spec, train: bool, n: int = 4, seed: int = 0) -> dict:
    """What the data pipeline gives the objective: the spec's view of real pictures, their labels, captions
    (tokenised in the "workers" when the spec says so) and conversations, collated."""
    train_view, val_view = spec.views(cfg)
    text_fn = CaptionTokens(spec.tokenizer(cfg)) if spec.text == "tokens" else None
    apply = ApplyView(train_view if train else val_view, text_fn)
    rows = shapes.samples("train", n, seed)
    batch = collate(
        [apply({"image": img, "label": c, "caption": cap, "json": meta}) for _, img, cap, c, meta in rows]
    )
    assert set(batch) <= set(BATCH_KEYS), f"undeclared batch keys {set(batch) - set(BATCH_KEYS)}"
    return batch


def frozen_expected(name: str, expected: tuple[str, ...]) -> bool:
    return any(name == e or (e.endswith(".") and name.startswith(e)) for e in expected)


@pytest.mark.parametrize("name, variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_forward_backward_and_pictures(name, variant, decoder_dir):
    cfg = tiny_config(name, variant, decoder_dir)
    spec = factory.spec_of(cfg)
    torch.manual_seed(0)
    objective = spec.build(cfg).train()
    out = objective(make_batch(cfg, spec, train=True))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]), out["loss"]
    assert all(torch.isfinite(v) for v in out.values() if isinstance(v, torch.Tensor) and v.ndim == 0)
    out["loss"].backward()
    params = dict(objective.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    assert frozen == {n for n in params if frozen_expected(n, TINY[name][variant].frozen)}
    assert not [n for n, p in params.items() if p.requires_grad and p.grad is None], (
        "trainable without gradient"
    )
    assert not [n for n, p in params.items() if not p.requires_grad and p.grad is not None], (
        "frozen with gradient"
    )
    assert all(torch.isfinite(p.grad).all() for p in params.values() if p.grad is not None)
    assert sum(p.grad.abs().sum() for p in params.values() if p.grad is not None) > 0
    if hasattr(objective, "no_weight_decay"):
        assert objective.no_weight_decay() <= set(params)

    objective.eval()
    val = make_batch(cfg, spec, train=False, seed=1)
    with torch.no_grad():
        assert torch.isfinite(objective(val)["loss"])
    if hasattr(objective, "visualize"):
        image = val.get("image", val.get("view1"))
        generator = torch.Generator().manual_seed(0)  # pictures draw only from their own generator
        pictures = objective.visualize(val, Denormalize(cfg.data.mean, cfg.data.std), generator)
        assert pictures
        for key, picture in pictures.items():  # (B, 3, H, W); H, W may be upscaled (HOG glyphs)
            assert picture.ndim == 4 and picture.shape[:2] == image.shape[:2], (key, picture.shape)
            assert picture.min() >= 0 and picture.max() <= 1, key


def save_checkpoint(objective, cfg, path, missing_files: tuple[str, ...]) -> None:
    """A pretrain checkpoint as tools/pretrain.py writes it; the config names weight files that do not exist."""
    module = PretrainModule(objective, lr=1e-3, total_steps=1, config=C.to_dict(cfg))
    hparams = dict(module.hparams)
    for key in missing_files:
        section, field = key.split(".")
        hparams["config"][section][field] = str(path.parent / f"gone-{key}")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "global_step": 7}, path)


@pytest.mark.parametrize("name, variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_checkpoint_round_trip(name, variant, decoder_dir, tmp_path):
    cfg = tiny_config(name, variant, decoder_dir)
    spec = factory.spec_of(cfg)
    torch.manual_seed(1)
    objective = spec.build(cfg).eval()
    with torch.no_grad():  # trained weights: nothing a fresh build could reproduce
        for p in objective.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "last.ckpt"
    save_checkpoint(objective, cfg, path, spec.weight_files)

    loaded, loaded_cfg = factory.objective_from_checkpoint(path)
    assert loaded_cfg.objective == name and not loaded.training
    saved = objective.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key]), key
    batch = make_batch(cfg, spec, train=False)
    with torch.no_grad():
        torch.manual_seed(2)
        expected = objective(batch)["loss"]
        torch.manual_seed(2)
        assert torch.equal(loaded(batch)["loss"], expected)

    baseline, _ = factory.objective_from_checkpoint(path, random_init=True, seed=0)
    fresh = baseline.state_dict()
    data = [k for k in saved if k.startswith(spec.data_buffers)]
    assert all(torch.equal(fresh[k], saved[k]) for k in data)
    learned = [k for k, p in objective.named_parameters() if p.requires_grad]
    assert not any(torch.equal(fresh[k], saved[k]) for k in learned)

    if spec.encoder is None or not hasattr(objective, spec.encoder):
        with pytest.raises(CheckpointError, match="encoder"):
            factory.load_encoder(path)
        return
    encoder, info = factory.load_encoder(path)
    own = getattr(objective, spec.encoder).state_dict()
    assert encoder.state_dict().keys() == own.keys()
    assert all(torch.equal(v, own[k]) for k, v in encoder.state_dict().items())
    if not spec.timm_encoder:  # evaluated like any encoder, but not a timm model: export refuses it by name
        with pytest.raises(ValueError, match="not a timm model"):
            export_backbone(encoder, path.parent / "export", img_size=8, mean=[0.5] * 3, std=[0.5] * 3)
    assert info["objective"] == name and info["global_step"] == 7
    untrained, _ = factory.load_encoder(path, random_init=True)
    assert not torch.equal(next(iter(untrained.parameters())), next(iter(encoder.parameters())))


@pytest.mark.parametrize("name", [n for n, s in factory.OBJECTIVES.items() if s.save_parts is not None])
def test_save_parts_writes_files(name, decoder_dir, tmp_path):
    cfg = tiny_config(name, next(iter(TINY[name])), decoder_dir)
    spec = factory.OBJECTIVES[name]
    objective = spec.build(cfg)
    spec.save_parts(objective, tmp_path / "parts", objective.state_dict())
    assert any((tmp_path / "parts").iterdir())


EXPORTS = [(name, fmt) for name, spec in factory.OBJECTIVES.items() for fmt in spec.exports]


@pytest.mark.parametrize("name, fmt", EXPORTS, ids=[f"{n}-{f}" for n, f in EXPORTS])
def test_whole_objective_exports_load_back_in_their_own_library(name, fmt, decoder_dir, tmp_path):
    """Each of the spec's export formats (factory/exports.py) writes a folder that its own library (transformers,
    open_clip) loads back computing what the objective computes."""
    cfg = tiny_config(name, next(iter(TINY[name])), decoder_dir)
    spec = factory.OBJECTIVES[name]
    torch.manual_seed(0)
    objective = spec.build(cfg).eval()
    export = spec.exports[fmt]
    folder = export.save(cfg, objective, tmp_path / fmt)
    assert folder.is_dir() and any(folder.iterdir())
    assert export.round_trip(objective, folder) < 1e-4


def test_every_table_entry_has_tiny_configs():
    assert set(TINY) == set(factory.OBJECTIVES)
    assert set(factory.OBJECTIVES) == set(C.objective_names())  # one config section per entry
