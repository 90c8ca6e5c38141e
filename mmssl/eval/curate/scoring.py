"""Score every sample of a shard set with a trained model; one row per sample, written shard by shard.

Scorers (each returns per-sample values for a batch; ``embedding`` rows are kept for deduplication):

* :class:`ClipScore`: the cosine similarity of the image and caption embeddings, DataComp's "CLIP score"
  (Gadre et al. 2023, *DataComp*, §3.4 baselines; LAION-5B filtered at 0.28 with OpenAI's ViT-B/32). Captions
  are tokenised by the training ``text_fn`` (an over-long caption is cut keeping the end token, as in training).
* :class:`AskVLM`: Ask-LLM (Sachdeva et al. 2024, *How to Train Data-Efficient LLMs*, §3: the score is the
  probability that the model answers "yes" to whether an example is good) for image-text pairs: a LLaVA
  chat model sees the image and a question holding the caption (:data:`DEFAULT_PROMPT`); the score is
  P(yes) / (P(yes) + P(no)) from the decoder's next-token distribution after the prompt (``p_yes`` and
  ``p_no``, over the whole vocabulary, are kept too).
* :class:`ImageEmbedding`: pooled image features of any encoder (``forward_pooled``), for deduplication only.
* :class:`HashOnly`: no model, only the hashes every row carries (``sha1`` of the pixels, ``phash``).

Data goes through the evaluation splitting of ``data/shards.py`` (shards to ranks, ``urls[rank::world]``, then
to DataLoader workers; every sample once) with each sample's shard and key kept, and batches never straddle
two shards: a shard is written (``NAME.jsonl`` rows, ``NAME.safetensors`` embeddings, then ``NAME.json``
with the skip counts, last, as the completion mark) as soon as its last batch is scored. An interrupted run
resumes by skipping the shards already marked; the input shards are only read. Samples that training would
skip (``SampleDecoder``: corrupt image, missing caption, ...) are skipped and counted by reason per shard.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from mmssl.data.shards import SampleDecoder, collate, count_samples
from mmssl.eval.curate.hashing import phash_hex, pixel_hash
from mmssl.eval.features import fingerprint
from mmssl.vlm.llava import LLaVA
from mmssl.vlm.prompt import IGNORE_INDEX, IMAGE_TOKEN, Encoded

SETTINGS = "scores.json"
# The default Ask-VLM question; ``{caption}`` is replaced by the sample's caption. The chat template puts the
# image before it (``PromptEncoder.prompt``), so the model sees "<image>\nDoes the caption ... yes or no."
DEFAULT_PROMPT = 'Does the caption "{caption}" describe the picture? Answer yes or no.'


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class ClipScore:
    """Cosine similarity of normalised image and caption embeddings; the image embedding is kept."""

    name, needs_text = "clip", True

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = (
            model.eval()
        )  # anything with encode_image / encode_text (objectives.clip.CLIP, open_clip)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        device = _device(self.model)
        image = self.model.encode_image(batch["image"].to(device), normalize=True).float()  # (B, E)
        text = self.model.encode_text(batch["text"].to(device), normalize=True).float()  # (B, E)
        return {"clip": (image * text).sum(-1), "embedding": image}


class ImageEmbedding:
    """Pooled features of an encoder in the backbone contract (what linear probes and kNN read)."""

    name, needs_text = "embed", False

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.backbone = backbone.eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        images = batch["image"].to(_device(self.backbone))
        return {"embedding": self.backbone.forward_pooled(images).float()}  # (B, D)


class HashOnly:
    name, needs_text = "hash", False

    def __call__(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {}


class AskVLM:
    """P("yes") of a LLaVA chat model asked whether the caption describes the picture (see module docstring).

    ``prompt`` must hold ``{caption}``; ``answers`` are the (yes, no) words, each one token of the decoder's
    vocabulary as the training answers are tokenised (``PromptEncoder.tokens``). A caption that would make the
    prompt longer than ``llava.max_length`` is cut (training cuts over-long sequences at that length; here the
    caption is cut so that the question, after which the answer comes, stays whole).
    """

    name, needs_text = "vlm", True

    def __init__(self, model: LLaVA, prompt: str = DEFAULT_PROMPT, answers: tuple[str, str] = ("yes", "no")):
        if model.prompt.conversation != "chat":
            raise ValueError(
                f"the LLaVA model uses the {model.prompt.conversation!r} layout: it only captions and ignores "
                "questions; Ask-VLM needs an instruction-tuned (stage 2, conversation=chat) model"
            )
        if "{caption}" not in prompt:
            raise ValueError(f"--prompt must contain '{{caption}}', got {prompt!r}")
        self.model, self.prompt = model.eval(), prompt
        self.answer_ids = [self._answer_id(word) for word in answers]

    def _answer_id(self, word: str) -> int:
        tok = self.model.prompt.tokenizer
        ids = self.model.prompt.tokens(word)
        if len(ids) != 1 or ids[0] == tok.unk_token_id:
            shown = tok.convert_ids_to_tokens(ids)
            raise ValueError(
                f"answer {word!r} is not one token of the decoder's vocabulary (it tokenises as {shown}): the "
                "model cannot answer it; pass --answers with words it was trained to answer"
            )
        return ids[0]

    def prompt_ids(self, caption: str) -> list[int]:
        p = self.model.prompt
        caption = caption.replace(IMAGE_TOKEN, " ")  # the image goes where the template puts it, once
        ids = p.prompt(self.prompt.format(caption=caption))
        if len(ids) <= p.max_length:
            return ids
        budget = p.max_length - len(p.prompt(self.prompt.format(caption="")))
        if budget < 1:
            raise ValueError(f"the prompt without a caption is longer than llava.max_length={p.max_length}")
        words = p.tokens(caption)[:budget]
        while True:  # decoding and re-tokenising may merge differently; shorten until it fits
            ids = p.prompt(self.prompt.format(caption=p.tokenizer.decode(words)))
            if len(ids) <= p.max_length or not words:
                return ids
            words = words[:-1]

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        model = self.model
        encoded = [Encoded(ids, [IGNORE_INDEX] * len(ids)) for ids in map(self.prompt_ids, batch["text"])]
        padded = model.prompt.pad_batch(
            encoded, padding_side="left"
        )  # every prompt ends at the last position
        device = _device(model)
        ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
        embeds = model.embed(batch["image"].to(device), ids)  # (B, L, D)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each prompt counts from 0, as generate() sets it
        out = model.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1
        )
        logp = out.logits[:, -1].float().log_softmax(-1)  # (B, V) next-token distribution
        yes, no = logp[:, self.answer_ids[0]], logp[:, self.answer_ids[1]]
        return {"vlm": torch.sigmoid(yes - no), "p_yes": yes.exp(), "p_no": no.exp()}


class ShardBatches:
    """Pipeline stage: raw samples -> decoded, viewed batches that never straddle shards.

    Every batch has ``shard`` (the url), ``size``, ``key``/``sha1``/``phash`` lists, the view's tensors and
    ``text`` when ``use_text``; the last batch of a shard (possibly empty) has ``done=True`` and ``skipped``,
    the shard's skip counts by reason (SampleDecoder's, including an unreadable tail of the tar file).
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
        out = {"key": sample["__key__"], "sha1": pixel_hash(image), "phash": phash_hex(image)}
        if self.view is not None:
            out.update(self.view(image))
        if self.use_text:
            out["text"] = self.text_fn(sample["text"]) if self.text_fn is not None else sample["text"]
        return out

    def _batch(self, url: str, items: list[dict], done: bool, start: Counter) -> dict:
        batch = collate(items) if items else {}
        batch.update(shard=url, size=len(items), done=done)
        if done:
            batch["skipped"] = dict(self.decoder.failures - start)
        return batch

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        url, items, start = None, [], Counter()
        for raw in src:
            if raw.get("__url__") != url:
                if url is not None:
                    yield self._batch(url, items, True, start)
                url, items, start = raw.get("__url__"), [], Counter(self.decoder.failures)
            sample = self.decoder(raw)
            if sample is None:
                continue
            items.append(self._prepare(sample))
            if len(items) == self.batch_size:
                yield self._batch(url, items, False, start)
                items = []
        if url is not None:
            yield self._batch(url, items, True, start)


