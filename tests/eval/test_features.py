"""Frozen features: layer/pool selection against hand-written forwards, loaders, labels, the disk cache."""

import pytest
import torch
from eval_fixtures import _one_thread  # noqa: F401
from PIL import Image

import mmssl.eval.features as F
from mmssl import config as C
from mmssl.backbones import create_backbone
from mmssl.data.shards import write_shards
from mmssl.data.transforms import eval_view


@pytest.fixture(scope="module")
def vit():
    return create_backbone(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4
    ).eval()


@pytest.fixture(scope="module")
def cnn():
    return create_backbone("resnet18", img_size=32).eval()


def vit_block_tokens(vit, images, i):
    m = vit.model
    x = m.norm_pre(m._pos_embed(m.patch_embed(images)))
    for blk in m.blocks[: i + 1]:
        x = blk(x)
    return m.norm(x)  # (B, 1 + L, D)


@torch.no_grad()
def test_vit_layers_and_pools(vit):
    images = torch.randn(3, 3, 32, 32)
    assert F.resolve_layers(vit, [-1, 0, -3]) == [0, 2]
    default = F.encode(vit, images, [2])
    assert torch.equal(default["layer2"], vit.forward_pooled(images))  # the model's own pooling, bit for bit
    out = F.encode(vit, images, [0, 2], pool="cls")
    for i in (0, 2):
        torch.testing.assert_close(out[f"layer{i}"], vit_block_tokens(vit, images, i)[:, 0])
    avg = F.encode(vit, images, [1], pool="avg")
    torch.testing.assert_close(avg["layer1"], vit_block_tokens(vit, images, 1)[:, 1:].mean(1))
    mixed = F.encode(vit, images, [1, 2])  # default pooling of a CLS model: the CLS token at every layer
    torch.testing.assert_close(mixed["layer2"], vit.forward_pooled(images))
    torch.testing.assert_close(mixed["layer1"], vit_block_tokens(vit, images, 1)[:, 0])


@torch.no_grad()
def test_cnn_stages(cnn):
    images = torch.randn(2, 3, 32, 32)
    m = cnn.model
    assert torch.equal(F.encode(cnn, images, [4])["layer4"], cnn.forward_pooled(images))
    x = m.maxpool(m.act1(m.bn1(m.conv1(images))))
    x2 = m.layer2(m.layer1(x))
    out = F.encode(cnn, images, [2, 4], pool="avg")
    torch.testing.assert_close(out["layer2"], x2.mean(dim=(2, 3)))
    torch.testing.assert_close(out["layer4"], m.layer4(m.layer3(x2)).mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="CLS token"):
        F.encode(cnn, images, [4], pool="cls")
    with pytest.raises(ValueError, match="out of range.*5 feature stages"):
        F.resolve_layers(cnn, [7])


def test_image_folder_and_missing_labels(tmp_path, vit):
    for cls, shade in (("cat", 40), ("dog", 200)):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (40, 36), shade + i).save(tmp_path / "folder" / cls / f"{i}.png")  # grey -> RGB
    loader, n = F.labelled_loader(str(tmp_path / "folder"), eval_view(32), batch_size=4, num_workers=0)
    feats = F.extract(vit, loader, [-1], total=n)
    assert (
        n == 6 and feats.labels.tolist() == [0, 0, 0, 1, 1, 1] and feats.features["layer2"].shape == (6, 64)
    )

    import io

    def png():
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (9, 9, 9)).save(buf, "PNG")
        return buf.getvalue()

    write_shards(({"__key__": f"k{i}", "png": png()} for i in range(5)), tmp_path / "nolabel", "val")
    spec = str(tmp_path / "nolabel" / "val-000000.tar")
    loader, _ = F.labelled_loader(spec, eval_view(32), batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match=r"no label under the key '\.cls'"):
        F.extract(vit, loader, source=spec)


def test_split_features_are_cached(tmp_path, vit, demo_root, monkeypatch):
    monkeypatch.setenv("MMSSL_DATA", demo_root)
    info = {"img_size": 32, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3}
    kw = dict(encoder_id="tiny", layers=[-1, 0], cache_dir=tmp_path / "cache", num_workers=0, crop_pct=1.0)
    first = F.split_features(vit, info, "demo:digits/val", **kw)
    assert len(first) == 540 and set(first.features) == {"layer0", "layer2"}
    assert sorted(first.labels.unique().tolist()) == list(range(10))

    def boom(*args, **kwargs):
        raise AssertionError("extracted again instead of reading the cache")

    monkeypatch.setattr(F, "extract", boom)
    again = F.split_features(vit, info, "demo:digits/val", **kw)
    assert torch.equal(again.labels, first.labels)
    for k in first.features:
        assert torch.equal(again.features[k], first.features[k])
    with pytest.raises(AssertionError, match="extracted again"):  # another pooling is another key
        F.split_features(vit, info, "demo:digits/val", **{**kw, "pool": "avg"})


def test_augment_mode_draws_new_views_every_epoch_reproducibly(tmp_path, vit, demo_root, monkeypatch):
    monkeypatch.setenv("MMSSL_DATA", demo_root)
    info = {"img_size": 32, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3}
    kw = dict(encoder_id="tiny", layers=[-1], num_workers=0, crop_pct=1.0, crop_scale=(0.5, 1.0))
    epochs = F.probe_train_features(vit, info, "demo:digits/val", mode="augment", cache_dir=tmp_path, **kw)
    e0, e1, again = epochs(0), epochs(1), epochs(0)
    fixed = F.probe_train_features(vit, info, "demo:digits/val", mode="cached", cache_dir=tmp_path, **kw)
    assert isinstance(fixed, F.Features)
    assert torch.equal(e0.labels, e1.labels) and torch.equal(
        e0.labels, fixed.labels
    )  # same samples, same order
    assert torch.equal(e0.features["layer2"], again.features["layer2"])  # epoch e: the same draw every time
    for other in (e1, fixed):  # another epoch, and the centre view, see other pixels
        assert (e0.features["layer2"] - other.features["layer2"]).abs().mean() > 1e-3
    reseeded = F.probe_train_features(vit, info, "demo:digits/val", mode="augment", seed=1, **kw)(0)
    assert not torch.equal(reseeded.features["layer2"], e0.features["layer2"])
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # only the cached mode wrote to the cache

    with pytest.raises(C.ConfigError, match="data.augment_copies.*belong to data.mode=cached"):
        C.load("linprobe_mae", ["data.augment_copies=2"], schema=C.LinearProbeConfig)
    assert C.load("linprobe_mae", [], schema=C.LinearProbeConfig).data.mode == "augment"
    assert C.load("linprobe_simclr", [], schema=C.LinearProbeConfig).data.mode == "augment"
    assert C.load("linprobe_digits", [], schema=C.LinearProbeConfig).data.mode == "cached"
