"""Webdataset shard I/O: expand shard specs, decode samples defensively, build pipelines, write shards.

Why the pipelines look the way they do (DESIGN.md section 5):

* DDP hangs when one rank runs out of batches before the others (the classic webdataset + Lightning
  failure with uneven shards). As in open_clip's ``resampled=True`` mode, every worker draws shards *with
  replacement* from the whole list (``wds.ResampledShards``) and ``.with_epoch(n)`` cuts that infinite
  stream at exactly ``n`` batches, whatever the number and sizes of the shards.
* The rank is passed in explicitly: webdataset's default node splitter raises once world size > 1.
* Batches are formed inside the workers and the DataLoader gets ``batch_size=None`` (open_clip does the
  same): one pickle per batch crosses the process boundary instead of one per sample.
* Evaluation splits a plain shard list by rank then worker, unshuffled, partial last batch kept.
* Bad data is skipped with a counted reason and a warning naming shard and key (``SampleDecoder``); a
  stream in which nothing decodes raises instead of cycling forever through resampled shards.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import default_collate
from tqdm import tqdm

from mmssl.data.tar import tar_samples
from mmssl.data.transforms import ApplyView, DecodeError, EncodedJpeg, jpeg_header, to_rgb

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIZES = "sizes.json"  # open_clip's shard-size file (open_clip_train/data.py get_dataset_size)


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str) -> list[str]:
    """Expand ``"a-{000..009}.tar::b/*.tar"`` into a list of shard paths; local files must exist."""
    if not spec or not spec.strip():
        raise FileNotFoundError("empty shard spec")
    urls: list[str] = []
    missing: list[str] = []
    for part in spec.split("::"):  # webdataset's separator for several shard lists
        for url in braceexpand.braceexpand(part.strip()):
            if _is_remote(url):
                urls.append(url)
                continue
            url = os.path.expanduser(url)
            if glob.has_magic(url):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise FileNotFoundError(f"shard pattern {url!r} (from spec {spec!r}) matches no file")
                urls.extend(matches)
            else:
                (urls if os.path.isfile(url) else missing).append(url)
    folders = [url for url in missing if os.path.isdir(url)]
    if folders:
        shards = os.path.join(folders[0].rstrip("/") + "_shards", "")
        raise FileNotFoundError(
            f"{folders[0]} is a folder, not a webdataset shard (.tar); write its images as shards with "
            f"`python tools/make_shards.py {folders[0]} {shards}` and pass "
            f"'{shards}train-*.tar'"
        )
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of spec {spec!r} do not exist: {missing[:3]}")
    return urls


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def read_counts(directory: str | Path) -> dict[str, int]:
    """Shard file name -> samples, from ``manifest.json`` (``write_shards``) or open_clip's ``sizes.json`` (a
    flat ``{"shard-000000.tar": count}`` map written beside webdataset shards by img2dataset / open_clip tools);
    where both list a shard, the manifest wins."""
    sizes = Path(directory) / SIZES
    counts = json.loads(sizes.read_text()) if sizes.is_file() else {}
    if not isinstance(counts, dict):
        raise ValueError(f"{sizes}: expected a {{shard file name: sample count}} object")
    return {**counts, **read_manifest(directory).get("shards", {})}


def count_samples(urls: list[str]) -> int | None:
    """Total samples from the ``manifest.json`` or ``sizes.json`` files beside the shards (:func:`read_counts`);
    ``None`` if any shard is unlisted."""
    manifests: dict[Path, dict] = {}
    total = 0
    for url in urls:
        if _is_remote(url):
            return None
        path = Path(url)
        if path.parent not in manifests:
            manifests[path.parent] = read_counts(path.parent)
        n = manifests[path.parent].get(path.name)
        if n is None:
            return None
        total += int(n)
    return total


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


class NoDecodableSamples(RuntimeError):
    """Every sample so far failed to decode (a corrupt or wrong shard set); the message names the shards.
    Raised in a DataLoader worker, torch re-raises it in the main process as this type, with the worker's
    traceback text prepended to the message (``message_of`` takes it off)."""

    @staticmethod
    def message_of(exn: BaseException) -> str:
        lines = [ln for ln in str(exn).splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        return last.split(f"{NoDecodableSamples.__module__}.{NoDecodableSamples.__name__}: ", 1)[-1].split(
            f"{NoDecodableSamples.__name__}: ", 1
        )[-1]


class SampleDecoder:
    """Raw webdataset sample -> ``{"image": PIL RGB, "label"?: int, "caption"?: str, "json"?: object,
    "has_image"?: bool, "__key__", "__url__"}`` (the batch keys of objectives/base.py).

    ``image_optional``: a sample without an image but with a caption or json (LLaVA's text-only conversations,
    part of the 665K instruction mix) is kept with a black placeholder picture, and every sample says whether its
    picture is real in ``has_image`` (as the reference gives such samples a zero image that is never used).

    Returns ``None`` (sample dropped) for a corrupt or missing image, a decompression bomb, a bad label,
    non-UTF-8 text, a missing label when ``require_label``, or missing or blank text when ``require_text``
    (image-text methods: a blank caption supervises nothing, and blank captions in one batch would be
    identical "negatives"): skipped, not fatal, so that a few unlabeled samples do not stop a run (a set
    with no label at all still fails, below). Skips are counted by reason and logged naming shard and key:
    the first ``log_first`` per reason, then every ``log_every``-th.

    Counts are per process (each DataLoader worker has its own copy). A worker that has seen
    ``max_failures_without_success`` failed samples or shards, or that many shards without any sample,
    and not one success raises ``RuntimeError``: resampled streams cycle forever, so an all-corrupt or
    all-empty shard set would otherwise hang. ``max_image_pixels`` is checked on the header size before
    pixels are decoded; PIL itself refuses more than twice ``Image.MAX_IMAGE_PIXELS`` (also counted as bombs).
    """

    def __init__(
        self,
        image_key: str = "jpg;jpeg;png;webp",
        label_key: str | None = "cls",
        text_key: str | None = "txt",
        json_key: str | None = "json",
        require_label: bool = False,
        require_text: bool = False,
        image_optional: bool = False,
        max_image_pixels: int = 89_478_485,
        max_failures_without_success: int = 50,
        log_first: int = 5,
        log_every: int = 100,
    ) -> None:
        self.image_keys = tuple(k for k in image_key.split(";") if k)
        self.label_key = label_key or None
        self.text_key = text_key or None
        self.json_key = json_key or None
        self.require_label = require_label
        self.require_text = require_text
        self.image_optional = image_optional
        self.max_image_pixels = max_image_pixels
        self.max_failures_without_success = max_failures_without_success
        self.log_first = log_first
        self.log_every = log_every
        self.successes = 0
        self.failures: Counter[str] = Counter()
        self.failed_shards: set[str] = set()
        self.shards_opened = 0
        self.samples_read = 0

    def __call__(self, sample: dict, lazy: bool = False) -> dict | None:
        """``lazy``: leave a JPEG undecoded (header read and checked) for a view that decodes it itself at
        the scale it needs: a colour JPEG as an ``EncodedJpeg`` (its bytes and the size in its frame header),
        other JPEGs as a PIL image not yet loaded; :meth:`decode_failed` then counts a file that turns out
        corrupt."""
        url, key = str(sample.get("__url__", "?")), str(sample.get("__key__", "?"))
        out: dict[str, Any] = {"__key__": key, "__url__": url}
        if self.label_key is not None:
            raw = sample.get(self.label_key)
            if raw is None:
                if self.require_label:
                    return self._skip(f"missing label key '{self.label_key}'", url, key)
            else:
                try:
                    out["label"] = int(raw.decode("ascii") if isinstance(raw, bytes) else raw)
                except (ValueError, TypeError, UnicodeDecodeError):
                    return self._skip("bad label", url, key, repr(raw)[:40])
        if self.text_key is not None and self.text_key in sample:
            raw = sample[self.text_key]
            try:
                out["caption"] = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError:
                return self._skip("non-UTF-8 text", url, key)
            if self.require_text and not out["caption"].strip():
                return self._skip("empty text", url, key)
        elif self.require_text:
            return self._skip(f"missing text key '{self.text_key}'", url, key)
        if self.json_key is not None and self.json_key in sample:
            try:
                out["json"] = json.loads(sample[self.json_key])
            except (ValueError, UnicodeDecodeError) as exn:
                return self._skip("bad json", url, key, str(exn)[:60])
        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None and self.image_optional and ("json" in out or "caption" in out):
            self.successes += 1
            return {**out, "image": Image.new("RGB", (8, 8)), "has_image": False}
        if data is None:
            return self._skip(f"missing image key '{';'.join(self.image_keys)}'", url, key)
        try:
            out["image"] = self._decode_image(data, lazy)
        except Image.DecompressionBombError as exn:
            return self._skip("decompression bomb", url, key, str(exn))
        # PIL raises a zoo of types for bad bytes (OSError, SyntaxError, ValueError, struct.error...)
        except Exception as exn:
            return self._skip("corrupt image", url, key, f"{type(exn).__name__}: {exn}")
        if self.image_optional:
            out["has_image"] = True
        self.successes += 1
        return out

    def _decode_image(self, data: bytes, lazy: bool = False) -> Image.Image | EncodedJpeg:
        if lazy and (header := jpeg_header(data)) is not None:
            w, h, components = header
            # a colour JPEG within both pixel limits (ours, and PIL's own bomb limit of twice MAX_IMAGE_PIXELS)
            # stays bytes: its size read from the frame header, without PIL's 15 us Image.open; anything else
            # (grey, CMYK, too large) goes through PIL, which converts, refuses or reports it
            limit = min(self.max_image_pixels, 2 * (Image.MAX_IMAGE_PIXELS or self.max_image_pixels))
            if components == 3 and w * h <= limit:
                return EncodedJpeg(data, w, h)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we refuse those ourselves
            img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if w * h > self.max_image_pixels:
            raise Image.DecompressionBombError(f"{w}x{h} pixels > max_image_pixels={self.max_image_pixels}")
        if lazy and img.format == "JPEG":
            return img
        img.load()
        return to_rgb(img)

    def decode_failed(self, sample: dict, exn: DecodeError) -> None:
        """A lazily returned image that a view could not decode: no success after all, a corrupt image."""
        self.successes -= 1
        return self._skip("corrupt image", sample["__url__"], sample["__key__"], str(exn))

    def _skip(self, reason: str, url: str, key: str, detail: str = "") -> None:
        self.failures[reason] += 1
        if len(self.failed_shards) < 100:
            self.failed_shards.add(url)
        n = self.failures[reason]
        if n <= self.log_first or n % self.log_every == 0:
            detail = f" ({detail})" if detail else ""
            log.warning(
                f"skipped sample {key!r} in shard {url}: {reason}{detail} "
                f"[worker {_worker_id()}: {n} skipped for this reason, {self.successes} decoded]"
            )
        total = sum(self.failures.values())
        if self.successes == 0 and total >= self.max_failures_without_success:
            raise NoDecodableSamples(
                f"no sample could be decoded: {total} failures and 0 successes in worker {_worker_id()}; "
                f"counts by reason: {dict(self.failures)}; shards: {sorted(self.failed_shards)[:10]}"
            )
        return None

    def tar_error(self, exn: Exception) -> bool:
        """webdataset handler for unreadable/truncated tar files: warn naming the shard, count, continue."""
        url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else "?"
        self._skip("unreadable shard", url, "-", f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    def count_shards(self, src: Iterable[dict]) -> Iterator[dict]:
        # Stage before tar expansion: resampling empty shards would otherwise loop forever without a sample.
        for item in src:
            self.shards_opened += 1
            if self.samples_read == 0 and self.shards_opened > self.max_failures_without_success:
                raise RuntimeError(
                    f"opened {self.shards_opened - 1} shards and found no sample in any of them "
                    f"(e.g. {item.get('url')}); counts by reason: {dict(self.failures)}"
                )
            yield item

    def count_raw(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            self.samples_read += 1
            yield sample


def _channels_last_uint8(x: torch.Tensor) -> bool:
    """A (C, H, W) uint8 picture whose bytes are laid out (H, W, C)."""
    return x.dtype == torch.uint8 and x.dim() == 3 and x.shape[0] > 1 and x.permute(1, 2, 0).is_contiguous()


def collate(samples: list[dict]) -> dict[str, Any]:
    """Stack tensors, ints -> int64, floats -> float32, strings -> list[str]; ``__dunder__`` keys dropped. uint8
    pictures laid out channels-last stay so (a channels-last (B, C, H, W) batch, which ``NormalizeBatch`` turns
    into contiguous float planes)."""
    keys = [k for k in samples[0] if not k.startswith("__")]
    for s in samples[1:]:
        if set(k for k in s if not k.startswith("__")) != set(keys):
            raise ValueError(
                f"samples in one batch have different keys ({sorted(keys)} vs {sorted(s)}); "
                "e.g. some have a label and some not: use SampleDecoder(require_label=True)"
            )
    out: dict[str, Any] = {}
    for k in keys:
        values = [s[k] for s in samples]
        if isinstance(values[0], torch.Tensor) and _channels_last_uint8(values[0]):
            # ScaledRandomResizedCrop's pictures: stacked as (B, H, W, C), a plain copy (4 us a 224 px picture;
            # into (B, C, H, W) planes it is a transposing one, 42 us), handed over as a channels-last (B, C, H, W)
            # view; NormalizeBatch makes contiguous float planes of it on the training device
            out[k] = default_collate([v.permute(1, 2, 0) for v in values]).permute(0, 3, 1, 2)
        elif isinstance(values[0], torch.Tensor):
            # default_collate stacks straight into shared memory inside a worker, saving a copy per batch
            out[k] = default_collate(values)
        elif isinstance(values[0], (bool, int, np.integer)):
            out[k] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(values[0], (float, np.floating)):
            out[k] = torch.tensor(values, dtype=torch.float32)
        else:
            out[k] = list(values)
    return out


class DecodeAndView:
    """``SampleDecoder`` then ``ApplyView`` in one stage. A view that decodes the image itself (``view.decodes``:
    it starts with a ``ScaledRandomResizedCrop``, which decodes a JPEG at the scale its crop needs) gets the
    file undecoded, and a file that then fails to decode is skipped and counted like any corrupt image."""

    def __init__(self, decoder: SampleDecoder, view: Callable, text_fn: Callable | None = None) -> None:
        self.decoder, self.apply = decoder, ApplyView(view, text_fn)
        self.lazy = bool(getattr(view, "decodes", False))

    def __call__(self, sample: dict) -> dict | None:
        decoded = self.decoder(sample, lazy=self.lazy)
        if decoded is None:
            return None
        try:
            return self.apply(decoded)
        except DecodeError as exn:
            return self.decoder.decode_failed(decoded, exn)


class StreamSeed:
    """Seed for one (seed, rank, pass, worker), evaluated inside the worker process (picklable)."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank, self.epoch = seed, rank, 0

    def __call__(self, salt: int = 0) -> int:
        return wds.utils.make_seed(self.seed, self.rank, self.epoch, _worker_id(), salt)


