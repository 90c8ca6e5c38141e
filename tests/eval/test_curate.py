"""Data curation (mmssl/eval/curate, tools/score_shards.py, tools/filter_shards.py): hashes against their
definition, duplicate search against brute force, CLIP scores against the checkpoint's own embeddings, skipped
samples counted, interrupted scoring resumed, ranks x workers covering every sample once, wrong checkpoints
refused by name, and planted duplicates removed while unique pictures stay."""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg
from curate_helpers import photo_tiles, save_checkpoint, shapes_shards, tiny_clip_checkpoint, tool
from eval_fixtures import _one_thread  # noqa: F401
from PIL import Image

from mmssl import factory
from mmssl.data.demo import encode
from mmssl.data.module import resolve_shards
from mmssl.data.shards import write_shards
from mmssl.eval.curate import hashing, scorers, scoring, selection
from mmssl.eval.curate.store import read_scores


def _reencode(img: Image.Image, fmt: str = "JPEG", **kw) -> Image.Image:
    out = Image.open(io.BytesIO(encode(img, fmt, **kw)))
    out.load()
    return out


# --- hashes -----------------------------------------------------------------------------------------------


def test_phash_is_the_dct_hash_by_its_definition():
    """pHash bits from an explicit DCT-II matrix (y_k = 2 sum_n x_n cos(pi k (2n + 1) / 2N), scipy's type II)."""
    n = 32
    k, m = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    basis = 2 * np.cos(np.pi * k * (2 * m + 1) / (2 * n))  # (32, 32)
    for img in photo_tiles()[::9]:
        grey = np.asarray(img.convert("L").resize((n, n), Image.Resampling.LANCZOS), dtype=np.float64)
        low = (basis @ grey @ basis.T)[:8, :8]
        expected = sum(1 << i for i, bit in enumerate((low > np.median(low)).ravel()) if bit)
        assert hashing.phash(img) == expected
        assert hashing.hex_to_bits([hashing.phash_hex(img)])[0].tolist() == [
            (expected >> i) & 1 for i in range(64)
        ]


def test_hashes_see_copies_but_not_distinct_pictures():
    tiles = [_reencode(t, quality=90) for t in photo_tiles()]  # what a JPEG shard holds
    bits = hashing.hex_to_bits([hashing.phash_hex(t) for t in tiles]).astype(int)
    distinct = (bits[:, None] != bits[None]).sum(-1)[np.triu_indices(len(tiles), 1)]
    assert distinct.min() >= 12  # 64-bit hashes of different pictures differ in many bits
    for img in tiles[:8]:
        ref = hashing.hex_to_bits([hashing.phash_hex(img)])[0]
        for copy in (_reencode(img, quality=40), img.resize((72, 72)), img.resize((192, 192))):
            assert (hashing.hex_to_bits([hashing.phash_hex(copy)])[0] != ref).sum() <= 4
        assert hashing.pixel_hash(_reencode(img, "PNG")) == hashing.pixel_hash(img)  # same pixels, other file
        assert hashing.pixel_hash(_reencode(img, quality=40)) != hashing.pixel_hash(img)


# --- selection --------------------------------------------------------------------------------------------


def _brute_force(x: np.ndarray, order: np.ndarray, candidates: np.ndarray, near) -> np.ndarray:
    drop = np.zeros(len(x), dtype=bool)
    for pos, i in enumerate(order):
        if candidates[i]:
            drop[i] = any(candidates[j] and near(x[i], x[j]) for j in order[:pos])
    return drop


def test_duplicate_search_equals_brute_force_across_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (150, 64), dtype=np.uint8)
    for i in range(0, 150, 7):  # planted near copies: flip 0-3 bits of another row
        bits[i] = bits[(i * 13 + 5) % 150]
        bits[i, rng.choice(64, int(rng.integers(0, 4)), replace=False)] ^= 1
    emb = rng.normal(size=(150, 16))
    emb[::5] = emb[1::5][: len(emb[::5])] + 0.05 * rng.normal(size=(30, 16))
    order, candidates = rng.permutation(150), rng.random(150) < 0.9
    real = selection._earlier_matches
    monkeypatch.setattr(selection, "_earlier_matches", lambda *a, **k: real(*a, **{**k, "block": 16}))
    got = selection.near_by_hamming(bits, order, candidates, 2)
    expected = _brute_force(bits.astype(int), order, candidates, lambda a, b: (a != b).sum() <= 2)
    assert got.sum() > 5 and (got == expected).all()
    got = selection.near_by_cosine(torch.from_numpy(emb), order, candidates, 0.98)
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.98  # noqa: E731
    expected = _brute_force(emb, order, candidates, cos)
    assert got.sum() > 5 and (got == expected).all()


