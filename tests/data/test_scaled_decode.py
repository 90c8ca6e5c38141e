"""Decoding at the size the crop needs (``ScaledRandomResizedCrop``, ``SampleDecoder(lazy=True)``): torchvision's
crop boxes, pixels close to a full decode, and corrupt files still skipped and counted."""

import io
import logging

import numpy as np
import pytest
import skimage.data
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2 as T
from PIL import Image
from scipy.stats import ks_2samp

from mmssl.data.shards import SampleDecoder, collate, expand_shards, train_pipeline, write_shards
from mmssl.data.transforms import (
    MAX_REDUCE,
    DecodeError,
    EncodedJpeg,
    HorizontalFlip,
    ScaledRandomResizedCrop,
    crop_box,
    defer_normalize,
    jpeg_header,
    jpeg_to_tensor,
    mae_view,
)


def photo_jpeg(side: int = 1536, quality: int = 90) -> bytes:
    """A real photograph (scikit-image's astronaut) at web size, as JPEG."""
    img = Image.fromarray(skimage.data.astronaut()).resize((side, side * 3 // 4), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return photo_jpeg()


def test_boxes_are_torchvisions_for_the_same_random_numbers(big_jpeg):
    """Same seed, same box as torchvision v2's RandomResizedCrop; undecoded images are only measured."""
    ours = ScaledRandomResizedCrop(224, (0.2, 1.0))
    theirs = T.RandomResizedCrop(224, scale=(0.2, 1.0))
    reductions = set()
    for seed in range(40):
        img = Image.open(io.BytesIO(big_jpeg))
        torch.manual_seed(seed)
        top, left, h, w, reduce = ours.params(img)
        torch.manual_seed(seed)
        p = theirs.make_params([img])
        assert (top, left, h, w) == (p["top"], p["left"], p["height"], p["width"])
        assert img.tile, "measuring the box must not decode the image"
        assert min(h, w) >= reduce * 224 and (reduce == MAX_REDUCE or min(h, w) < 2 * reduce * 224)
        reductions.add(reduce)
    assert reductions == {2, 4}  # a 1536x1152 photo at 224 px: half- and quarter-size decodes occur


def test_box_statistics_match_torchvision_get_params(big_jpeg):
    """Independent streams: area fraction and log aspect ratio have torchvision's distributions (KS test)."""
    img = Image.open(io.BytesIO(big_jpeg))
    area = img.width * img.height
    ours = ScaledRandomResizedCrop(224, (0.08, 1.0))
    torch.manual_seed(1)
    a = np.array([ours.params(img)[2:4] for _ in range(3000)], dtype=float)
    torch.manual_seed(2)
    b = np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])[2:4] for _ in range(3000)])
    for stat in (lambda hw: hw[:, 0] * hw[:, 1] / area, lambda hw: np.log(hw[:, 1] / hw[:, 0])):
        assert ks_2samp(stat(a), stat(b)).pvalue > 1e-3
    # and the test can fail: another scale range is told apart
    torch.manual_seed(3)
    other = ScaledRandomResizedCrop(224, (0.2, 1.0))
    c = np.array([other.params(img)[2:4] for _ in range(3000)], dtype=float)
    assert ks_2samp(c[:, 0] * c[:, 1] / area, b[:, 0] * b[:, 1] / area).pvalue < 1e-6


