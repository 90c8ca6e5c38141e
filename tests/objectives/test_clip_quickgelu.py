"""OpenAI-format CLIP towers get QuickGELU (open_clip issue #771): LLaVA's vision features (penultimate layer,
patch tokens) equal transformers' CLIPVisionModel loaded with the same weights, the CLIP objective's towers equal
open_clip's own OpenAI loader, a weights file that records the other activation is refused naming the config
keys, and GELU versus QuickGELU really changes the features (so the parity can fail).

The weights are random, in OpenAI's layout (visual.conv1, visual.transformer.resblocks.N.attn.in_proj_weight,
...; open_clip's standard ``CLIP`` keeps it), rounded to float16 as OpenAI released them, on a tiny ViT
(56 px, 14 px patches, 3 blocks of width 128) so every test takes well under a second.
"""

from __future__ import annotations

import json
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from mmssl import config as C
from mmssl.factory import build_objective
from mmssl.factory.objectives import _llava_vision
from mmssl.objectives.clip import open_clip_model, recorded_quick_gelu
from mmssl.vlm.vision import VisionTower, create_encoder

NAME = "mmssl-test-ViT-T-14"  # GELU; NAME-quickgelu: QuickGELU, as open_clip's ViT-*-quickgelu configs
QUICK = f"{NAME}-quickgelu"
# Widths that open_clip's build_model_from_openai_state_dict infers back (heads = width // 64).
VISION = {"image_size": 56, "layers": 3, "width": 128, "head_width": 64, "patch_size": 14}
TEXT = {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 1, "layers": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny open_clip model configs (GELU and QuickGELU) and one set of OpenAI-layout weights saved three ways:
    a state dict (named like open_clip's copies of OpenAI's weights) and TorchScript archives built with
    QuickGELU (OpenAI's release format) and with GELU."""
    root = tmp_path_factory.mktemp("openai_clip")
    for name, quick in ((NAME, False), (QUICK, True)):
        cfg = {"embed_dim": 32, "vision_cfg": VISION, "text_cfg": TEXT} | (
            {"quick_gelu": True} if quick else {}
        )
        (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)
    torch.manual_seed(0)
    model = open_clip.create_model(QUICK).eval()  # a standard CLIP: OpenAI's key layout
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # LayerNorm gains and every bias (zero at init) random too
                p.add_(0.2 * torch.randn_like(p))
            p.copy_(p.half().float())  # OpenAI's weights are float16
    state = model.state_dict()
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in state and "visual.conv1.weight" in state
    out = {"state": state, "state_dict": root / "vit_t_14_openai.pt"}
    torch.save(state, out["state_dict"])
    for name, key in ((QUICK, "archive"), (NAME, "gelu_archive")):
        out[key] = root / f"{key}.pt"
        torchscript_archive(name, state).save(str(out[key]))
    return out


def torchscript_archive(name: str, state: dict) -> torch.jit.ScriptModule:
    """A scripted CLIP with OpenAI's archive contents: its state dict plus ``input_resolution`` (which open_clip
    drops when reading an archive), the attention mask a plain attribute, not a state-dict buffer."""
    model = open_clip.create_model(name).eval()
    model.load_state_dict(state)
    mask = model._buffers.pop("attn_mask")
    model.attn_mask = mask
    model.register_buffer("input_resolution", torch.tensor(VISION["image_size"]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        return torch.jit.script(model)


def openai_to_hf_vision(state: dict) -> dict:
    """OpenAI CLIP weights (``visual.*``) -> transformers' ``CLIPVisionModel`` state dict, exactly as transformers'
    models/clip/convert_clip_original_pytorch_to_hf.py copies them (copy_vison_model_and_projection,
    copy_layer, copy_attn_layer, copy_mlp): in_proj split in three for q, k, v; c_fc/c_proj -> fc1/fc2; ln_1/ln_2
    -> layer_norm1/2; ln_pre -> pre_layrnorm. That script is not in the transformers wheel and imports OpenAI's
    ``clip`` package, so the same mapping is written out here."""
    out = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
    }
    blocks = {int(k.split(".")[3]) for k in state if k.startswith("visual.transformer.resblocks.")}
    for p in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{p}"] = state[f"visual.ln_pre.{p}"]
        out[f"vision_model.post_layernorm.{p}"] = state[f"visual.ln_post.{p}"]
        for i in sorted(blocks):
            src, dst = f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
            q, k, v = state[f"{src}attn.in_proj_{p}"].chunk(3, dim=0)
            out |= {
                f"{dst}self_attn.q_proj.{p}": q,
                f"{dst}self_attn.k_proj.{p}": k,
                f"{dst}self_attn.v_proj.{p}": v,
            }
            out[f"{dst}self_attn.out_proj.{p}"] = state[f"{src}attn.out_proj.{p}"]
            out[f"{dst}layer_norm1.{p}"] = state[f"{src}ln_1.{p}"]
            out[f"{dst}layer_norm2.{p}"] = state[f"{src}ln_2.{p}"]
            out[f"{dst}mlp.fc1.{p}"] = state[f"{src}mlp.c_fc.{p}"]
            out[f"{dst}mlp.fc2.{p}"] = state[f"{src}mlp.c_proj.{p}"]
    return out


def hf_llava_features(state: dict, images: torch.Tensor, hidden_act: str = "quick_gelu") -> torch.Tensor:
    """LLaVA-1.5's vision features from transformers: CLIPVisionModel(...).hidden_states[-2][:, 1:]
    (haotian-liu/LLaVA llava/model/multimodal_encoder/clip_encoder.py: mm_vision_select_layer=-2, "patch")."""
    config = CLIPVisionConfig(
        hidden_size=VISION["width"],
        intermediate_size=4 * VISION["width"],  # open_clip's mlp_ratio 4
        num_hidden_layers=VISION["layers"],
        num_attention_heads=VISION["width"] // VISION["head_width"],
        image_size=VISION["image_size"],
        patch_size=VISION["patch_size"],
        hidden_act=hidden_act,  # openai/clip-vit-large-patch14-336's config.json: "quick_gelu"
        layer_norm_eps=1e-5,  # torch's LayerNorm default, as OpenAI's model
        attn_implementation="eager",
    )
    model = CLIPVisionModel(config).eval()
    # the conversion writes CLIPModel's keys (vision_model.*); transformers 5 made CLIPVisionModel flat
    flat = not any(k.startswith("vision_model.") for k in model.state_dict())
    hf_state = {
        k.removeprefix("vision_model.") if flat else k: v for k, v in openai_to_hf_vision(state).items()
    }
    model.load_state_dict(hf_state, strict=True)
    with torch.no_grad():
        return model(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]


def llava_vision(model: str, weights) -> VisionTower:
    """The frozen tower as a run builds it: llava.vision=open_clip:MODEL, llava.vision_weights=FILE."""
    cfg = C.load("llava_demo_stage1", [f"llava.vision=open_clip:{model}", f"llava.vision_weights={weights}"])
    return _llava_vision(cfg)


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(
        n, 3, VISION["image_size"], VISION["image_size"], generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize("form", ["state_dict", "archive"])
def test_llava_features_equal_transformers_clip_vision_model(files, form):
    vision = llava_vision(QUICK, files[form])
    x = images()
    ours = vision(x)
    assert ours.shape == (2, 16, 128)  # 56 px / 14 px: 4 x 4 patch tokens, the CLS token dropped
    torch.testing.assert_close(ours, hf_llava_features(files["state"], x), atol=1e-5, rtol=0)
    assert vision.spec == {"source": "open_clip", "name": QUICK}  # saved parts rebuild the QuickGELU tower


def test_gelu_tower_gives_other_features_and_an_openai_file_name_warns(files):
    """The parity above can fail: the same weights in a GELU tower match transformers only with hidden_act
    "gelu". A state dict cannot tell its activation; a file name that says OpenAI warns."""
    with pytest.warns(UserWarning, match=rf"says OpenAI.*llava\.vision=open_clip:{QUICK}"):
        gelu = llava_vision(NAME, files["state_dict"])
    x = images()
    quick_ref, gelu_ref = hf_llava_features(files["state"], x), hf_llava_features(files["state"], x, "gelu")
    torch.testing.assert_close(gelu(x), gelu_ref, atol=1e-5, rtol=0)
    assert (gelu(x) - quick_ref).abs().max() > 1e-3  # 100 x the parity tolerance (measured: 0.012)


def test_archive_with_the_other_activation_is_refused_naming_the_keys(files):
    assert recorded_quick_gelu(files["archive"]) is True
    assert recorded_quick_gelu(files["gelu_archive"]) is False
    assert recorded_quick_gelu(files["state_dict"]) is None  # same keys for either activation: cannot tell
    with pytest.raises(ValueError, match=rf"llava\.vision=open_clip:{NAME} builds a GELU tower, but "
                       rf"llava\.vision_weights=.*records QuickGELU.*use llava\.vision=open_clip:{QUICK}.*#771"):  # fmt: skip
        llava_vision(NAME, files["archive"])
    with pytest.raises(ValueError, match=rf"builds a QuickGELU tower.*records GELU.*open_clip:{NAME}\. "):
        create_encoder({"source": "open_clip", "name": QUICK}, str(files["gelu_archive"]))
    # the GELU archive into the GELU tower is fine, and equals transformers with hidden_act "gelu"
    gelu = VisionTower(create_encoder({"source": "open_clip", "name": NAME}, str(files["gelu_archive"])),
                       {"source": "open_clip", "name": NAME})  # fmt: skip
    torch.testing.assert_close(
        gelu(images()), hf_llava_features(files["state"], images(), "gelu"), atol=1e-5, rtol=0
    )


def clip_cfg(model: str, weights):
    return C.load(None, ["objective=clip", f"clip.model={model}", f"clip.pretrained={weights}",
                         f"backbone.img_size={VISION['image_size']}", "data.hflip=0"])  # fmt: skip


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # in load_openai_model
@pytest.mark.parametrize("form", ["state_dict", "archive"])
def test_clip_objective_equals_open_clips_openai_loader(files, form):
    """clip.pretrained with a -quickgelu model: both towers equal open_clip's load_openai_model, which builds
    every OpenAI file with QuickGELU (and its own float16 rounding, a no-op on float16 weights)."""
    objective = build_objective(clip_cfg(QUICK, files[form])).eval()
    ref = open_clip.load_openai_model(str(files[form]), precision="fp32", device="cpu").eval()
    x, tokens = images(), torch.randint(1, TEXT["vocab_size"], (2, TEXT["context_length"]))
    with torch.no_grad():
        out = objective({"image": x, "tokens": tokens})
        torch.testing.assert_close(
            out["image_features"], F.normalize(ref.encode_image(x), dim=-1), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            out["text_features"], F.normalize(ref.encode_text(tokens), dim=-1), atol=1e-5, rtol=0
        )


def test_clip_objective_refuses_an_openai_archive_in_a_gelu_model(files):
    with pytest.raises(ValueError, match=rf"clip\.model={NAME} builds a GELU tower, but clip\.pretrained=.*"
                       rf"records QuickGELU.*use clip\.model={QUICK}"):  # fmt: skip
        build_objective(clip_cfg(NAME, files["archive"]))
    with pytest.raises(ValueError, match=r"clip\.model=.*builds a QuickGELU tower.*records GELU"):
        open_clip_model(QUICK, pretrained=str(files["gelu_archive"]))


def test_recipes_name_the_quickgelu_towers():
    cfg = C.load("llava_stage1")
    name = cfg.llava.vision.removeprefix("open_clip:")
    assert name == "ViT-L-14-336-quickgelu" and open_clip.get_model_config(name)["quick_gelu"] is True
    # the same architecture as open_clip's ViT-L-14-336 otherwise (LLaVA-1.5's openai/clip-vit-large-patch14-336)
    plain = open_clip.get_model_config("ViT-L-14-336")
    assert {k: v for k, v in open_clip.get_model_config(name).items() if k != "quick_gelu"} == plain