def test_top_fraction_keeps_exactly_that_many_and_the_best():
    scores = np.array([0.1, 0.5, 0.5, 0.5, 0.9, 0.2, 0.5, 0.0])
    keep, threshold = selection.score_mask(scores, top_fraction=0.5)
    assert keep.sum() == 4 and scores[keep].min() >= scores[~keep].max() and threshold == 0.5
    keep, threshold = selection.score_mask(scores, min_score=0.2, top_fraction=1.0)
    assert keep.tolist() == (scores >= 0.2).tolist() and threshold == 0.2
    with pytest.raises(ValueError, match="top-fraction"):
        selection.score_mask(scores, top_fraction=1.5)


def test_decisions_keep_the_best_copy_and_name_the_first_reason():
    def row(key, score, sha1, phash):
        return {"shard": "s", "key": key, "clip_score": score, "sha1": sha1, "phash": phash}

    rows = [
        row("a", 0.2, "x", "0000000000000000"),
        row("b", 0.9, "x", "0000000000000000"),  # exact copy of a, better scored: b stays, a goes
        row("c", 0.5, "y", "0000000000000003"),  # 2 bits from a/b: a near copy of b
        row("d", 0.01, "z", "ffffffffffffffff"),  # low score before anything else
        row("e", 0.6, "w", "f0f0f0f0f0f0f0f0"),
    ]
    reasons, info = selection.decide(rows, score="clip_score", min_score=0.1, phash_distance=2)
    assert reasons == ["exact duplicate", "kept", "near duplicate (phash)", "low score", "kept"]
    assert info["threshold"] == 0.1
    reasons, _ = selection.decide(rows, dedup_exact=False)  # no score: nothing dropped without a rule
    assert reasons == ["kept"] * 5


# --- scoring ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    shards, _ = shapes_shards(folder / "train", 64, seed=3, per_shard=64)
    return tiny_clip_checkpoint(folder / "clip.ckpt", shards, steps=2)


def test_clip_scores_are_cosines_of_the_checkpoint_embeddings_long_captions_cut(tmp_path, clip_ckpt):
    spec, _ = shapes_shards(tmp_path / "data", 20, seed=0, per_shard=8, swap=0.3)
    long = "a small red circle at the top left " * 6  # 43 words for a 16-token text tower
    write_shards([{"__key__": "long", "jpg": encode(Image.new("RGB", (64, 64), "red")), "txt": long}],
                 tmp_path / "data", "extra")  # fmt: skip
    spec = f"{spec}::{tmp_path / 'data' / 'extra-000000.tar'}"
    assert tool("score_shards").main([spec, "--scorer", "clip_score", str(clip_ckpt), "--out", str(tmp_path / "s"),
                                      "--num-workers", "0", "--batch-size", "6"]) == 0  # fmt: skip
    scores = read_scores(tmp_path / "s")
    assert len(scores.rows) == 21 and scores.embeddings.shape == (21, 32)
    model, cfg = factory.objective_from_checkpoint(clip_ckpt)
    view = factory.build_views(cfg)[1]
    bpe = open_clip.get_tokenizer("ViT-B-32")  # the full-length tokenizer: cut by hand below
    import webdataset as wds

    raw = {s["__key__"]: s for s in wds.DataPipeline(
        wds.SimpleShardList(resolve_shards(spec, "x")), wds.tarfile_to_samples())}  # fmt: skip
    for row, emb in zip(scores.rows, scores.embeddings, strict=True):
        sample = raw[row["key"]]
        image = view(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))["image"][None]
        ids = bpe.encode(sample["txt"].decode())
        ids = [bpe.sot_token_id, *ids[:14], bpe.eot_token_id]  # open_clip: the end token stays last
        tokens = torch.tensor([ids + [0] * (16 - len(ids))])
        with torch.no_grad():
            img, txt = model.encode_image(image, normalize=False), model.encode_text(tokens, normalize=False)
        assert row["clip_score"] == pytest.approx(F.cosine_similarity(img, txt).item(), abs=1e-5)
        torch.testing.assert_close(emb, F.normalize(img, dim=-1)[0], atol=1e-5, rtol=1e-4)
        assert row["sha1"] == hashing.pixel_hash(Image.open(io.BytesIO(sample["jpg"])))