class _SeededShuffle(wds.PipelineStage):
    """``wds.shuffle`` with an RNG seeded per worker at iteration time (``wds.shuffle`` seeds from pid+time)."""

    def __init__(self, bufsize: int, seed: StreamSeed) -> None:
        self.bufsize, self.seed = bufsize, seed

    def run(self, src: Iterable) -> Iterator:
        # Start yielding at a fifth of the buffer, like open_clip's initial=1000 for bufsize=5000.
        rng = random.Random(self.seed(salt=1))
        return wds.shuffle(self.bufsize, initial=max(1, self.bufsize // 5), rng=rng)(src)


def _split_by_rank(src: Iterable, rank: int, world_size: int) -> Iterator:
    return islice(src, rank, None, world_size)


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")


def train_pipeline(
    urls: list[str],
    view: Callable,
    batch_size: int,
    batches_per_worker: int,
    *,
    rank: int,
    world_size: int,
    seed: int,
    decoder: SampleDecoder,
    shuffle_buffer: int = 2000,
    text_fn: Callable | None = None,
) -> wds.DataPipeline:
    """Infinite resampled stream cut at exactly ``batches_per_worker`` full batches per worker and pass.

    Every rank resamples from *all* shards (``world_size`` is only validated); streams differ through the
    seed, which mixes ``seed``, ``rank``, the pass number (``set_epoch``) and the worker id.
    """
    _check_rank(rank, world_size)
    if batches_per_worker < 1:
        raise ValueError(f"batches_per_worker must be >= 1, got {batches_per_worker}")
    stream_seed = StreamSeed(seed, rank)
    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=stream_seed, deterministic=True),
        decoder.count_shards,
        partial(tar_samples, handler=decoder.tar_error),
        decoder.count_raw,
        _SeededShuffle(shuffle_buffer, stream_seed),
        wds.map(DecodeAndView(decoder, view, text_fn)),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    ).with_epoch(batches_per_worker)


