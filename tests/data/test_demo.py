"""Bundled demo sets: generated offline, counts as in the manifest, held-out sources, deterministic bytes."""

import hashlib
import tarfile
from collections import Counter

import pytest

from mmssl.data import demo
from mmssl.data.shards import SampleDecoder, count_samples, expand_shards


def members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Both sets generated twice, into two roots."""
    out = []
    for i in range(2):
        root = tmp_path_factory.mktemp(f"root{i}")
        out.append({name: demo.ensure_demo(name, root) for name in demo.SETS} | {"root": root})
    return out


def test_counts_match_manifest(roots):
    for name in demo.SETS:
        folder = roots[0][name]
        manifest = (folder / "manifest.json").read_text()
        for split in ("train", "val"):
            urls = expand_shards(demo.resolve(f"demo:{name}/{split}", roots[0]["root"]))
            n = sum(len({m.split(".")[0] for m, _ in members(u)}) for u in urls)
            assert n == count_samples(urls) > 0, manifest
        assert len(set(expand_shards(demo.resolve(f"demo:{name}/train", roots[0]["root"])))) >= 2


def test_photos_split_by_source(roots):
    splits = demo.read_manifest(roots[0]["photos"])["splits"]
    train, val = set(splits["train"]["sources"]), set(splits["val"]["sources"])
    assert train and val and not train & val
    assert splits["train"]["samples"] >= 3000 and splits["val"]["samples"] >= 300
    shard_sizes = [
        n for k, n in demo.read_manifest(roots[0]["photos"])["shards"].items() if k.startswith("train")
    ]
    assert len(set(shard_sizes)) > 1, "uneven shards on purpose"


def test_digits_labels_stratified_and_decodable(roots):
    labels = {}
    dec = SampleDecoder(require_label=True)
    for split in ("train", "val"):
        labels[split] = Counter()
        for url in expand_shards(demo.resolve(f"demo:digits/{split}", roots[0]["root"])):
            raw = {}
            for name, data in members(url):
                key, ext = name.split(".", 1)
                raw.setdefault(key, {"__key__": key, "__url__": url})[ext] = data
            for sample in raw.values():
                out = dec(sample)
                assert out["image"].mode == "RGB" and out["image"].size == (32, 32)
                labels[split][out["label"]] += 1
    assert sorted(labels["train"]) == sorted(labels["val"]) == list(range(10))
    assert sum(labels["train"].values()) + sum(labels["val"].values()) == 1797
    for c in range(10):  # stratified 70/30
        assert abs(labels["val"][c] / (labels["train"][c] + labels["val"][c]) - 0.3) < 0.02
    train_keys = {
        k for u in expand_shards(demo.resolve("demo:digits/train", roots[0]["root"])) for k, _ in members(u)
    }
    val_keys = {
        k for u in expand_shards(demo.resolve("demo:digits/val", roots[0]["root"])) for k, _ in members(u)
    }
    assert not train_keys & val_keys


def test_generation_is_deterministic_and_cached(roots):
    for name in demo.SETS:
        a, b = roots[0][name], roots[1][name]
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(p.name for p in b.iterdir())
        for f in files:
            assert (
                hashlib.sha256((a / f).read_bytes()).digest() == hashlib.sha256((b / f).read_bytes()).digest()
            ), f
        before = (a / "manifest.json").stat().st_mtime_ns
        assert demo.ensure_demo(name, roots[0]["root"]) == a
        assert (a / "manifest.json").stat().st_mtime_ns == before, "second call must not regenerate"
    assert not [p for p in (roots[0]["root"] / "demo").iterdir() if p.name.startswith(".")], (
        "temp dirs removed"
    )


def test_resolve_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown demo set 'nope'"):
        demo.resolve("demo:nope/train", tmp_path)
