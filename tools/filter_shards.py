"""Keep the good samples of a scored shard set and drop duplicates; write the kept samples, unchanged, as new
shards plus manifest.json, and a report (kept / dropped per reason, score histogram).

    python tools/filter_shards.py demo:shapes/train --scores scores/clip --score clip_score --top-fraction 0.7 --out clean/
    python tools/filter_shards.py SHARDS --scores scores/hash --phash-distance 4 --out dedup/
    python tools/filter_shards.py SHARDS --scores scores/clip --score clip_score --min-score 0.2 \\
        --embeddings scores/clip --cosine 0.95 --out clean/

Decisions, in order (each dropped sample counted under its first reason; see mmssl/eval/curate/selection.py):
not scored (skipped while scoring) -> low score (--min-score, --top-fraction of --score) -> exact duplicate
(same pixels; on unless --no-exact) -> near duplicate by pHash (--phash-distance bits) -> near duplicate by
embedding (--cosine, embeddings from --embeddings). Within a duplicate group the best-scored copy stays (the
first in shard order without --score).

One output shard per input shard (NAME-000000.tar), so an interrupted run resumes with the shards not yet
written; the input shards are only read. Writes OUT/filter_report.json, OUT/decisions.jsonl and, with a
score, OUT/score_histogram.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from mmssl.cli import is_program

REPORT = "filter_report.json"
NOT_SCORED = "not scored"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shards", help="the shard spec that was scored")
    parser.add_argument(
        "--scores", nargs="+", required=True, metavar="DIR", help="tools/score_shards.py folders"
    )
    parser.add_argument("--out", required=True, help="folder for the filtered shards (resumed if it exists)")
    parser.add_argument("--score", help="the row field to filter and rank by (clip_score, vlm, p_yes, ...)")
    parser.add_argument("--min-score", type=float, help="keep samples with score >= this")
    parser.add_argument("--top-fraction", type=float, help="keep this fraction of the best-scored samples")
    parser.add_argument("--no-exact", dest="exact", action="store_false", help="keep exact duplicates")
    parser.add_argument("--phash-distance", type=int, help="drop pHash near duplicates within this many bits")
    parser.add_argument("--embeddings", metavar="DIR", help="score folder whose embeddings --cosine compares")
    parser.add_argument("--cosine", type=float, help="drop near duplicates with cosine similarity >= this")
    args = parser.parse_args(argv)
    if (args.min_score is not None or args.top_fraction is not None) and not args.score:
        parser.error("--min-score / --top-fraction need --score NAME")
    if (args.cosine is None) != (args.embeddings is None):
        parser.error("--cosine and --embeddings go together")
    return args


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    parse_args(None)

import torch  # noqa: E402

from mmssl.data.module import resolve_shards  # noqa: E402
from mmssl.eval.curate import selection  # noqa: E402
from mmssl.eval.curate.store import check_unique_names, read_scores, shard_name  # noqa: E402
from mmssl.eval.features import fingerprint  # noqa: E402
from mmssl.viz import save_histogram  # noqa: E402


def load_rows(urls: list[str], dirs: list[str], embeddings_dir: str | None):
    """Rows present in every score folder, merged, in input shard order; embeddings aligned to them."""
    names = [shard_name(u) for u in urls]
    merged: dict[tuple[str, str], dict] | None = None
    emb: torch.Tensor | None = None
    for directory in dict.fromkeys([*dirs, *([embeddings_dir] if embeddings_dir else [])]):
        scores = read_scores(directory)
        for name, url in zip(names, urls, strict=True):
            summary = scores.summaries.get(name)
            if summary is None:
                raise ValueError(
                    f"{directory} has no scores for shard {url}: run tools/score_shards.py to the end"
                )
            if summary["fingerprint"] != fingerprint(url):
                raise ValueError(f"{directory}: the scores of {name} were made from another version of {url}")
        wanted = set(names)
        index = {(r["shard"], r["key"]): i for i, r in enumerate(scores.rows) if r["shard"] in wanted}
        if directory == embeddings_dir:
            if scores.embeddings is None:
                raise ValueError(
                    f"--embeddings {directory}: its scorer saved no embeddings (use clip_score or embed)"
                )
            emb_index, emb_all = index, scores.embeddings
        if directory in dirs:
            rows = {k: scores.rows[i] for k, i in index.items()}
            merged = rows if merged is None else {k: {**v, **rows[k]} for k, v in merged.items() if k in rows}
    order = {n: i for i, n in enumerate(names)}
    keys = sorted(
        merged, key=lambda k: order[k[0]]
    )  # shard order; rows keep their order within a shard (stable)
    if embeddings_dir:
        missing = [k for k in keys if k not in emb_index]
        if missing:
            raise ValueError(
                f"--embeddings {embeddings_dir}: no embedding for {len(missing)} rows (e.g. {missing[0]})"
            )
        emb = emb_all[torch.tensor([emb_index[k] for k in keys], dtype=torch.long)]
    return [merged[k] for k in keys], emb


def settings_of(args: argparse.Namespace, urls: list[str]) -> dict:
    keys = ("score", "min_score", "top_fraction", "exact", "phash_distance", "embeddings", "cosine")
    out = {k: getattr(args, k) for k in keys}
    out.update(
        scores=[str(Path(d).resolve()) for d in args.scores], shards=[str(Path(u).resolve()) for u in urls]
    )
    if out["embeddings"]:
        out["embeddings"] = str(Path(out["embeddings"]).resolve())
    return out


def run(args: argparse.Namespace) -> dict:
    urls = resolve_shards(args.shards, "shards")
    check_unique_names(urls)
    out = Path(args.out)
    settings = settings_of(args, urls)
    report_path = out / REPORT
    if report_path.is_file():
        saved = json.loads(report_path.read_text()).get("settings")
        if saved != settings:
            raise ValueError(f"{out} was filtered with other settings ({saved}); use another --out")
    rows, embeddings = load_rows(urls, args.scores, args.embeddings)
    reasons, info = selection.decide(
        rows, score=args.score, min_score=args.min_score, top_fraction=args.top_fraction, dedup_exact=args.exact,
        phash_distance=args.phash_distance, embeddings=embeddings, cosine=args.cosine,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": settings, "threshold": info["threshold"], "complete": False}
    report_path.write_text(json.dumps(report, indent=1) + "\n")  # settings first: a resumed run checks them
    with open(out / "decisions.jsonl", "w") as f:
        for row, reason in zip(rows, reasons, strict=True):
            f.write(json.dumps({"shard": row["shard"], "key": row["key"], "reason": reason,
                                **({args.score: row[args.score]} if args.score else {})}) + "\n")  # fmt: skip
    keep: dict[str, set[str]] = {}
    for row, reason in zip(rows, reasons, strict=True):
        if reason == selection.KEPT:
            keep.setdefault(row["shard"], set()).add(row["key"])
    manifest = selection.write_filtered(urls, keep, out)
    counts = selection.count_reasons(reasons)
    read = sum(manifest["splits"][shard_name(u)]["samples_read"] for u in urls)
    counts[NOT_SCORED] = read - len(rows)  # skipped while scoring (corrupt, no caption): never copied
    skipped: Counter[str] = Counter()
    for summary in read_scores(args.scores[0]).summaries.values():
        if summary["shard"] in settings["shards"]:
            skipped.update(summary["skipped"])
    report.update(
        complete=True,
        input_samples=read,
        output_samples=sum(manifest["splits"][shard_name(u)]["samples"] for u in urls),
        counts=counts,
        not_scored_by_reason=dict(skipped),
    )
    if args.score:
        values = [r[args.score] for r in rows]
        groups = {"kept": [v for v, r in zip(values, reasons, strict=True) if r == selection.KEPT]}
        for reason in sorted(set(reasons) - {selection.KEPT}):
            groups[reason] = [v for v, r in zip(values, reasons, strict=True) if r == reason]
        title = f"{args.score} over {len(rows)} scored samples: {counts['kept']} kept"
        save_histogram(groups, out / "score_histogram.png", info["threshold"], xlabel=args.score, title=title)
        report["histogram"] = "score_histogram.png"
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = report["counts"]
    print(f"{report['input_samples']} samples in, {report['output_samples']} out -> {args.out}")
    for reason, n in counts.items():
        print(f"  {reason:28s}{n:8d}")
    if report["threshold"] is not None:
        print(f"  score threshold {report['threshold']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
