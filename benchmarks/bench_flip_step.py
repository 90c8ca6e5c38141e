"""FLIP vs CLIP training-step time: the same model and batch, the image tower on every patch (CLIP) or on a random
(1 - r) of them (FLIP, ``clip.image_mask_ratio``), in one process.

    python benchmarks/bench_flip_step.py                          # ViT-B/16 image tower, 224 px, batch 16
    python benchmarks/bench_flip_step.py --size tiny --batch 64   # seconds on a CPU

A step is forward + contrastive loss + backward + AdamW update. At r = 0.5 the image tower's blocks see half the
tokens (attention a quarter of the pairs), so its share of the step roughly halves; the text tower and the loss
are unchanged, so the whole step gains less (FLIP §3, Table 1: the speed-up grows with the image tower's share).
Rounds alternate between the settings so machine drift hits all alike; the median round counts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import Ratio, machine_line

from mmssl import config as C
from mmssl.data import shapes
from mmssl.factory import build_objective, build_tokenizer
from mmssl.optim import create_optimizer

SIZES = {  # name: config overrides
    "b16": [],  # configs/flip_vitb16.yaml: ViT-B/16 image tower, open_clip ViT-B-16 text tower
    "tiny": [
        "backbone.embed_dim=192", "backbone.depth=4", "backbone.num_heads=3", "clip.embed_dim=128",
        "clip.text_cfg={context_length: 32, width: 128, heads: 4, layers: 2}",
    ],
}  # fmt: skip


def step_time(objective, opt, batch, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = objective(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        objective.after_optimizer_step()
    return (time.perf_counter() - start) / steps


QUICK = ["--size", "tiny", "--batch", "16", "--steps", "1", "--rounds", "2"]


def measure(argv: list[str] | None = None) -> list[Ratio]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=SIZES, default="b16")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--steps", type=int, default=2, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(machine_line())
    settings = {}
    for ratio in [0.0, *args.ratios]:
        cfg = C.load("flip_vitb16", [f"backbone.img_size={args.img}", f"clip.image_mask_ratio={ratio}",
                                     *SIZES[args.size]])  # fmt: skip
        torch.manual_seed(0)  # the same weights for every setting
        objective = build_objective(cfg).train()
        settings[ratio] = (objective, create_optimizer(objective, "adamw", 1e-4, 0.2, (0.9, 0.95)))
    captions = [caption for _, _, caption, _, _ in shapes.samples("train", args.batch, 0)]
    batch = {
        "image": torch.randn(args.batch, 3, args.img, args.img),
        "tokens": build_tokenizer(cfg)(captions),
    }
    params = sum(p.numel() for p in settings[0.0][0].parameters())
    print(f"FLIP vs CLIP, {args.size} ({params / 1e6:.1f}M parameters), {args.img}px, batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    for objective, opt in settings.values():
        step_time(objective, opt, batch, 1)  # warm-up
    times: dict[float, list[float]] = {ratio: [] for ratio in settings}
    for _ in range(args.rounds):
        for ratio, (objective, opt) in settings.items():
            times[ratio].append(step_time(objective, opt, batch, args.steps))
    clip = statistics.median(times[0.0])
    print(f"CLIP (mask 0): {clip * 1000:8.1f} ms/step")
    rows = []
    for ratio in args.ratios:
        t = statistics.median(times[ratio])
        print(f"FLIP mask {ratio:.2f}: {t * 1000:8.1f} ms/step | step-time ratio FLIP/CLIP {t / clip:.2f}x "
              f"(speed-up {clip / t:.2f}x)")  # fmt: skip
        case = f"{args.size} {args.img}px, batch {args.batch}, mask {ratio:g}"
        rows.append(Ratio.of_times("FLIP step", case, "fp32", t, clip, "unmasked CLIP (mmssl)"))
    return rows


if __name__ == "__main__":
    measure()