@pytest.mark.parametrize("tensor", [False, True], ids=["PIL resize", "torch uint8 resize"])
def test_scaled_decode_gives_torchvisions_pixels_within_interpolation_tolerance(big_jpeg, tensor):
    """A half- or quarter-size DCT decode then an antialiased bicubic resize (PIL's, then a uint8 tensor as in
    mae_view), vs a full decode and torchvision's RandomResizedCrop: closer than torchvision's own bilinear and
    bicubic crops are to each other (mean 1.2-2.1, 99th percentile 8-12 of 255 on this photo; measured here:
    mean 0.4-0.8, 99th percentile 2-5)."""
    crop = ScaledRandomResizedCrop(112, (0.2, 1.0), tensor=tensor)
    reference = T.RandomResizedCrop(112, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    full = Image.open(io.BytesIO(big_jpeg)).convert("RGB")
    reduced = 0
    for seed in range(8):
        lazy = Image.open(io.BytesIO(big_jpeg))
        torch.manual_seed(seed)
        out = crop(lazy)
        ours = out.permute(1, 2, 0).numpy().astype(float) if tensor else np.asarray(out, dtype=float)
        reduced += lazy.width < full.width  # the DCT-scaled decode happened
        torch.manual_seed(seed)
        want = np.asarray(reference(full), dtype=float)
        diff = np.abs(ours - want)
        assert diff.mean() < 1.2 and np.percentile(diff, 99) < 8, (
            seed,
            diff.mean(),
            np.percentile(diff, 99),
        )
        torch.manual_seed(seed + 100)  # a different box is far off: the comparison can fail
        assert np.abs(np.asarray(reference(full), dtype=float) - ours).mean() > 5
    assert reduced == 8  # every box of a 1536 px photo at 112 px allows at least a half-size decode


def test_small_boxes_and_decoded_images_crop_exactly_as_torchvision():
    """No reduction possible (box < 2x output) or the image already decoded: bit-identical to torchvision."""
    img = Image.fromarray(skimage.data.chelsea())
    crop = ScaledRandomResizedCrop(64, (0.2, 1.0))
    reference = T.RandomResizedCrop(64, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    for seed in range(5):
        torch.manual_seed(seed)
        ours = crop(img)
        torch.manual_seed(seed)
        assert np.array_equal(np.asarray(ours), np.asarray(reference(img)))


def test_lazy_decoding_skips_and_counts_truncated_jpegs(tmp_path, big_jpeg, caplog):
    """A JPEG whose header reads but whose data is cut short fails inside the view: skipped and counted as a
    corrupt image, the rest of the stream goes on; a stream of nothing but such files still fails loudly."""
    small = photo_jpeg(side=320)
    truncated = small[: len(small) // 2]
    samples = [{"__key__": f"k{i}", "jpg": truncated if i % 3 == 0 else small, "cls": i} for i in range(12)]
    write_shards(samples, tmp_path, "mixed")
    decoder = SampleDecoder()
    urls = expand_shards(str(tmp_path / "mixed-*.tar"))
    view = mae_view(32)
    assert view.decodes
    pipe = train_pipeline(urls, view, 4, 3, rank=0, world_size=1, seed=0, decoder=decoder, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING, logger="mmssl.data.shards"):
        batches = list(pipe)
    assert len(batches) == 3 and all(b["image"].shape == (4, 3, 32, 32) for b in batches)
    assert decoder.failures["corrupt image"] > 0 and decoder.successes > 0
    assert "corrupt image" in caplog.text

    write_shards([{"__key__": f"t{i}", "jpg": truncated} for i in range(10)], tmp_path, "bad")
    urls = expand_shards(str(tmp_path / "bad-*.tar"))
    decoder = SampleDecoder(max_failures_without_success=10)
    pipe = train_pipeline(urls, view, 4, 3, rank=0, world_size=1, seed=0, decoder=decoder, shuffle_buffer=1)
    with pytest.raises(RuntimeError, match=r"no sample could be decoded.*corrupt image"):
        list(pipe)


def test_jpegs_decode_straight_to_tensors_with_pils_pixels():
    """jpeg_to_tensor: the same pixels as PIL's decode; None for what it leaves to PIL (already decoded, grey,
    corrupt), and a truncated file still fails in the view as a DecodeError (counted by the pipeline)."""
    data = photo_jpeg(side=400)
    x = jpeg_to_tensor(Image.open(io.BytesIO(data)))
    want = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    assert x is not None and x.dtype == torch.uint8 and torch.equal(x, want)
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    grey = io.BytesIO()
    decoded.convert("L").save(grey, "JPEG")
    truncated = data[: len(data) // 2]
    for img in (decoded, Image.open(grey), Image.open(io.BytesIO(truncated))):
        assert jpeg_to_tensor(img) is None
    # 400x300 at 224 px: never a reduced decode, so the view takes the tensor path and then PIL's
    view = mae_view(224)
    with pytest.raises(DecodeError):
        view(Image.open(io.BytesIO(truncated)))
    torch.manual_seed(0)
    via_tensor = view(Image.open(io.BytesIO(data)))["image"]
    torch.manual_seed(0)
    via_pil = view(Image.open(io.BytesIO(data)).convert("RGB"))["image"]
    assert torch.equal(via_tensor, via_pil)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_jpeg_header_reads_the_size_and_components_pil_reads():
    photo = Image.fromarray(skimage.data.chelsea())  # 451 x 300
    exif = Image.Exif()
    exif[0x010F] = "maker"  # an APP1 segment before the frame header
    cases = {
        "baseline": _jpeg(photo),
        "progressive": _jpeg(photo, progressive=True),
        "grey": _jpeg(photo.convert("L")),
        "cmyk": _jpeg(photo.convert("CMYK")),
        "exif+icc": _jpeg(photo, exif=exif, icc_profile=b"\0" * 3000),
        "restart markers": _jpeg(photo, restart_marker_blocks=4),
        "1x1": _jpeg(Image.new("RGB", (1, 1))),
        "portrait": _jpeg(photo.transpose(Image.Transpose.TRANSPOSE)),
    }
    for name, data in cases.items():
        img = Image.open(io.BytesIO(data))
        assert jpeg_header(data) == (*img.size, len(img.getbands())), name
    png = io.BytesIO()
    photo.save(png, "PNG")
    for data in (png.getvalue(), cases["baseline"][:100], b"\xff\xd8" + b"junk" * 10, b""):
        assert jpeg_header(data) is None


def test_crop_box_is_torchvisions_get_params_including_its_fallback():
    """Same seed, same box as torchvision's get_params, also where ten draws miss and it falls back to the
    central crop (a 1000 x 10 strip at scale 0.9-1 never fits an aspect ratio of 3/4-4/3)."""
    fallbacks = 0
    for width, height, scale in ((500, 375, (0.08, 1.0)), (375, 500, (0.2, 1.0)), (1000, 10, (0.9, 1.0)),
                                 (10, 1000, (0.9, 1.0)), (7, 7, (0.5, 1.0)), (500, 375, (0.9, 1.0))):  # fmt: skip
        img = Image.new("RGB", (width, height))
        for seed in range(60):
            torch.manual_seed(seed)
            ours = crop_box(width, height, scale, (3 / 4, 4 / 3))
            after = torch.rand(1)
            torch.manual_seed(seed)
            assert ours == T1.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]), (
                width,
                height,
                seed,
            )
            assert torch.equal(after, torch.rand(1)), "the same random numbers are used up"
            fallbacks += (
                ours == ((height - ours[2]) // 2, (width - ours[3]) // 2, ours[2], ours[3])
                and min(width, height) == 10
            )
    assert fallbacks == 120


def test_flip_is_torchvisions_for_the_same_random_numbers():
    x = torch.arange(2 * 3 * 5, dtype=torch.uint8).view(2, 3, 5)
    for p in (0.5, 0.3):
        flipped = 0
        for seed in range(30):
            torch.manual_seed(seed)
            ours = HorizontalFlip(p)(x)
            torch.manual_seed(seed)
            assert torch.equal(ours, T.RandomHorizontalFlip(p)(x))
            flipped += not torch.equal(ours, x)
        assert 0 < flipped < 30


def test_colour_jpegs_stay_bytes_until_the_view_and_give_the_same_pictures(big_jpeg):
    """SampleDecoder(lazy=True) hands colour JPEGs on as EncodedJpeg (size from the frame header), others as PIL
    images; the view makes bit-identical pictures from either, at full and at reduced decode."""
    decoder = SampleDecoder()
    small = photo_jpeg(side=480)
    grey = _jpeg(Image.open(io.BytesIO(small)).convert("L"))
    out = decoder({"__key__": "k", "__url__": "u", "jpg": small}, lazy=True)
    assert isinstance(out["image"], EncodedJpeg) and out["image"].size == Image.open(io.BytesIO(small)).size
    assert isinstance(decoder({"__key__": "g", "__url__": "u", "jpg": grey}, lazy=True)["image"], Image.Image)
    view = mae_view(112)
    for data in (small, big_jpeg):
        for seed in range(4):
            torch.manual_seed(seed)
            ours = view(decoder({"__key__": "k", "__url__": "u", "jpg": data}, lazy=True)["image"])["image"]
            torch.manual_seed(seed)
            assert torch.equal(ours, view(Image.open(io.BytesIO(data)))["image"])
    tight = SampleDecoder(max_image_pixels=1000)  # the header's size is still checked
    assert tight({"__key__": "b", "__url__": "u", "jpg": small}, lazy=True) is None
    assert tight.failures["decompression bomb"] == 1


def test_channels_last_pictures_make_batches_that_normalise_to_planes():
    """The crop's uint8 pictures are laid out channels-last; collate keeps that layout (a plain copy) and
    NormalizeBatch gives the same contiguous float planes as from a contiguous batch."""
    view, normalize = defer_normalize(mae_view(32))
    data = photo_jpeg(side=320)
    samples = []
    for seed in range(5):
        torch.manual_seed(seed)
        samples.append(view(EncodedJpeg(data, *jpeg_header(data)[:2])))
    assert all(s["image"].permute(1, 2, 0).is_contiguous() for s in samples)
    batch = collate(samples)
    want = torch.stack([s["image"].contiguous() for s in samples])
    assert torch.equal(batch["image"], want) and batch["image"].is_contiguous(
        memory_format=torch.channels_last
    )
    out = normalize(batch)["image"]
    assert out.is_contiguous() and torch.equal(out, normalize({"image": want})["image"])
