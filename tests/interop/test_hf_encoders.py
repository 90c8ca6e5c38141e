"""Encoders -> transformers: the timm ``save_for_hf`` folder through ``AutoModel`` and
``pipeline("image-feature-extraction")`` (ViT and CNN), and ViT encoders as a native ``ViTModel``; outputs equal
mmssl's; encoders a ``ViTModel`` cannot express are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmssl.backbones import create_backbone
from mmssl.data.transforms import eval_view
from mmssl.export import export_backbone
from mmssl.interop import Unsupported
from mmssl.interop.hf_timm import round_trip as timm_round_trip
from mmssl.interop.hf_vit import round_trip as vit_round_trip
from mmssl.interop.hf_vit import save_vit_model

transformers = pytest.importorskip("transformers")
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
VIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def backbone(kind: str):
    torch.manual_seed(0)
    if kind == "vit":
        b = create_backbone("vit_tiny_patch16_224", img_size=32, **VIT)
        with torch.no_grad():
            b.model.cls_token.normal_()  # zero-initialised by timm; make the CLS row carry something
            b.model.pos_embed.normal_(std=0.5)
        return b
    return create_backbone("resnet10t", img_size=32)


def pictures(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (45, 37 + 4 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_the_timm_folder_loads_in_transformers_automodel_and_pipeline(kind, tmp_path):
    enc = backbone(kind).eval()
    export_backbone(enc, tmp_path / "enc", img_size=32, mean=MEAN, std=STD, objective="test")
    folder = tmp_path / "enc_hf"
    assert timm_round_trip(enc, folder) == 0.0  # the same timm model inside TimmWrapperModel
    # a classifier to fine-tune: the exported encoder under a new head (transformers refuses 0 labels)
    classifier = transformers.AutoModelForImageClassification.from_pretrained(folder, num_labels=5).eval()
    with torch.no_grad():
        assert classifier(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 5)

    extractor = transformers.pipeline("image-feature-extraction", model=str(folder), device="cpu")
    pics = pictures()
    got = torch.stack(
        [torch.as_tensor(o).reshape(-1) for o in extractor(pics, pool=True, return_tensors=True)]
    )
    view = eval_view(32, crop_pct=0.875, mean=MEAN, std=STD)  # mmssl's evaluation view (resize, centre crop)
    with torch.no_grad():
        expected = enc.forward_pooled(torch.stack([view(p)["image"] for p in pics]))
    assert (got - expected).abs().max().item() < 1e-5


def test_a_vit_encoder_as_a_native_vitmodel(tmp_path):
    enc = backbone("vit").eval()
    folder = save_vit_model(enc.model, tmp_path / "vit", mean=MEAN, std=STD, interpolation="bicubic")
    hf = transformers.ViTModel.from_pretrained(folder).eval()
    assert type(transformers.AutoModel.from_pretrained(folder)).__name__ == "ViTModel"
    assert vit_round_trip(enc.model, folder) < 1e-5
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls = hf(pixel_values=images).last_hidden_state[:, 0]
        torch.testing.assert_close(cls, enc.forward_pooled(images), atol=1e-5, rtol=1e-5)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    square = pictures(1)[0].resize((32, 32))  # at the input size the processor only rescales and normalises
    pixels = processor(square, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, eval_view(32, crop_pct=1.0, mean=MEAN, std=STD)(square)["image"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"reg_tokens": 4}, "register tokens"), ({"global_pool": "avg"}, "pooling"),
     ({"init_values": 0.1}, "layer scale"), ({"qk_norm": True}, "q/k norm")],
)  # fmt: skip
def test_vits_a_vitmodel_cannot_express_are_refused(kwargs, message, tmp_path):
    enc = create_backbone("vit_tiny_patch16_224", img_size=32, **VIT, **kwargs)
    with pytest.raises(Unsupported, match=message):
        save_vit_model(enc.model, tmp_path / "vit", mean=MEAN, std=STD, interpolation="bicubic")
