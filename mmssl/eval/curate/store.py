"""Score files: one folder per scorer run, three files per shard and ``scores.json`` (what scored them).

Per shard ``NAME``: ``NAME.jsonl`` (one row per sample: shard, key, scores, pixel SHA-1, pHash),
``NAME.safetensors`` (``embedding`` (N, D) in row order, when the scorer keeps embeddings) and, written last as
the completion mark, ``NAME.json`` (the shard's path and fingerprint, row count and skip counts by reason).
Every file is replaced atomically, so an interrupted run leaves whole shards or nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmssl.eval.features import fingerprint

SETTINGS = "scores.json"


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


def check_unique_names(urls: list[str]) -> None:
    seen: dict[str, str] = {}
    for url in urls:
        other = seen.setdefault(shard_name(url), url)
        if other != url:
            raise ValueError(
                f"two shards are named {shard_name(url)!r} ({other}, {url}): score files are per name"
            )


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