def test_skipped_samples_are_counted_per_shard_and_never_copied(tmp_path, clip_ckpt):
    good = encode(Image.new("RGB", (40, 40), "blue"))
    samples = [
        {"__key__": "ok1", "jpg": good, "txt": "a blue square"},
        {"__key__": "broken", "jpg": b"\xff\xd8 not a jpeg", "txt": "a red circle"},
        {"__key__": "nocaption", "jpg": good},
        {"__key__": "ok2", "jpg": encode(Image.new("RGB", (40, 40), "red")), "txt": "a red square"},
    ]
    write_shards(samples, tmp_path / "data", "train", maxcount=10)
    spec = str(tmp_path / "data" / "train-000000.tar")
    assert tool("score_shards").main([spec, "--scorer", "clip_score", str(clip_ckpt), "--out", str(tmp_path / "s"),
                                      "--num-workers", "0"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "s" / "train-000000.json").read_text())
    assert summary["rows"] == 2 and summary["skipped"] == {"corrupt image": 1, "missing text key 'txt'": 1}
    out = tmp_path / "out"
    assert tool("filter_shards").main([spec, "--scores", str(tmp_path / "s"), "--out", str(out)]) == 0
    report = json.loads((out / "filter_report.json").read_text())
    assert report["counts"] == {"kept": 2, "not scored": 2} and report["input_samples"] == 4
    assert report["not_scored_by_reason"] == {"corrupt image": 1, "missing text key 'txt'": 1}
    assert json.loads((out / "manifest.json").read_text())["total"] == 2
    # a hash-only folder has a row for the uncaptioned sample too; merged, only rows in every folder count
    assert (
        tool("score_shards").main(
            [spec, "--scorer", "hash", "--out", str(tmp_path / "h"), "--num-workers", "0"]
        )
        == 0
    )
    assert len(read_scores(tmp_path / "h").rows) == 3
    both = tmp_path / "both"
    args = [
        spec,
        "--scores",
        str(tmp_path / "h"),
        str(tmp_path / "s"),
        "--score",
        "clip_score",
        "--out",
        str(both),
    ]
    assert tool("filter_shards").main(args) == 0
    report = json.loads((both / "filter_report.json").read_text())
    assert report["counts"] == {"kept": 2, "not scored": 2}
    decisions = [json.loads(line) for line in (both / "decisions.jsonl").read_text().splitlines()]
    assert [d["key"] for d in decisions] == ["ok1", "ok2"] and all("clip_score" in d for d in decisions)


class _Counting:
    """A scorer that records its batch sizes and can fail after a number of batches (an interruption)."""

    name, needs_text = "hash", False

    def __init__(self, fail_after: int | None = None):
        self.sizes, self.fail_after = [], fail_after

    def __call__(self, batch):
        if self.fail_after is not None and len(self.sizes) == self.fail_after:
            raise KeyboardInterrupt
        self.sizes.append(len(batch["image"]))
        return {"n": torch.arange(len(batch["image"]), dtype=torch.float32)}


def test_interrupted_scoring_resumes_where_it_stopped(tmp_path):
    spec, _ = shapes_shards(tmp_path / "data", 25, seed=0, per_shard=10)  # shards of 10, 10, 5
    urls = resolve_shards(spec, "x")
    kw = {
        "settings": {"scorer": "test"},
        "batch_size": 4,
        "num_workers": 0,
        "view": lambda img: {"image": torch.zeros(1)},
    }
    with pytest.raises(KeyboardInterrupt):
        scoring.score_shards(urls, _Counting(fail_after=4), tmp_path / "s", **kw)  # in the 2nd shard
    first = tmp_path / "s" / "train-000000.jsonl"
    assert first.is_file() and not (tmp_path / "s" / "train-000001.json").exists()
    stamp = first.stat().st_mtime_ns
    again = _Counting()
    counts = scoring.score_shards(urls, again, tmp_path / "s", **kw)
    # only shards 2 and 3 (10 + 5 samples, batches never straddle shards) are scored again
    assert again.sizes == [4, 4, 2, 4, 1] and counts["already_done"] == 1 and counts["scored"] == 15
    assert first.stat().st_mtime_ns == stamp
    fresh = tmp_path / "fresh"
    scoring.score_shards(urls, _Counting(), fresh, **kw)
    assert read_scores(tmp_path / "s").rows == read_scores(fresh).rows
    with pytest.raises(ValueError, match="other settings"):
        scoring.score_shards(urls, _Counting(), tmp_path / "s", **{**kw, "settings": {"scorer": "clip"}})