def set_epoch(pipeline: wds.DataPipeline, epoch: int) -> None:
    """Make the next pass over a ``train_pipeline`` draw stream number ``epoch``.

    DataLoader workers get a fresh copy of the pipeline on every pass, so without this a loader iterated
    twice with ``num_workers > 0`` would replay the same stream (with 0 workers it would not).
    """
    for stage in pipeline.pipeline:
        if isinstance(stage, wds.ResampledShards):
            stage.epoch = -1  # its own counter advances in-process but not in workers; our seed carries it
            stage.worker_seed.epoch = epoch


def eval_pipeline(
    urls: list[str],
    view: Callable,
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    decoder: SampleDecoder,
    text_fn: Callable | None = None,
) -> wds.DataPipeline:
    """Every sample exactly once over all ranks and workers, in shard order, partial last batch kept.

    Shards go to ranks (``urls[rank::world_size]``) then to workers, so with fewer shards than ranks x
    workers some yield nothing. Fine for evaluation if no collective runs per batch (reduce at epoch end).
    """
    _check_rank(rank, world_size)
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        partial(_split_by_rank, rank=rank, world_size=world_size),
        wds.split_by_worker,
        partial(tar_samples, handler=decoder.tar_error),
        wds.map(DecodeAndView(decoder, view, text_fn)),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )


