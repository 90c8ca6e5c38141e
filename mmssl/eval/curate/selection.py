"""Which samples to keep: a score threshold or top fraction, then exact, perceptual and embedding duplicates;
and the filtered copy of a shard set.

Order of the decisions (each dropped sample is counted under the first reason that drops it):

1. ``low score``: below ``min_score``, or outside the ``top_fraction`` best of the pool (DataComp's "CLIP
   score (top x %)" baselines, Gadre et al. 2023 §3.4). Samples without a row (skipped while scoring: corrupt
   image, missing caption...) are dropped as ``not scored``.
2. ``exact duplicate``: same pixel hash as a sample earlier in priority order.
3. ``near duplicate (phash)``: pHash within ``phash_distance`` bits (Hamming) of an earlier sample.
4. ``near duplicate (embedding)``: cosine similarity of the (L2-normalised) embeddings at least
   ``cosine`` with an earlier sample.

Priority order: the highest score first when there is one (the best copy of a group survives), else the
order of the shards. As in SemDeDup (Abbas et al. 2023, Algorithm 1: the max over the upper triangle of the
similarity matrix), a sample is dropped when it is near *any* earlier candidate, kept or not: in a chain
A ~ B ~ C with A !~ C, B and C both go. The comparison is pairwise in blocks, O(N^2): fine to ~10^5 samples
on a CPU; larger pools need SemDeDup's k-means clustering first (not implemented here).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch import Tensor

from mmssl.data.shards import read_manifest, write_shards
from mmssl.eval.curate.hashing import hex_to_bits
from mmssl.eval.curate.store import shard_name
from mmssl.eval.features import fingerprint

KEPT = "kept"


def score_mask(
    scores: np.ndarray, min_score: float | None = None, top_fraction: float | None = None
) -> tuple[np.ndarray, float | None]:
    """(N,) bool keep mask and the threshold used; ``top_fraction`` keeps ``round(f * N)`` samples exactly
    (ties at the threshold are broken by position, so the count is exact)."""
    n = len(scores)
    keep = np.ones(n, dtype=bool)
    threshold = None
    if min_score is not None:
        keep &= scores >= min_score
        threshold = min_score
    if top_fraction is not None:
        if not 0 < top_fraction <= 1:
            raise ValueError(f"--top-fraction must be in (0, 1], got {top_fraction}")
        k = round(top_fraction * n)
        order = np.argsort(-scores, kind="stable")  # best first
        top = np.zeros(n, dtype=bool)
        top[order[:k]] = True
        keep &= top
        if k:
            threshold = max(threshold or -np.inf, float(scores[order[k - 1]]))
    return keep, threshold


def _earlier_matches(
    values: Tensor, order: np.ndarray, candidates: np.ndarray, is_near, block: int = 1024
) -> np.ndarray:
    """(N,) bool: sample ``i`` (a candidate) is near some candidate earlier in ``order``.

    ``is_near(a, b)`` maps (b1, D) and (b2, D) rows to a (b1, b2) bool matrix.
    """
    idx = np.array([i for i in order if candidates[i]], dtype=np.int64)  # candidates in priority order
    drop = np.zeros(len(candidates), dtype=bool)
    x = values[torch.from_numpy(idx)]  # (M, D) in priority order
    for start in range(0, len(idx), block):
        stop = min(start + block, len(idx))
        near = is_near(x[start:stop], x[:stop])  # (b, stop): rows against everything up to the block's end
        earlier = torch.arange(stop)[None, :] < torch.arange(start, stop)[:, None]  # strictly before
        drop[idx[start:stop]] = (near & earlier).any(dim=1).numpy()
    return drop


def near_by_hamming(
    bits: np.ndarray, order: np.ndarray, candidates: np.ndarray, max_distance: int
) -> np.ndarray:
    """pHash bits (N, 64) -> (N,) bool: within ``max_distance`` differing bits of an earlier candidate."""
    x = torch.from_numpy(bits.astype(np.float32))  # (N, 64) of 0/1

    def is_near(a: Tensor, b: Tensor) -> Tensor:
        # Hamming distance = |a| + |b| - 2 a.b for 0/1 vectors (exact in float32 for 64 bits)
        dist = a.sum(1, keepdim=True) + b.sum(1)[None, :] - 2 * a @ b.T
        return dist <= max_distance + 0.5

    return _earlier_matches(x, order, candidates, is_near)


def near_by_cosine(
    embeddings: Tensor, order: np.ndarray, candidates: np.ndarray, threshold: float
) -> np.ndarray:
    """(N, D) embeddings -> (N,) bool: cosine similarity >= ``threshold`` with an earlier candidate."""
    x = F.normalize(embeddings.float(), dim=-1)
    return _earlier_matches(x, order, candidates, lambda a, b: a @ b.T >= threshold)


def exact_matches(values: list[str], order: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(N,) bool: the same value as an earlier candidate."""
    seen: set[str] = set()
    drop = np.zeros(len(values), dtype=bool)
    for i in order:
        if candidates[i]:
            drop[i] = values[i] in seen
            seen.add(values[i])
    return drop


