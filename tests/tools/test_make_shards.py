"""tools/make_shards.py on an image folder (with a corrupt file) and on a jsonl/csv with captions."""

import csv
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from mmssl.data.shards import SampleDecoder, count_samples, expand_shards

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("make_shards", ROOT / "tools" / "make_shards.py")
make_shards = importlib.util.module_from_spec(spec)
sys.modules["make_shards"] = make_shards  # the --workers pool pickles make_shards.load by module name
spec.loader.exec_module(make_shards)


def save(path: Path, fmt: str, seed: int, mode: str = "RGB") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)).convert(
        mode
    )
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def read_back(out: Path, prefix: str) -> list[dict]:
    urls = expand_shards(str(out / f"{prefix}-*.tar"))
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def test_image_folder_with_classes_and_a_corrupt_file(tmp_path, capsys):
    src = tmp_path / "src"
    originals = {
        "cat/a.jpg": save(src / "cat" / "a.jpg", "JPEG", 0),
        "cat/sub/b.JPEG": save(src / "cat" / "sub" / "b.JPEG", "JPEG", 1),
        "dog/c.png": save(src / "dog" / "c.png", "PNG", 2, "L"),
        "dog/d.bmp": save(src / "dog" / "d.bmp", "BMP", 3),
    }
    (src / "dog" / "broken.jpg").write_bytes(originals["cat/a.jpg"][:100])  # truncated JPEG
    (src / "dog" / "notes.txt").write_text("not an image")
    out = tmp_path / "shards"

    manifest = make_shards.main(
        [str(src), str(out), "--prefix", "train", "--maxcount", "3", "--workers", "1"]
    )

    split = manifest["splits"]["train"]
    assert split["samples"] == 4 and split["shards"] == 2 and split["classes"] == ["cat", "dog"]
    assert [s["path"] for s in split["skipped"]] == [str(src / "dog" / "broken.jpg")]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert count_samples(expand_shards(str(out / "train-*.tar"))) == 4
    assert "broken.jpg" in capsys.readouterr().err

    samples = read_back(out, "train")
    by_bytes = {s.get("jpg", s.get("png")): s for s in samples}
    for rel in ("cat/a.jpg", "cat/sub/b.JPEG", "dog/c.png"):  # stored unchanged
        assert int(by_bytes[originals[rel]]["cls"]) == (0 if rel.startswith("cat") else 1)
    bmp = [s for s in samples if s.get("png") and s["png"] != originals["dog/c.png"]]
    assert len(bmp) == 1 and int(bmp[0]["cls"]) == 1, "BMP re-encoded as PNG"
    decoded = SampleDecoder()(bmp[0])
    assert np.array_equal(np.asarray(decoded["image"]), np.asarray(Image.open(src / "dog" / "d.bmp")))


def test_jsonl_and_csv_with_captions(tmp_path):
    save(tmp_path / "imgs" / "x.jpg", "JPEG", 0)
    save(tmp_path / "imgs" / "y.webp", "WEBP", 1)
    rows = [
        {"image": "imgs/x.jpg", "caption": "a red thing", "label": 3},
        {"image": "imgs/y.webp", "caption": "ünïcode caption"},
        {"image": "imgs/missing.jpg", "caption": "gone"},
    ]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    for name, prefix in (("list.jsonl", "a"), ("list.csv", "b")):
        manifest = make_shards.main([str(tmp_path / name), str(out), "--prefix", prefix, "--no-shuffle"])
        assert manifest["splits"][prefix]["samples"] == 2
        assert len(manifest["splits"][prefix]["skipped"]) == 1
        samples = read_back(out, prefix)
        assert [s["txt"].decode() for s in samples] == ["a red thing", "ünïcode caption"]
        assert int(samples[0]["cls"]) == 3 and "cls" not in samples[1] and "webp" in samples[1]
    assert set(json.loads((out / "manifest.json").read_text())["splits"]) == {"a", "b"}
