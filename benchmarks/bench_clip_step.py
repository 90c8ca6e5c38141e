"""CLIP training-step throughput: mmssl's objective vs a plain open_clip training step, same model, same batch.

    python benchmarks/bench_clip_step.py                     # tiny, then open_clip ViT-B-32; 224 px, batch 16
    python benchmarks/bench_clip_step.py --size tiny --batch 64 --precision both

Both sides hold the same open_clip towers with the same weights. A step is forward + symmetric contrastive loss +
backward + AdamW update (wd 0.2 except gains, biases and the temperature) + the logit-scale clamp:
* mmssl: ``objective(batch)["loss"]`` (L2-norm, ``open_clip.ClipLoss`` through ``mmssl.losses.clip_loss``),
  mmssl's param groups (``mmssl.optim.create_optimizer``), ``objective.after_optimizer_step()``;
* open_clip: ``model(images, tokens)`` -> ``ClipLoss()`` -> AdamW with open_clip_train/main.py's groups and
  train.py's ``logit_scale.clamp_(0, ln 100)``.
Rounds alternate between the two so machine drift hits both alike; the median round counts. fp32, and bf16
autocast (around forward and loss, on both sides) where the CPU has native bf16 (``--precision``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import open_clip
import torch
from common import Ratio, add_precision_arg, machine_line, precisions

from mmssl import config as C
from mmssl.data import shapes
from mmssl.factory import build_objective, build_tokenizer
from mmssl.optim import create_optimizer

SIZES = {  # name: config overrides (tiny: a 2-layer image and text tower, quick on a CPU)
    "b32": [],
    "tiny": [
        "clip.embed_dim=128",
        "clip.vision_cfg={layers: 2, width: 192, head_width: 64, patch_size: 16}",
        "clip.text_cfg={context_length: 32, width: 128, heads: 4, layers: 2}",
    ],
}


def build_pair(size: str, img: int):
    cfg = C.load(
        "clip_vitb32",
        ["data.train_shards=/nowhere-{000..001}.tar", f"backbone.img_size={img}", *SIZES[size]],
    )
    ours = build_objective(cfg)
    c = cfg.clip
    base = open_clip.get_model_config(c.model)
    peer = open_clip.create_model(
        c.model,
        force_custom_text=True,
        embed_dim=c.embed_dim or base["embed_dim"],
        text_cfg={**base["text_cfg"], **c.text_cfg},
        vision_cfg={**base["vision_cfg"], **c.vision_cfg, "image_size": img},
    )
    peer.visual.load_state_dict(ours.image_tower.state_dict())
    peer.text.load_state_dict(ours.text_tower.state_dict())
    return cfg, ours, peer


def open_clip_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """open_clip_train/main.py: no weight decay on 1-D parameters, norms, biases and logit_scale."""

    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2},
    ]
    return torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6)


def mmssl_step(objective, opt, batch, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = objective(batch)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    objective.after_optimizer_step()


def open_clip_step(model, opt, batch, loss_fn, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        image, text, scale = model(batch["image"], batch["tokens"])
        loss = loss_fn(image, text, scale)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


def images_per_second(step, batch, steps: int, min_seconds: float = 0.0) -> float:
    """``steps`` steps, then more until ``min_seconds`` have passed (the same rule for both sides)."""
    start, done = time.perf_counter(), 0
    while done < steps or time.perf_counter() - start < min_seconds:
        step(batch)
        done += 1
    return batch["image"].shape[0] * done / (time.perf_counter() - start)


# A tiny step takes ~0.1 s: one step a round, two rounds (the former quick setting) left the tiny ratio to the
# noise of two samples (0.97x-1.04x between runs); rounds of at least 0.5 s keep ViT-B/32 at one step a round.
QUICK = ["--size", "tiny", "b32", "--batch", "8", "--steps", "1", "--rounds", "3", "--min-seconds", "0.5"]


def measure(argv: list[str] | None = None) -> list[Ratio]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=SIZES, nargs="+", default=["tiny", "b32"])
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.0, help="repeat steps in a round until then")
    add_precision_arg(parser)
    args = parser.parse_args(argv)
    print(machine_line())
    return [r for size in args.size for r in compare(size, args)]


def compare(size: str, args: argparse.Namespace) -> list[Ratio]:
    torch.manual_seed(0)
    cfg, ours, peer = build_pair(size, args.img)
    captions = [caption for _, _, caption, _, _ in shapes.samples("train", args.batch, 0)]
    batch = {
        "image": torch.randn(args.batch, 3, args.img, args.img),
        "tokens": build_tokenizer(cfg)(captions),
    }
    ours_opt = create_optimizer(ours, "adamw", 5e-4, 0.2, (0.9, 0.98), 1e-6)
    peer_opt, loss_fn = open_clip_optimizer(peer), open_clip.ClipLoss()
    params = sum(p.numel() for p in ours.parameters())
    print(f"CLIP {size} ({params / 1e6:.1f}M parameters), {args.img}px, batch {args.batch}, "
          f"torch {torch.__version__}, open_clip {open_clip.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    results = []
    for label in precisions(args.precision):
        bf16 = label == "bf16"
        impls = {
            "mmssl": lambda b, bf16=bf16: mmssl_step(ours, ours_opt, b, bf16),
            "open_clip": lambda b, bf16=bf16: open_clip_step(peer, peer_opt, b, loss_fn, bf16),
        }
        for step in impls.values():
            step(batch)  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, step in impls.items():
                rates[name].append(images_per_second(step, batch, args.steps, args.min_seconds))
        a, b = statistics.median(rates["mmssl"]), statistics.median(rates["open_clip"])
        print(f"{label}: mmssl {a:7.2f} img/s | open_clip {b:7.2f} img/s | ratio {a / b:.2f}x")
        case = f"{'ViT-B/32' if size == 'b32' else size} {args.img}px, batch {args.batch}"
        results.append(Ratio.of_rates("CLIP step", case, label, a, b, "img/s", "open_clip"))
    return results


if __name__ == "__main__":
    measure()