def decide(
    rows: list[dict],
    *,
    score: str | None = None,
    min_score: float | None = None,
    top_fraction: float | None = None,
    dedup_exact: bool = True,
    phash_distance: int | None = None,
    embeddings: Tensor | None = None,
    cosine: float | None = None,
) -> tuple[list[str], dict]:
    """One reason per row (``kept`` or why it was dropped) and facts for the report (threshold, order)."""
    n = len(rows)
    reasons = np.full(n, KEPT, dtype=object)
    info: dict = {"threshold": None}
    values = None
    if score is not None:
        missing = [r["key"] for r in rows if score not in r]
        if missing:
            raise ValueError(
                f"score {score!r} is not in the rows of {len(missing)} samples (e.g. {missing[:3]})"
            )
        values = np.array([r[score] for r in rows], dtype=np.float64)
    if min_score is not None or top_fraction is not None:
        if values is None:
            raise ValueError("a threshold or top fraction needs --score NAME")
        keep, info["threshold"] = score_mask(values, min_score, top_fraction)
        reasons[~keep] = "low score"
    order = np.argsort(-values, kind="stable") if values is not None else np.arange(n)
    stages = []
    if dedup_exact:
        stages.append(("exact duplicate", lambda c: exact_matches([r["sha1"] for r in rows], order, c)))
    if phash_distance is not None:
        bits = hex_to_bits([r["phash"] for r in rows]) if n else np.zeros((0, 64), np.uint8)
        stages.append(("near duplicate (phash)", lambda c: near_by_hamming(bits, order, c, phash_distance)))
    if cosine is not None:
        if embeddings is None or len(embeddings) != n:
            raise ValueError("embedding deduplication needs one embedding per row (--embeddings DIR)")
        stages.append(("near duplicate (embedding)", lambda c: near_by_cosine(embeddings, order, c, cosine)))
    for reason, find in stages:
        candidates = reasons == KEPT
        reasons[find(candidates) & candidates] = reason
    return list(reasons), info


def raw_samples(url: str) -> Iterator[dict]:
    """A shard's samples as stored (member bytes by extension), nothing decoded."""
    # an unreadable tail is skipped with a warning, as while scoring (those samples have no score anyway)
    yield from wds.DataPipeline(
        wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=wds.warn_and_continue)
    )


def _kept(samples: Iterable[dict], keep: set[str], info: dict) -> Iterator[dict]:
    info["samples_read"] = (
        0  # filled while write_shards drains this, before it writes the manifest holding it
    )
    for sample in samples:
        info["samples_read"] += 1
        if sample["__key__"] in keep:
            yield {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def write_filtered(urls: list[str], keep: dict[str, set[str]], out_dir: str | Path) -> dict:
    """Copy the kept samples of each input shard, unchanged, into ``out_dir/NAME-000000.tar`` (one output shard
    per input shard, written by ``write_shards`` with the input split's manifest info), skipping input shards
    already copied (the manifest records each one with its input's fingerprint): an interrupted run resumes.
    Returns the output manifest; ``splits[NAME]["samples_read"]`` counts the input shard's samples."""
    out = Path(out_dir)
    for url in urls:
        if Path(url).resolve().parent == out.resolve():
            raise ValueError(
                f"--out {out} is the folder of the input shard {url}: filtering never writes there"
            )
    manifest = read_manifest(out)
    for url in urls:
        name, source = shard_name(url), fingerprint(url)
        if manifest.get("splits", {}).get(name, {}).get("source_fingerprint") == source:
            continue
        split = Path(url).name.rsplit("-", 1)[0]  # "train-000001.tar" -> the input manifest's split "train"
        info = {k: v for k, v in read_manifest(Path(url).parent).get("splits", {}).get(split, {}).items()
                if k not in ("shards", "samples")}  # fmt: skip
        info.update(source=str(Path(url).resolve()), source_fingerprint=source)
        wanted = keep.get(name, set())
        samples = _kept(raw_samples(url), wanted, info)
        manifest = write_shards(samples, out, name, maxcount=10**9, total=len(wanted), info=info)
    return manifest


def count_reasons(reasons: list[str]) -> dict[str, int]:
    counts = Counter(reasons)
    return {KEPT: counts.pop(KEPT, 0), **dict(sorted(counts.items()))}
