"""Zero-shot classification and image<->text retrieval of a CLIP checkpoint on image-text shards.

    python tools/zero_shot.py runs/clip_demo/checkpoints/last.ckpt --shards demo:shapes/heldout --templates shapes
    python tools/zero_shot.py last.ckpt --shards '/data/val-{000..009}.tar' --classes classes.txt --json out.json

Class names come from ``--classes`` (a file, one name per line, line i = label i) or from the shards'
``manifest.json`` (``splits.<split>.classes``, as the demo sets write). Each class vector is the mean of the
normalised text embeddings of the class name in every template (CLIP §3.1.4). Accuracy is reported over all
classes and over the classes present in the shards (e.g. only the held-out colour-shape pairs). Retrieval
recall@k is reported for the exact caption of each picture, and with every identical caption counted as a
match (generated sets repeat captions; among identical captions the exact one is a coin toss).

Results are printed as a table and written as JSON (default: beside the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmssl.cli import is_program

TEMPLATES = {
    # CLIP's prompt "a photo of a {label}." (§3.1.4) and two plain variants
    "photo": ("a photo of a {}.", "a {}.", "a picture of a {}."),
    # the demo shapes set: its captions always name a size ("a small red circle at the top left")
    "shapes": ("a small {}", "a large {}", "a photo of a small {}", "a photo of a large {}"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", help="a Lightning checkpoint written by tools/pretrain.py (an image-text objective)"
    )
    parser.add_argument("--shards", required=True, help="image-text shards: pattern or demo:NAME/SPLIT")
    parser.add_argument("--classes", help="file with one class name per line (default: from the manifest)")
    parser.add_argument(
        "--templates",
        nargs="+",
        default=["photo"],
        help=f"prompt templates with '{{}}' for the class name, or a preset: {', '.join(TEMPLATES)}",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", help="where to write the results (default: beside the checkpoint)")
    return parser.parse_args(argv)


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    parse_args(None)

import torch  # noqa: E402

from mmssl import factory  # noqa: E402
from mmssl.data.module import resolve_shards  # noqa: E402
from mmssl.data.shards import SampleDecoder, eval_pipeline, read_manifest  # noqa: E402
from mmssl.data.transforms import CaptionTokens  # noqa: E402
from mmssl.eval.zero_shot import embed, retrieval_recall, zero_shot_accuracy, zero_shot_classifier  # noqa: E402


def load_objective(path: str | Path):
    """(objective, config) of an image-text checkpoint (an objective that reads caption tokens and embeds
    images and texts in one space), through the shared checkpoint loader."""
    objective, cfg = factory.objective_from_checkpoint(path)
    if factory.spec_of(cfg).text != "tokens" or not hasattr(objective, "encode_text"):
        raise ValueError(
            f"{path}: objective {cfg.objective!r} does not embed captions; zero-shot evaluation needs an "
            "image-text objective (encode_image / encode_text)"
        )
    return objective, cfg


def class_names(args: argparse.Namespace, urls: list[str]) -> list[str]:
    if args.classes:
        return [line.strip() for line in Path(args.classes).read_text().splitlines() if line.strip()]
    first = Path(urls[0])
    split = first.name.rsplit("-", 1)[0]
    classes = read_manifest(first.parent).get("splits", {}).get(split, {}).get("classes")
    if not classes:
        raise ValueError(f"no class names: pass --classes (no 'classes' for split {split!r} in the manifest)")
    return list(classes)


def templates(names: list[str]) -> list[str]:
    out = []
    for name in names:
        if name in TEMPLATES:
            out.extend(TEMPLATES[name])
        elif "{}" in name:
            out.append(name)
        else:
            raise ValueError(
                f"--templates {name!r}: neither a preset ({', '.join(TEMPLATES)}) nor has '{{}}'"
            )
    return out


def evaluate(args: argparse.Namespace) -> dict:
    objective, cfg = load_objective(args.checkpoint)
    objective.to(args.device)
    tokenizer = factory.build_tokenizer(cfg)
    urls = resolve_shards(args.shards, "--shards")
    _, view = factory.build_views(cfg)
    pipeline = eval_pipeline(
        urls,
        view,
        args.batch_size,
        rank=0,
        world_size=1,
        decoder=SampleDecoder(require_text=True, max_image_pixels=cfg.data.max_image_pixels),
        text_fn=CaptionTokens(tokenizer),
    )
    loader = torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=min(args.num_workers, len(urls))
    )
    emb = embed(objective, loader, args.device)
    results: dict = {"checkpoint": str(args.checkpoint), "shards": args.shards, "samples": len(emb["image"])}

    if "label" in emb:
        names = class_names(args, urls)
        prompts = templates(args.templates)
        classifier = zero_shot_classifier(objective, tokenizer, names, prompts)
        present = sorted(set(emb["label"].tolist()))
        results["zero_shot"] = {
            "templates": prompts,
            "classes": len(names),
            "all_classes": zero_shot_accuracy(emb["image"], classifier, emb["label"]),
            "chance_all": 1 / len(names),
            "present_classes": zero_shot_accuracy(emb["image"], classifier, emb["label"], classes=present),
            "present": [names[i] for i in present],
            "chance_present": 1 / len(present),
        }
    same_caption = (emb["tokens"][:, None, :] == emb["tokens"][None, :, :]).all(-1)  # (N, N)
    results["retrieval"] = {
        "exact": retrieval_recall(emb["image"], emb["text"]),
        "same_caption": retrieval_recall(emb["image"], emb["text"], positives=same_caption),
        "distinct_captions": len(torch.unique(emb["tokens"], dim=0)),
    }
    return results


def table(results: dict) -> str:
    lines = [f"{results['samples']} samples from {results['shards']}"]
    zs = results.get("zero_shot")
    if zs:
        lines.append(f"zero-shot ({len(zs['templates'])} templates)    top1     top5   chance")
        for key, chance, label in (
            ("all_classes", zs["chance_all"], f"all {zs['classes']} classes"),
            ("present_classes", zs["chance_present"], f"{len(zs['present'])} present classes"),
        ):
            acc = zs[key]
            top5 = f"{acc['top5']:8.3f}" if "top5" in acc else "       -"
            lines.append(f"  {label:28s}{acc['top1']:8.3f} {top5} {chance:8.3f}")
    lines.append("retrieval recall              @1       @5      @10")
    for kind in ("exact", "same_caption"):
        rec = results["retrieval"][kind]
        for direction in ("image_to_text", "text_to_image"):
            row = " ".join(f"{rec[f'{direction}@{k}']:8.3f}" for k in (1, 5, 10))
            lines.append(f"  {direction + ' (' + kind + ')':28s}{row}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        results = evaluate(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(results))
    out = (
        Path(args.json)
        if args.json
        else Path(args.checkpoint).with_name(f"zero_shot_{Path(args.checkpoint).stem}.json")
    )
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