def test_ranks_and_workers_score_every_sample_once(tmp_path):
    spec, _ = shapes_shards(tmp_path / "data", 47, seed=0, per_shard=9)  # 6 shards, the last one short
    urls = resolve_shards(spec, "x")
    for rank in (0, 1):
        counts = scoring.score_shards(urls, scorers.HashOnly(), tmp_path / "s", settings={"scorer": "hash"},
                                      rank=rank, world_size=2, batch_size=4, num_workers=2)  # fmt: skip
        assert counts["shards"] == 3
    keys = [r["key"] for r in read_scores(tmp_path / "s").rows]
    assert sorted(keys) == [f"train_{i:06d}" for i in range(47)]


def test_a_checkpoint_of_the_wrong_kind_is_refused_by_name(tmp_path, capsys):
    cfg = tiny_cfg()
    mae = save_checkpoint(factory.build_objective(cfg), cfg, tmp_path / "mae.ckpt")
    spec, _ = shapes_shards(tmp_path / "data", 4, seed=0, per_shard=4)
    score = tool("score_shards").main
    assert score([spec, "--scorer", "clip_score", str(mae), "--out", str(tmp_path / "a")]) == 2
    assert "--scorer clip_score" in (err := capsys.readouterr().err) and "a 'mae' checkpoint" in err
    assert score([spec, "--scorer", "vlm", str(mae), "--out", str(tmp_path / "b")]) == 2
    assert "not a LLaVA parts folder" in capsys.readouterr().err
    assert (
        score([spec, "--scorer", "embed", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "c")]) == 2
    )
    assert "missing.ckpt" in capsys.readouterr().err


# --- filtering --------------------------------------------------------------------------------------------


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_planted_duplicates_are_removed_unique_pictures_kept_inputs_untouched(tmp_path):
    tiles = photo_tiles()
    jpgs = [encode(t, quality=90) for t in tiles]
    samples = [{"__key__": f"u{i:03d}", "jpg": b} for i, b in enumerate(jpgs)]
    decoded = [_reencode(t, quality=90) for t in tiles]
    planted = {  # key -> (payload, extension, the reason it must be dropped for)
        "p_bytes": (jpgs[3], "jpg", "exact duplicate"),
        "p_png": (encode(decoded[5], "PNG"), "png", "exact duplicate"),  # same pixels, another format
        "p_jpeg40": (encode(decoded[7], quality=40), "jpg", "near duplicate (phash)"),
        "p_small": (encode(decoded[11].resize((72, 72)), quality=90), "jpg", "near duplicate (phash)"),
        "p_large": (encode(decoded[13].resize((192, 192)), quality=90), "jpg", "near duplicate (phash)"),
    }
    rng = np.random.default_rng(0)
    for key, (payload, ext, _) in planted.items():  # after their originals, at random places
        samples.insert(int(rng.integers(20, len(samples) + 1)), {"__key__": key, ext: payload})
    write_shards(samples, tmp_path / "data", "train", maxcount=30)
    spec = str(tmp_path / "data" / "train-*.tar")
    urls = resolve_shards(spec, "x")
    before = {u: _sha256(tmp_path / "data" / u) for u in map(lambda u: u.rsplit("/", 1)[1], urls)}

    assert (
        tool("score_shards").main(
            [spec, "--scorer", "hash", "--out", str(tmp_path / "s"), "--num-workers", "0"]
        )
        == 0
    )
    out = tmp_path / "out"
    args = [spec, "--scores", str(tmp_path / "s"), "--phash-distance", "6", "--out", str(out)]
    assert tool("filter_shards").main(args) == 0
    decisions = {
        d["key"]: d["reason"] for d in map(json.loads, (out / "decisions.jsonl").read_text().splitlines())
    }
    assert {k: decisions[k] for k in planted} == {k: v[2] for k, v in planted.items()}
    assert all(decisions[s["__key__"]] == "kept" for s in samples if s["__key__"].startswith("u"))
    import webdataset as wds

    kept = {s["__key__"]: s["jpg"] for s in wds.DataPipeline(
        wds.SimpleShardList(sorted(map(str, out.glob("*.tar")))), wds.tarfile_to_samples())}  # fmt: skip
    assert kept == {
        s["__key__"]: s["jpg"] for s in samples if s["__key__"].startswith("u")
    }  # bytes unchanged
    assert {u: _sha256(tmp_path / "data" / u) for u in before} == before  # inputs never modified
    report = json.loads((out / "filter_report.json").read_text())
    assert report["counts"] == {
        "kept": len(tiles),
        "exact duplicate": 2,
        "near duplicate (phash)": 3,
        "not scored": 0,
    }

    # resume: a run interrupted before the last output shard writes only that one
    manifest = json.loads((out / "manifest.json").read_text())
    last = sorted(manifest["splits"])[-1]
    del manifest["splits"][last]
    (out / "manifest.json").write_text(json.dumps(manifest))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert tool("filter_shards").main(args) == 0
    changed = {p.name for p in out.glob("*.tar") if stamps.get(p.name) != p.stat().st_mtime_ns}
    assert changed == {f"{last}-000000.tar"}
    assert (
        tool("filter_shards").main([*args[:-2], "--phash-distance", "3", "--out", str(out)]) == 2
    )  # other settings
    assert (
        tool("filter_shards").main([spec, "--scores", str(tmp_path / "s"), "--out", str(tmp_path / "data")])
        == 2
    )