def write_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    prefix: str = "shard",
    maxcount: int = 1000,
    total: int | None = None,
    info: dict | None = None,
) -> dict:
    """Write ``{"__key__", "jpg": bytes, "cls": int, "txt": str, ...}`` dicts as ``prefix-000000.tar``...

    ``out_dir/manifest.json`` gets ``shards`` (file name -> sample count, read by ``count_samples``),
    ``total``, and ``splits[prefix]`` (counts plus ``info``). Other prefixes are kept, so train and val can
    share a folder; an earlier write with the same prefix is deleted first so no glob sees stale shards.
    Tar members get a fixed mtime: the same samples give byte-identical shards.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    shards: dict[str, int] = manifest.get("shards", {})
    for name in [n for n in shards if n.startswith(f"{prefix}-")]:
        (out / name).unlink(missing_ok=True)
        del shards[name]
    counts: dict[str, int] = {}
    writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=maxcount, verbose=0, mtime=0)
    try:
        progress = tqdm(samples, total=total, desc=f"writing {out / prefix}", unit="img", disable=None)
        for sample in progress:
            key = sample.get("__key__")
            if not key or "." in str(key):
                # webdataset groups tar members by the name before the first dot
                raise ValueError(f"sample key must be non-empty and contain no '.', got {key!r}")
            writer.write(sample)
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
    finally:
        writer.close()
    if not counts:  # ShardWriter opens its first file eagerly
        (out / f"{prefix}-000000.tar").unlink(missing_ok=True)
    shards.update(counts)
    manifest["shards"] = dict(sorted(shards.items()))
    manifest["total"] = sum(manifest["shards"].values())
    split = {"shards": len(counts), "samples": sum(counts.values()), **(info or {})}
    manifest.setdefault("splits", {})[prefix] = split
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest
