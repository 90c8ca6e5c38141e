"""Shard I/O, the defensive decoder and the train/eval pipelines (mmssl.data.shards)."""

import io
import logging
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms as v1
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from mmssl.data.shards import (
    SampleDecoder,
    count_samples,
    eval_pipeline,
    expand_shards,
    set_epoch,
    train_pipeline,
    write_shards,
)
from mmssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_view, mae_view


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(seed: int = 0, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "JPEG")


def write_ids(tmp_path, sizes, prefix="s"):
    """Shards of tiny JPEGs whose ``cls`` is a unique sample id; returns their paths."""
    urls, start = [], 0
    for i, n in enumerate(sizes):
        samples = [{"__key__": f"k{start + j}", "jpg": jpeg(start + j), "cls": start + j} for j in range(n)]
        write_shards(samples, tmp_path, f"{prefix}{i}", maxcount=10**6)
        urls.append(str(tmp_path / f"{prefix}{i}-000000.tar"))
        start += n
    return urls


def drain(pipeline):
    return [b["label"].tolist() for b in pipeline]


# ---------------------------------------------------------------- expand / write / count


def test_expand_shards(tmp_path):
    for name in ("a-000.tar", "a-001.tar", "a-002.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"")
    d = str(tmp_path)
    assert expand_shards(f"{d}/a-{{000..002}}.tar") == [f"{d}/a-00{i}.tar" for i in range(3)]
    assert expand_shards(f"{d}/*.tar") == sorted(str(p) for p in tmp_path.glob("*.tar"))
    assert expand_shards(f"{d}/b.tar::{d}/a-00[01].tar") == [f"{d}/b.tar", f"{d}/a-000.tar", f"{d}/a-001.tar"]
    assert expand_shards("https://host/x-{0..1}.tar::pipe:cat y.tar") == [
        "https://host/x-0.tar",
        "https://host/x-1.tar",
        "pipe:cat y.tar",
    ]
    with pytest.raises(FileNotFoundError, match=r"c-\*\.tar"):
        expand_shards(f"{d}/b.tar::{d}/c-*.tar")
    with pytest.raises(FileNotFoundError, match="1 shard.*a-003.tar"):
        expand_shards(f"{d}/a-{{000..003}}.tar")


def test_write_shards_round_trip_and_manifest(tmp_path):
    samples = [{"__key__": f"x{i}", "jpg": jpeg(i), "cls": i % 3, "txt": f"caption {i} é"} for i in range(7)]
    manifest = write_shards(iter(samples), tmp_path, "train", maxcount=3, info={"note": "n"})
    assert manifest["shards"] == {"train-000000.tar": 3, "train-000001.tar": 3, "train-000002.tar": 1}
    assert manifest["splits"]["train"] == {"shards": 3, "samples": 7, "note": "n"}
    urls = expand_shards(str(tmp_path / "train-{000000..000002}.tar"))
    assert count_samples(urls) == 7
    back = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    assert [s["__key__"] for s in back] == [s["__key__"] for s in samples]
    for raw, orig in zip(back, samples, strict=True):
        assert raw["jpg"] == orig["jpg"]
        assert int(raw["cls"]) == orig["cls"] and raw["txt"].decode() == orig["txt"]

    # A second prefix merges; rewriting a prefix replaces its shards and removes stale files.
    write_shards([{"__key__": "v", "jpg": jpeg()}], tmp_path, "val")
    manifest = write_shards(samples[:2], tmp_path, "train", maxcount=3)
    assert manifest["shards"] == {"train-000000.tar": 2, "val-000000.tar": 1}
    assert manifest["total"] == 3
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert count_samples([str(tmp_path / "val-000000.tar")]) == 1
    (tmp_path / "other.tar").write_bytes(b"")
    assert count_samples([str(tmp_path / "other.tar")]) is None
    with pytest.raises(ValueError, match="no '.'"):
        write_shards([{"__key__": "a.b", "jpg": b""}], tmp_path, "bad")


# ---------------------------------------------------------------- views


def test_views_match_the_reference_transforms():
    """mae_view == MAE main_pretrain.py's torchvision v1 pipeline (same crops and flips; the resize is torch's
    uint8 antialiased bicubic, PIL's in the reference: at most 2 grey levels apart, on noise too);
    eval_view == resize 256 / crop 224."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    tail = [v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    mae = v1.Compose(
        [v1.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=3), v1.RandomHorizontalFlip(), *tail]
    )
    level = 1 / 255 / min(IMAGENET_STD)  # one grey level, normalised
    for seed in range(4):
        torch.manual_seed(seed)
        expected = mae(img)
        torch.manual_seed(seed)
        diff = (mae_view(32)(img)["image"] - expected).abs()
        assert diff.max() <= 2.01 * level and diff.mean() < 0.05 * level, (seed, diff.max() / level)
        torch.manual_seed(seed + 10)  # another crop is far off: the comparison can fail
        assert (mae(img) - expected).abs().mean() > 10 * level
    center = v1.Compose([v1.Resize(36, interpolation=3), v1.CenterCrop(32), *tail])  # 32 / 0.875 = 36.6
    assert torch.allclose(eval_view(32)(img)["image"], center(img), atol=1e-6)


# ---------------------------------------------------------------- decoder


def _png_i16() -> bytes:
    return encode(Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16)))


def _transparent_png(mode: str) -> bytes:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    return encode(img.convert(mode) if mode != "RGBA" else img)


IMAGES = {
    "L": lambda: encode(Image.new("L", (5, 7), 100)),
    "1": lambda: encode(Image.new("1", (5, 7), 1)),
    "P": lambda: encode(Image.new("RGB", (5, 7), (10, 200, 30)).convert("P")),
    "P+transparency": lambda: encode(Image.new("P", (4, 4), 0), transparency=0),
    "RGBA": lambda: _transparent_png("RGBA"),
    "LA": lambda: _transparent_png("LA"),
    "CMYK": lambda: encode(Image.new("CMYK", (6, 6), (0, 255, 255, 0)), "JPEG"),
    "I;16": _png_i16,
    "1x1": lambda: encode(Image.new("RGB", (1, 1), (1, 2, 3)), "JPEG"),
    "webp": lambda: encode(Image.new("RGB", (6, 6), (9, 9, 9)), "WEBP"),
}


@pytest.mark.parametrize("kind", list(IMAGES))
def test_decoder_converts_every_mode_to_rgb(kind):
    out = SampleDecoder()({"__key__": "k", "__url__": "u", "png": IMAGES[kind]()})
    assert out is not None and out["image"].mode == "RGB"
    assert mae_view(32)(out["image"])["image"].shape == (3, 32, 32)
    pixels = np.asarray(out["image"])
    if kind in ("RGBA", "LA", "P+transparency"):
        assert (pixels == 255).all(), "transparent pixels must be composited on white"
    if kind == "I;16":
        assert abs(int(pixels[0, 0, 0]) - round(30000 / 257)) <= 1, "16-bit must be rescaled, not clipped"
    if kind == "CMYK":
        assert pixels[0, 0, 0] > 200 and pixels[0, 0, 1] < 60, "CMYK (0,255,255,0) is red"


def _png_with_declared_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])  # keep depth, colour type, ...
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decoder_skips_and_counts_bad_samples(caplog):
    good = jpeg()
    truncated = jpeg(size=64)[:200]
    dec = SampleDecoder(require_label=True, max_image_pixels=100)
    cases = {
        "corrupt": ({"jpg": b"not an image at all", "cls": b"1"}, "corrupt image"),
        "truncated": ({"jpg": truncated, "cls": b"1"}, "corrupt image"),
        "bomb_header": (
            {"png": _png_with_declared_size(100_000, 100_000), "cls": b"1"},
            "decompression bomb",
        ),
        "bomb_limit": ({"png": encode(Image.new("L", (11, 10))), "cls": b"1"}, "decompression bomb"),
        "nolabel": ({"jpg": good}, "missing label key 'cls'"),
        "badlabel": ({"jpg": good, "cls": b"seven"}, "bad label"),
        "badtext": ({"jpg": good, "cls": b"1", "txt": b"\xff\xfe"}, "non-UTF-8 text"),
        "noimage": ({"cls": b"1", "json": b"{}"}, "missing image key 'jpg;jpeg;png;webp'"),
    }
    with caplog.at_level(logging.WARNING, logger="mmssl.data.shards"):
        for key, (payload, _) in cases.items():
            assert dec({"__key__": key, "__url__": f"shard-{key}.tar", **payload}) is None
    assert dec.failures == Counter(reason for _, reason in cases.values())
    for key, (_, reason) in cases.items():
        assert any(
            key in r.message and f"shard-{key}.tar" in r.message and reason in r.message
            for r in caplog.records
        )
    ok = dec({"__key__": "fine", "__url__": "u", "jpg": good, "cls": b" 3\n", "txt": b"a caption"})
    assert ok["label"] == 3 and ok["caption"] == "a caption" and ok["image"].size == (8, 8)


def test_decoder_warnings_are_rate_limited(caplog):
    dec = SampleDecoder(log_first=2, log_every=5, max_failures_without_success=10**6)
    with caplog.at_level(logging.WARNING, logger="mmssl.data.shards"):
        for i in range(12):
            dec({"__key__": f"k{i}", "__url__": "u", "jpg": b"junk"})
    assert [r.message.split("'")[1] for r in caplog.records] == ["k0", "k1", "k4", "k9"]


@pytest.mark.timeout(60)  # the failure mode being tested is a hang
@pytest.mark.parametrize("num_workers", [0, 1])
def test_all_corrupt_shards_fail_loudly(tmp_path, num_workers):
    for i in range(2):
        write_shards([{"__key__": f"b{j}", "jpg": b"garbage"} for j in range(7)], tmp_path, f"bad{i}")
    urls = expand_shards(str(tmp_path / "bad*.tar"))
    pipe = train_pipeline(urls, mae_view(16), 4, 10, rank=0, world_size=1, seed=0, decoder=SampleDecoder())
    batches = iter(DataLoader(pipe, batch_size=None, num_workers=num_workers))
    try:
        with pytest.raises(RuntimeError, match=r"no sample could be decoded.*corrupt image"):
            list(batches)
    finally:
        # torch leaves the failed iterator in a reference cycle; shutting it down from the garbage
        # collector waits 5 s per worker (MP_STATUS_CHECK_INTERVAL), explicitly it takes milliseconds.
        if num_workers:
            batches._shutdown_workers()


@pytest.mark.timeout(60)
def test_unreadable_or_empty_shards_fail_loudly(tmp_path):
    (tmp_path / "notatar.tar").write_bytes(b"x" * 2000)
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    for name, match in (("notatar.tar", "unreadable shard"), ("empty.tar", "found no sample")):
        urls = [str(tmp_path / name)]
        pipe = train_pipeline(
            urls, mae_view(16), 4, 10, rank=0, world_size=1, seed=0, decoder=SampleDecoder()
        )
        with pytest.raises(RuntimeError, match=match):
            list(pipe)


# ---------------------------------------------------------------- pipelines


def test_train_pipeline_equal_batches_on_uneven_shards(tmp_path):
    urls = write_ids(tmp_path, [1, 7, 40])
    batches_per_worker = 5

    def stream(rank, seed):
        pipe = train_pipeline(
            urls,
            mae_view(16),
            4,
            batches_per_worker,
            rank=rank,
            world_size=2,
            seed=seed,
            decoder=SampleDecoder(),
        )
        return drain(pipe)

    r0, r1 = stream(0, seed=1), stream(1, seed=1)
    assert len(r0) == len(r1) == batches_per_worker and all(len(b) == 4 for b in r0 + r1)
    assert r0 != r1, "ranks must draw different streams"
    assert stream(0, seed=1) == r0, "same seed, same stream"
    assert stream(0, seed=2) != r0
    assert {i for b in r0 + r1 for i in b} <= set(range(48))


def test_train_pipeline_new_pass_new_stream(tmp_path):
    urls = write_ids(tmp_path, [10, 10])
    pipe = train_pipeline(urls, mae_view(16), 4, 3, rank=0, world_size=1, seed=0, decoder=SampleDecoder())
    set_epoch(pipe, 0)
    first = drain(pipe)
    set_epoch(pipe, 1)
    second = drain(pipe)
    set_epoch(pipe, 0)
    assert len(second) == 3 and second != first and drain(pipe) == first


def test_eval_pipeline_every_sample_once(tmp_path):
    sizes = [5, 3, 9, 1, 6]  # 24 samples in 5 shards over 2 ranks x 2 workers
    urls = write_ids(tmp_path, sizes)
    seen, batch_sizes = [], []
    for rank in range(2):
        pipe = eval_pipeline(urls, mae_view(16), 4, rank=rank, world_size=2, decoder=SampleDecoder())
        for batch in DataLoader(pipe, batch_size=None, num_workers=2):
            assert batch["image"].shape[1:] == (3, 16, 16)
            seen += batch["label"].tolist()
            batch_sizes.append(len(batch["label"]))
    assert sorted(seen) == list(range(sum(sizes)))
    assert min(batch_sizes) < 4, "partial last batches are kept"