def test_top_fraction_filter_keeps_the_best_and_draws_the_histogram(tmp_path, clip_ckpt):
    spec, _ = shapes_shards(tmp_path / "data", 30, seed=0, per_shard=12, swap=0.3)
    assert tool("score_shards").main([spec, "--scorer", "clip_score", str(clip_ckpt), "--out", str(tmp_path / "s"),
                                      "--num-workers", "0"]) == 0  # fmt: skip
    out = tmp_path / "out"
    assert tool("filter_shards").main([spec, "--scores", str(tmp_path / "s"), "--score", "clip_score",
                                       "--top-fraction", "0.6", "--out", str(out)]) == 0  # fmt: skip
    rows = read_scores(tmp_path / "s").rows
    best = {r["key"] for r in sorted(rows, key=lambda r: -r["clip_score"])[:18]}
    decisions = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    assert {d["key"] for d in decisions if d["reason"] == "kept"} == best
    report = json.loads((out / "filter_report.json").read_text())
    assert report["output_samples"] == 18 and report["threshold"] == min(
        r["clip_score"] for r in rows if r["key"] in best
    )
    assert (out / "score_histogram.png").stat().st_size > 1000
    assert (
        json.loads((out / "manifest.json").read_text())["splits"]["train-000000"]["classes"][0]
        == "red circle"
    )


def test_embedding_dedup_follows_the_saved_embeddings(tmp_path):
    cfg = tiny_cfg()
    mae = save_checkpoint(factory.build_objective(cfg), cfg, tmp_path / "mae.ckpt")
    spec, _ = shapes_shards(tmp_path / "data", 30, seed=0, per_shard=12)
    assert tool("score_shards").main([spec, "--scorer", "embed", str(mae), "--out", str(tmp_path / "e"),
                                      "--num-workers", "0"]) == 0  # fmt: skip
    scores = read_scores(tmp_path / "e")
    emb = F.normalize(scores.embeddings, dim=-1)
    sim = emb @ emb.T
    threshold = float(sim[np.triu_indices(30, 1)].median())  # about half the pictures have a near twin
    out = tmp_path / "out"
    assert tool("filter_shards").main([spec, "--scores", str(tmp_path / "e"), "--no-exact", "--embeddings",
                                       str(tmp_path / "e"), "--cosine", str(threshold), "--out", str(out)]) == 0  # fmt: skip
    decisions = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    expected = [not any(sim[i, j] >= threshold for j in range(i)) for i in range(30)]  # shard order, no score
    assert [d["reason"] == "kept" for d in decisions] == expected
    assert 0 < sum(expected) < 30 and not math.isnan(threshold)