def shard_name(url: str) -> str:
    return Path(url).name.removesuffix(".tar")


class ScoreStore:
    """A folder of per-shard score files plus ``scores.json`` (what scored them); see the module docstring."""

    def __init__(self, directory: str | Path, settings: dict | None = None) -> None:
        self.dir = Path(directory)
        path = self.dir / SETTINGS
        saved = json.loads(path.read_text()) if path.is_file() else None
        if settings is not None:
            settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back
            if saved is not None and saved != settings:
                changed = sorted(k for k in {*saved, *settings} if saved.get(k) != settings.get(k))
                raise ValueError(
                    f"{self.dir} holds scores made with other settings (differing: {changed}; saved "
                    f"{ {k: saved.get(k) for k in changed} }): resume with the same settings or use another --out"
                )
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic(path, json.dumps(settings, indent=1) + "\n")  # every rank writes the same text
        elif saved is None:
            raise FileNotFoundError(
                f"{self.dir}: no {SETTINGS}; not a folder written by tools/score_shards.py"
            )
        self.settings = settings if settings is not None else saved

    def summary(self, url: str) -> dict | None:
        path = self.dir / f"{shard_name(url)}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def is_done(self, url: str) -> bool:
        """Marked done, and for this very file (a shard rewritten since is scored again)."""
        s = self.summary(url)
        return s is not None and s.get("fingerprint") == fingerprint(url)

    def write(self, url: str, rows: list[dict], embeddings: Tensor | None, skipped: dict) -> None:
        name = shard_name(url)
        _atomic(self.dir / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        emb = self.dir / f"{name}.safetensors"
        if embeddings is not None:
            tmp = emb.with_name(f".{emb.name}.tmp{os.getpid()}")
            save_file({"embedding": embeddings.contiguous()}, str(tmp))
            os.replace(tmp, emb)
        summary = {"shard": str(Path(url).resolve()), "fingerprint": fingerprint(url), "rows": len(rows),
                   "skipped": skipped, "embedding": embeddings is not None}  # fmt: skip
        _atomic(self.dir / f"{name}.json", json.dumps(summary) + "\n")  # last: the completion mark


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class _Pending:
    rows: list[dict] = field(default_factory=list)
    embeddings: list[Tensor] = field(default_factory=list)


def _rows(batch: dict, scores: dict[str, Tensor]) -> list[dict]:
    name = shard_name(batch["shard"])
    values = {k: v.float().cpu().tolist() for k, v in scores.items() if k != "embedding"}
    return [
        {
            "shard": name,
            "key": key,
            **{k: round(v[i], 6) for k, v in values.items()},
            "sha1": batch["sha1"][i],
            "phash": batch["phash"][i],
        }  # fmt: skip
        for i, key in enumerate(batch["key"])
    ]


def check_unique_names(urls: list[str]) -> None:
    seen: dict[str, str] = {}
    for url in urls:
        other = seen.setdefault(shard_name(url), url)
        if other != url:
            raise ValueError(
                f"two shards are named {shard_name(url)!r} ({other}, {url}): score files are per name"
            )


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
        for batch in loader:
            acc = pending.setdefault(batch["shard"], _Pending())
            if batch["size"]:
                scores = scorer(batch)
                acc.rows += _rows(batch, scores)
                if "embedding" in scores:
                    acc.embeddings.append(scores["embedding"].float().cpu())
                bar.update(batch["size"])
            if batch["done"]:
                emb = torch.cat(acc.embeddings) if acc.embeddings else None
                store.write(batch["shard"], acc.rows, emb, batch["skipped"])
                counts["scored"] += len(acc.rows)
                counts["skipped"].update(batch["skipped"])
                finished.add(batch["shard"])
                del pending[batch["shard"]]
    for url in todo:  # no sample came out at all (empty, or unreadable from its first byte)
        if url not in finished:
            store.write(url, [], None, {"no sample read (empty or unreadable shard)": 1})
            counts["skipped"]["no sample read (empty or unreadable shard)"] += 1
    return counts


@dataclass
class Scores:
    """Rows of one score folder in shard-name order, with embeddings (N, D) aligned to them when saved."""

    settings: dict
    summaries: dict[str, dict]
    rows: list[dict]
    embeddings: Tensor | None


def read_scores(directory: str | Path) -> Scores:
    store = ScoreStore(directory)
    summaries = {
        p.stem: json.loads(p.read_text()) for p in sorted(store.dir.glob("*.json")) if p.name != SETTINGS
    }
    rows: list[dict] = []
    embeddings: list[Tensor] = []
    for name, summary in summaries.items():
        lines = (store.dir / f"{name}.jsonl").read_text().splitlines()
        rows += [json.loads(line) for line in lines if line]
        if summary.get("embedding"):
            embeddings.append(load_file(str(store.dir / f"{name}.safetensors"))["embedding"])
    if embeddings and sum(len(e) for e in embeddings) != len(rows):
        raise ValueError(f"{store.dir}: some shards have embeddings and some not; score them with one scorer")
    return Scores(store.settings, summaries, rows, torch.cat(embeddings) if embeddings else None)
