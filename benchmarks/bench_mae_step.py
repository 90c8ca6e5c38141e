"""MAE training-step throughput: mmssl vs transformers' ViTMAEForPreTraining, same shape, same process.

    python benchmarks/bench_mae_step.py                      # ViT-B/16 + 8x512 decoder, 224 px, batch 8
    python benchmarks/bench_mae_step.py --size small --batch 32 --precision both

A step is forward + backward + AdamW update, each side with the AdamW it trains with: mmssl's
``optim.create_optimizer`` (MAE's weight-decay groups, torch's fused kernel) and, for transformers, torch's
fused AdamW, the Trainer's default (``optim="adamw_torch_fused"``). Rounds alternate between the
implementations so machine drift hits all alike; the median round counts. fp32, and bf16 autocast where the
CPU has native bf16 (``--precision``).

mmssl's fp32 linear layers run on oneDNN where it beats torch's BLAS (``mmssl/linear.py``; the machine line
says which), so the fp32 pass also times mmssl with ``MMSSL_CPU_LINEAR=blas``: the same kernels as
transformers, i.e. the model code alone. Besides the ratios to transformers it prints mmssl's own bf16 / fp32
speed-up against both fp32 runs, and transformers' own (its fp32 runs on torch's BLAS).

bf16 / fp32 depends on the batch: ``--batch 32`` (``run_all.py --only mae_step --bench-args '--batch 32 --steps 1'``)
spreads the per-step costs that do not shrink in bf16 (the AdamW update, the fp32 gradient casts, Python) over
four times the images.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import transformers
from common import Ratio, add_precision_arg, machine_line, precisions

from mmssl import config as C
from mmssl import linear
from mmssl.factory import build_objective
from mmssl.optim import create_optimizer

SIZES = {  # name: (embed_dim, depth, heads, decoder_dim, decoder_depth, decoder_heads)
    "base": (768, 12, 12, 512, 8, 16),
    "small": (384, 12, 6, 256, 4, 8),
}


def mmssl_step_fn(size: str, img: int, patch: int):
    d, depth, heads, dd, ddepth, dheads = SIZES[size]
    cfg = C.load(
        "mae_vitb",
        [f"backbone.img_size={img}", f"backbone.patch_size={patch}", f"backbone.embed_dim={d}",
         f"backbone.depth={depth}", f"backbone.num_heads={heads}", f"mae.decoder_embed_dim={dd}",
         f"mae.decoder_depth={ddepth}", f"mae.decoder_num_heads={dheads}"],
    )  # fmt: skip
    model = build_objective(cfg)
    return model, lambda images: model({"image": images})["loss"]


def hf_step_fn(size: str, img: int, patch: int):
    d, depth, heads, dd, ddepth, dheads = SIZES[size]
    hf_cfg = transformers.ViTMAEConfig(
        hidden_size=d, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * d,
        decoder_hidden_size=dd, decoder_num_hidden_layers=ddepth, decoder_num_attention_heads=dheads,
        decoder_intermediate_size=4 * dd, image_size=img, patch_size=patch, norm_pix_loss=True,
        layer_norm_eps=1e-6, attn_implementation="sdpa",
    )  # fmt: skip
    model = transformers.ViTMAEForPreTraining(hf_cfg)
    return model, lambda images: model(pixel_values=images).loss


def optimizer_for(model) -> torch.optim.Optimizer:
    """The AdamW each library trains with (lr and weight decay as MAE's recipe; they do not change the cost)."""
    if isinstance(model, transformers.PreTrainedModel):  # Trainer's default optim for torch >= 2.8
        return torch.optim.AdamW(
            model.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95), fused=True
        )
    return create_optimizer(model, "adamw", lr=1e-4, weight_decay=0.05)


def time_steps(model, loss_fn, images, steps: int, bf16: bool, library: str | None = None) -> float:
    opt = optimizer_for(model)
    with linear.library(library) if library else contextlib.nullcontext():
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(images)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return images.shape[0] * steps / (time.perf_counter() - start)


QUICK = [
    "--size",
    "base",
    "--img",
    "224",
    "--batch",
    "8",
    "--steps",
    "1",
    "--rounds",
    "2",
]  # ViT-B: the acceptance case


def measure(argv: list[str] | None = None) -> list[Ratio]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=SIZES, default="base")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    add_precision_arg(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.img, args.img)
    impls = {"mmssl": mmssl_step_fn(args.size, args.img, args.patch),
             "transformers": hf_step_fn(args.size, args.img, args.patch)}  # fmt: skip
    print(machine_line())
    print(f"MAE ViT-{args.size} {args.img}px patch {args.patch}, batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    results, own, ref = [], {}, {}
    case = f"ViT-{args.size} {args.img}px, batch {args.batch}"
    for label in precisions(args.precision):
        bf16 = label == "bf16"
        runs = {name: (model, fn, None) for name, (model, fn) in impls.items()}
        if not bf16:  # the same mmssl model on torch's BLAS: what the model code alone does
            runs["mmssl (BLAS)"] = (*impls["mmssl"], "blas")
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for model, fn, library in runs.values():
            time_steps(model, fn, images, 1, bf16, library)  # warm-up
        for _ in range(args.rounds):
            for name, (model, fn, library) in runs.items():
                rates[name].append(time_steps(model, fn, images, args.steps, bf16, library))
        med = {name: statistics.median(r) for name, r in rates.items()}
        ours, peer = med["mmssl"], med["transformers"]
        own[label], ref[label] = ours, peer
        print(f"{label}: mmssl {ours:7.2f} img/s | transformers {peer:7.2f} img/s | ratio {ours / peer:.2f}x")
        results.append(Ratio.of_rates("MAE step", case, label, ours, peer, "img/s", "transformers ViTMAE"))
        if "mmssl (BLAS)" in med:
            blas = own["fp32 BLAS"] = med["mmssl (BLAS)"]
            print(f"{label}: mmssl on torch's BLAS {blas:7.2f} img/s | ratio {blas / peer:.2f}x")
            results.append(Ratio.of_rates(
                "MAE step", f"{case}, linear on torch's BLAS", label, blas, peer, "img/s", "transformers ViTMAE"
            ))  # fmt: skip
    if "bf16" in own and "fp32" in own:
        for fp32, what in (("fp32", "mmssl fp32"), ("fp32 BLAS", "mmssl fp32, BLAS linear")):
            print(f"mmssl bf16 / {fp32}: {own['bf16'] / own[fp32]:.2f}x")
            results.append(Ratio.of_rates(
                "MAE step", f"{case}, bf16 vs own {fp32}", "bf16", own["bf16"], own[fp32], "img/s", what,
            ))  # fmt: skip
        # the peer's own speed-up, same run: what bf16 buys over an fp32 on torch's BLAS
        print(f"transformers bf16 / fp32: {ref['bf16'] / ref['fp32']:.2f}x")
        results.append(Ratio.of_rates(
            "MAE step", f"{case}, transformers bf16 vs its fp32", "bf16", ref["bf16"], ref["fp32"], "img/s",
            "transformers fp32",
        ))  # fmt: skip
    return results


if __name__ == "__main__":
    measure()
