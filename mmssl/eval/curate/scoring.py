"""Score every sample of a shard set with a trained model; one row per sample, written shard by shard.

The scorers are in ``scorers.py`` (CLIP score, Ask-VLM, image embeddings, hashes only) and the files they
fill in ``store.py``; a scorer maps a batch (the keys of objectives/base.py) to per-sample values. Data goes
through the evaluation splitting of ``data/shards.py`` (shards to ranks, ``urls[rank::world]``, then to
DataLoader workers; every sample once) with each sample's shard and key kept beside the batch, and batches
never straddle two shards: a shard is written as soon as its last batch is scored. An interrupted
run resumes by skipping the shards already marked done; the input shards are only read. Samples that
training would skip (``SampleDecoder``: corrupt image, missing caption, ...) are skipped and counted by reason
per shard.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from mmssl.data.shards import SampleDecoder, collate, count_samples
from mmssl.eval.curate.hashing import phash_hex, pixel_hash
from mmssl.eval.curate.store import ScoreStore, check_unique_names, shard_name


class Chunk(NamedTuple):
    """Up to ``batch_size`` samples of one shard: ``batch`` holds only batch-contract keys (objectives/base.py:
    the view's tensors, ``caption`` and ``tokens``), what a scorer reads; the rest is bookkeeping. The last
    chunk of a shard (possibly empty) has ``done`` and ``skipped``, the shard's skip counts by reason."""

    shard: str  # the url
    keys: list[str]
    sha1: list[str]
    phash: list[str]
    batch: dict
    done: bool
    skipped: dict[str, int]


class ShardBatches:
    """Pipeline stage: raw samples -> decoded, viewed :class:`Chunk` s that never straddle shards.

    With ``use_text`` the batch has ``caption`` (list[str]) and, given a ``text_fn``, ``tokens`` (B, L) made by
    it, as ``ApplyView`` makes them for training. ``skipped`` counts SampleDecoder's skips, including an
    unreadable tail of the tar file.
    """

    def __init__(
        self,
        decoder: SampleDecoder,
        view: Callable | None,
        batch_size: int,
        use_text: bool = False,
        text_fn: Callable | None = None,
    ) -> None:
        self.decoder, self.view, self.batch_size = decoder, view, batch_size
        self.use_text, self.text_fn = use_text, text_fn

    def _prepare(self, sample: dict) -> dict:
        image = sample["image"]
        out = {"__key__": sample["__key__"], "__sha1__": pixel_hash(image), "__phash__": phash_hex(image)}
        if self.view is not None:
            out.update(self.view(image))
        if self.use_text:
            out["caption"] = sample["caption"]
            if self.text_fn is not None:
                out["tokens"] = self.text_fn(sample["caption"])
        return out

    def _chunk(self, url: str, items: list[dict], done: bool, start: Counter) -> Chunk:
        meta = [[item[k] for item in items] for k in ("__key__", "__sha1__", "__phash__")]
        skipped = dict(self.decoder.failures - start) if done else {}
        return Chunk(url, *meta, collate(items) if items else {}, done, skipped)  # collate drops __keys__

    def __call__(self, src: Iterable[dict]) -> Iterator[Chunk]:
        url, items, start = None, [], Counter()
        for raw in src:
            if raw.get("__url__") != url:
                if url is not None:
                    yield self._chunk(url, items, True, start)
                url, items, start = raw.get("__url__"), [], Counter(self.decoder.failures)
            sample = self.decoder(raw)
            if sample is None:
                continue
            items.append(self._prepare(sample))
            if len(items) == self.batch_size:
                yield self._chunk(url, items, False, start)
                items = []
        if url is not None:
            yield self._chunk(url, items, True, start)


@dataclass
class _Pending:
    rows: list[dict] = field(default_factory=list)
    embeddings: list[Tensor] = field(default_factory=list)


def _rows(chunk: Chunk, scores: dict[str, Tensor]) -> list[dict]:
    name = shard_name(chunk.shard)
    values = {k: v.float().cpu().tolist() for k, v in scores.items() if k != "embedding"}
    return [
        {
            "shard": name,
            "key": key,
            **{k: round(v[i], 6) for k, v in values.items()},
            "sha1": chunk.sha1[i],
            "phash": chunk.phash[i],
        }  # fmt: skip
        for i, key in enumerate(chunk.keys)
    ]


def score_shards(
    urls: list[str],
    scorer: Callable[[dict], dict[str, Tensor]],
    out_dir: str | Path,
    *,
    settings: dict,
    view: Callable | None = None,
    text_fn: Callable | None = None,
    decoder: SampleDecoder | None = None,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 256,
    num_workers: int = 1,
) -> dict:
    """Score this rank's share of ``urls`` into ``out_dir``, skipping shards already done; returns counts."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    check_unique_names(urls)
    store = ScoreStore(out_dir, settings)
    needs_text = getattr(scorer, "needs_text", False)
    decoder = decoder or SampleDecoder(require_text=needs_text)
    mine = urls[rank::world_size]  # eval_pipeline's rank split, over the full list so ranks never overlap
    todo = [u for u in mine if not store.is_done(u)]
    counts = {"shards": len(mine), "already_done": len(mine) - len(todo), "scored": 0, "skipped": Counter()}
    if not todo:
        return counts
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(todo),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=decoder.tar_error),
        ShardBatches(decoder, view, batch_size, needs_text, text_fn),
    )
    loader = DataLoader(pipeline, batch_size=None, num_workers=min(num_workers, len(todo)))
    pending: dict[str, _Pending] = {}
    finished: set[str] = set()
    desc = f"scoring ({getattr(scorer, 'name', 'scores')}, rank {rank}/{world_size})"
    with tqdm(total=count_samples(todo), desc=desc, unit="img", disable=None) as bar:
        for chunk in loader:
            acc = pending.setdefault(chunk.shard, _Pending())
            if chunk.keys:
                scores = scorer(chunk.batch)
                acc.rows += _rows(chunk, scores)
                if "embedding" in scores:
                    acc.embeddings.append(scores["embedding"].float().cpu())
                bar.update(len(chunk.keys))
            if chunk.done:
                emb = torch.cat(acc.embeddings) if acc.embeddings else None
                store.write(chunk.shard, acc.rows, emb, chunk.skipped)
                counts["scored"] += len(acc.rows)
                counts["skipped"].update(chunk.skipped)
                finished.add(chunk.shard)
                del pending[chunk.shard]
    for url in todo:  # no sample came out at all (empty, or unreadable from its first byte)
        if url not in finished:
            store.write(url, [], None, {"no sample read (empty or unreadable shard)": 1})
            counts["skipped"]["no sample read (empty or unreadable shard)"] += 1
    return counts
