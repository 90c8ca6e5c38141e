"""Answer questions about pictures with the saved parts of a LLaVA run, fully offline (local files only).

    python tools/chat.py runs/llava_demo_stage2/llava --image shape.png --prompt "What color is the shape?"
    python tools/chat.py runs/llava_demo_stage2/llava --eval demo:shapes/heldout   # accuracy per question type

``--eval`` asks every question of every sample's conversation on its own (``<image>`` + question, greedy
decoding) and counts exact answers, per question type, beside the chance level of each type (shapes data:
1/6 colours, 1/5 shapes, 1/5 positions, 1/2 sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from mmssl.cli import is_program


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("parts", help="a run's llava/ folder (llava.json, projector.safetensors, ...)")
    parser.add_argument("--image", help="picture to ask about")
    parser.add_argument(
        "--prompt", default="Describe the picture.", help="question (stage-1 parts only caption)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--eval", metavar="SHARDS", help="accuracy on a shard spec's conversations")
    parser.add_argument("--limit", type=int, help="--eval: stop after this many samples")
    parser.add_argument("--json", metavar="FILE", help="--eval: also write the report here")
    parser.add_argument("--picture", metavar="PNG", help="--eval: draw some questions with their answers")
    return parser


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    make_parser().parse_args()

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing below may reach the network

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mmssl.data import shapes  # noqa: E402
from mmssl.data.module import resolve_shards  # noqa: E402
from mmssl.data.shards import SampleDecoder, eval_pipeline  # noqa: E402
from mmssl.data.transforms import llava_view, to_rgb  # noqa: E402
from mmssl.viz import Denormalize, save_answer_grid  # noqa: E402
from mmssl.vlm.llava import LLaVA  # noqa: E402
from mmssl.vlm.parts import load_parts  # noqa: E402

# Question text -> attribute asked about (the shapes set's templates); other data counts as "other".
QUESTION_TYPES = {q: attr for attr, qs in shapes.QUESTIONS.items() for q in qs}
CHANCE = {"color": 1 / len(shapes.COLORS), "shape": 1 / len(shapes.SHAPES),
          "position": 1 / len(shapes.POSITIONS), "size": 1 / len(shapes.SIZES)}  # fmt: skip


def view_for(model: LLaVA):
    p = model.image_processing
    # parts saved before llava.image_aspect_ratio existed were trained on padded pictures
    aspect = p.get("image_aspect_ratio", "pad")
    return llava_view(p["img_size"], p["interpolation"], tuple(p["mean"]), tuple(p["std"]), aspect)


def normalise(answer: str) -> str:
    return " ".join(answer.lower().replace("?", " ").replace(".", " ").split())


def question_items(batch: dict) -> list[tuple[int, str, str, str]]:
    """(image index, question without <image>, answer, type) for every QA pair of a batch's conversations."""
    items = []
    for i, meta in enumerate(batch["json"]):
        turns = meta["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            question = human["value"].replace("<image>", "").strip()
            items.append((i, question, gpt["value"], QUESTION_TYPES.get(question, "other")))
    return items


def evaluate(
    model: LLaVA, spec: str, batch_size: int = 64, limit: int | None = None, picture: str | None = None
) -> dict[str, dict]:
    """{type: {"correct", "total", "accuracy", "chance"}} plus "all" (chance weighted by question counts);
    ``picture``: also draw the first batch's first 12 questions with their answers (green right, red wrong)."""
    urls = resolve_shards(spec, "--eval")
    batches = eval_pipeline(urls, view_for(model), batch_size, rank=0, world_size=1, decoder=SampleDecoder())
    correct, total, seen = Counter(), Counter(), 0
    for batch in tqdm(batches, desc="answering", disable=None):
        if "json" not in batch:
            raise ValueError(f"--eval {spec}: samples have no .json conversations to ask")
        items = question_items(batch)
        images = batch["image"][torch.tensor([i for i, *_ in items])]
        answers = model.generate(images, [q for _, q, _, _ in items], max_new_tokens=8)
        hits = [normalise(a) == normalise(truth) for (_, _, truth, _), a in zip(items, answers, strict=True)]
        for (_, _, _, kind), hit in zip(items, hits, strict=True):
            total[kind] += 1
            correct[kind] += hit
        if picture and seen == 0:
            shown = items[:12]
            captions = [f"{q}\n{a!r} (truth {t!r})" for (_, q, t, _), a in zip(shown, answers, strict=False)]
            denorm = Denormalize(model.image_processing["mean"], model.image_processing["std"])
            save_answer_grid(denorm(images[: len(shown)]), captions, hits[: len(shown)], picture, title=spec)
        seen += len(batch["json"])
        if limit is not None and seen >= limit:
            break
    report = {
        kind: {"correct": correct[kind], "total": total[kind], "accuracy": correct[kind] / total[kind],
               "chance": CHANCE.get(kind)}
        for kind in sorted(total)
    }  # fmt: skip
    n = sum(total.values())
    chance = sum(CHANCE.get(k, 0.0) * total[k] for k in total) / n if n else None
    report["all"] = {"correct": sum(correct.values()), "total": n, "accuracy": sum(correct.values()) / max(n, 1),
                     "chance": chance}  # fmt: skip
    return report


def answer(model: LLaVA, image_path: str, prompt: str, max_new_tokens: int = 32) -> str:
    image = view_for(model)(to_rgb(Image.open(image_path)))["image"]
    return model.generate(image[None], [prompt], max_new_tokens=max_new_tokens)[0]


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not (args.image or args.eval):
        parser.error("give --image (with --prompt) or --eval SHARDS")
    try:
        model = load_parts(args.parts)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.image:
        print(answer(model, args.image, args.prompt, args.max_new_tokens))
    if args.eval:
        report = evaluate(model, args.eval, limit=args.limit, picture=args.picture)
        for kind, r in report.items():
            chance = f"{r['chance']:.3f}" if r["chance"] is not None else "?"
            print(f"{kind:>8}: {r['accuracy']:.3f} ({r['correct']}/{r['total']}), chance {chance}")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
