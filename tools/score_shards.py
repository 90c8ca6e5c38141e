"""Score every sample of a shard set with a trained model: one JSON row per sample (shard, key, scores, pixel
SHA-1, pHash), written shard by shard under --out; an interrupted run resumes where it stopped.

    python tools/score_shards.py demo:shapes/val --scorer clip_score runs/clip_demo/checkpoints/last.ckpt --out scores/clip
    python tools/score_shards.py '/data/cc-{000..099}.tar' --scorer vlm runs/llava_stage2/llava --out scores/vlm
    python tools/score_shards.py SHARDS --scorer embed runs/mae_demo/checkpoints/last.ckpt --out scores/embed
    python tools/score_shards.py SHARDS --scorer hash --out scores/hash               # hashes only, no model
    torchrun --nproc-per-node 8 tools/score_shards.py SHARDS --scorer clip_score CKPT --out scores/clip

Scorers:
  clip_score CKPT  cosine similarity of the image and caption embeddings of a checkpoint whose objective
                 embeds both (a CLIP run: DataComp's CLIP score, row field clip_score); the image embeddings
                 are saved too (NAME.safetensors) for deduplication
  vlm PARTS      Ask-VLM: P(yes) / (P(yes) + P(no)) of a LLaVA chat model's next token after the prompt (default:
                 '<image>\\nDoes the caption "{caption}" describe the picture? Answer yes or no.'); also p_yes, p_no
  embed CKPT     pooled image features of any encoder (.ckpt, exported .safetensors, HF folder), for dedup
  hash           no model: only the pixel hash and the perceptual hash every row carries

Several processes split the shards as evaluation does (shards to ranks, then to --num-workers loader workers;
every sample once): rank and world size come from torchrun's RANK/WORLD_SIZE or --rank/--world-size, and each
process writes its own shards' files into the same --out. Samples that training would skip (corrupt image,
missing caption) are skipped and counted per shard; captions are cut to the model's context as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # LLaVA decoders load from local folders only

from mmssl.cli import is_program  # noqa: E402

KINDS = ("clip_score", "vlm", "embed", "hash")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shards", help="shard spec: pattern, '::'-joined list or demo:NAME/SPLIT")
    parser.add_argument(
        "--scorer", nargs="+", required=True, metavar=("KIND", "PATH"), help=f"one of {KINDS}, then the model"
    )
    parser.add_argument("--out", required=True, help="folder for the score files (resumed if it exists)")
    parser.add_argument(
        "--prompt", help="vlm: the question, holding {caption} (default: scorers.DEFAULT_PROMPT, shown above)"
    )
    parser.add_argument(
        "--answers", nargs=2, default=("yes", "no"), metavar=("YES", "NO"), help="vlm answers"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    args = parser.parse_args(argv)
    kind, *path = args.scorer
    if kind not in KINDS or len(path) != (kind != "hash"):
        parser.error(
            f"--scorer: give 'clip_score CKPT', 'vlm PARTS', 'embed CKPT' or 'hash', got {args.scorer}"
        )
    args.kind, args.model = kind, (path or [None])[0]
    return args


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    parse_args(None)

import torch  # noqa: E402

from mmssl import factory  # noqa: E402
from mmssl.data.module import resolve_shards  # noqa: E402
from mmssl.data.shards import SampleDecoder  # noqa: E402
from mmssl.data.transforms import CaptionTokens, eval_view, llava_view  # noqa: E402
from mmssl.eval.curate import scorers, scoring  # noqa: E402
from mmssl.eval.features import fingerprint  # noqa: E402
from mmssl.vlm.parts import MANIFEST as LLAVA_MANIFEST  # noqa: E402
from mmssl.vlm.parts import load_parts  # noqa: E402


def _clip_score(path: str, device: str):
    """A checkpoint whose objective embeds pictures and captions in one space (its spec reads caption tokens,
    and it has ``encode_image`` / ``encode_text``); its evaluation view and training caption tokeniser."""
    objective, cfg = factory.objective_from_checkpoint(path)
    if factory.spec_of(cfg).text != "tokens" or not all(
        callable(getattr(objective, m, None)) for m in ("encode_image", "encode_text")
    ):
        raise ValueError(
            f"a {cfg.objective!r} checkpoint: the clip_score scorer needs an objective that embeds pictures "
            "and caption tokens in one space (encode_image / encode_text)"
        )
    _, view = factory.build_views(cfg)
    text_fn = CaptionTokens(factory.build_tokenizer(cfg))  # as the training data workers tokenise
    return scorers.ClipScore(objective.to(device)), view, text_fn, cfg.data.max_image_pixels


def _vlm(path: str, args: argparse.Namespace):
    if not Path(path, LLAVA_MANIFEST).is_file():
        raise FileNotFoundError(
            f"not a LLaVA parts folder (no {LLAVA_MANIFEST}); pass a run's llava/ folder, e.g. runs/NAME/llava"
        )
    model = load_parts(path).to(args.device)
    p = model.image_processing
    # parts saved before llava.image_aspect_ratio existed were trained on padded pictures (as tools/chat.py)
    aspect = p.get("image_aspect_ratio", "pad")
    view = llava_view(p["img_size"], p["interpolation"], tuple(p["mean"]), tuple(p["std"]), aspect)
    return scorers.AskVLM(model, args.prompt, tuple(args.answers)), view


def _embed(path: str, device: str):
    backbone, info = factory.load_encoder(path)
    view = eval_view(
        info["img_size"],
        info.get("crop_pct", 0.875),
        info["interpolation"],
        tuple(info["mean"]),
        tuple(info["std"]),
    )
    return scorers.ImageEmbedding(backbone.to(device)), view


def build_scorer(args: argparse.Namespace):
    """(scorer, view, text_fn, decoder, settings) for ``--scorer``; a wrong kind of model is refused by name."""
    settings: dict = {"scorer": args.kind}
    view = text_fn = None
    max_pixels = SampleDecoder().max_image_pixels
    try:
        if args.kind == "clip_score":
            scorer, view, text_fn, max_pixels = _clip_score(args.model, args.device)
        elif args.kind == "vlm":
            scorer, view = _vlm(args.model, args)
            settings.update(prompt=args.prompt, answers=list(args.answers))
        elif args.kind == "embed":
            scorer, view = _embed(args.model, args.device)
        else:
            scorer = scorers.HashOnly()
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--scorer {args.kind} {args.model}: {e}") from None
    if args.model is not None:
        settings.update(model=str(Path(args.model).resolve()), model_fingerprint=fingerprint(args.model))
    decoder = SampleDecoder(require_text=scorer.needs_text, max_image_pixels=max_pixels)
    return scorer, view, text_fn, decoder, settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.prompt = args.prompt or scorers.DEFAULT_PROMPT
    if args.device is None:
        local = int(os.environ.get("LOCAL_RANK", 0))
        args.device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    try:
        urls = resolve_shards(args.shards, "shards")
        scorer, view, text_fn, decoder, settings = build_scorer(args)
        counts = scoring.score_shards(
            urls, scorer, args.out, settings=settings, view=view, text_fn=text_fn, decoder=decoder,
            rank=args.rank, world_size=args.world_size, batch_size=args.batch_size, num_workers=args.num_workers,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = dict(counts.pop("skipped"))
    print(
        f"rank {args.rank}/{args.world_size}: {counts['shards']} shards ({counts['already_done']} already done), "
        f"{counts['scored']} samples scored, skipped {sum(skipped.values())} {json.dumps(skipped)} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
