"""One GPU check, one table: the speed numbers worth knowing when a GPU is lent (under 8 minutes on one
H200; ``--quick`` about half). Never a test dependency; without a CUDA device it says so and exits 0.

    python benchmarks/gpu_check.py                 # every row
    python benchmarks/gpu_check.py --quick         # fewer steps, smaller batches
    python benchmarks/gpu_check.py --rows mae,sdpa # a subset (names below)

Run it from the repository root with mmssl installed (``pip install -e .``) or ``PYTHONPATH=.``. The exit code
is 0 when every row ran, 1 when a row failed, 0 without CUDA.

Rows (each guarded: a failure prints an error row and the table goes on):

* ``mae``      MAE ViT-B/16 training step (forward, backward, AdamW), bf16 autocast: images/s and MFU
* ``compile``  the same with ``objective.compile()`` (what ``trainer.compile=true`` does), plus compile time
* ``sdpa``     which scaled-dot-product-attention backend ran in that step (profiler op and kernel names)
* ``hog``      the MaskFeat HOG target (mmssl/targets/hog.py), GPU vs CPU images/s
* ``loader``   the shard loader (synthetic JPEG shards written here) with N workers vs the MAE step's appetite
* ``simclr``   SimCLR ResNet-50 channels_last bf16 training step images/s (an image = two views)
* ``fsdp``     one-GPU FSDP training of MAE ViT-L through Lightning's FSDPStrategy, timm Blocks auto-wrapped

MFU = training FLOPs (``flops_per_sample()``, counted as mmssl/flops.py says) x images/s / dense bf16 peak
(mmssl/throughput.py ``peak_flops``). Synthetic images: throughput does not depend on pixel values.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROWS = ("mae", "compile", "sdpa", "hog", "loader", "simclr", "fsdp")
NO_CUDA = (
    "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to measure, run it on a GPU"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and smaller batches")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16), help="loader workers")
    parser.add_argument("--batch", type=int, default=None, help="MAE ViT-B batch (default 256, quick 128)")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {','.join(ROWS)}")
    args.rows = rows
    args.batch = args.batch or (128 if args.quick else 256)
    args.steps = 5 if args.quick else 12  # timed steps per row
    args.warmup = 2 if args.quick else 3
    return args


# ---- helpers --------------------------------------------------------------------------------------------
def sync() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def train_rate(objective, make_batch, batch_size: int, steps: int, warmup: int, optimizer: str = "adamw"):
    """Images/s of forward + backward + optimizer step under bf16 autocast, and the warm-up time (s)."""
    from mmssl.optim import create_optimizer

    opt = create_optimizer(objective, optimizer, 1e-4, 0.05)
    batch = make_batch(batch_size)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = sync()
    for _ in range(warmup):
        step()
    timed = sync()
    for _ in range(steps):
        step()
    return batch_size * steps / (sync() - timed), timed - start


def mfu(flops: int | None, images_per_s: float) -> str:
    """``flops``: training FLOPs per image (the objective's ``flops_per_sample()``)."""
    from mmssl.throughput import peak_flops

    peak = peak_flops(torch.device("cuda"), "bf16-mixed")
    if not flops or not peak:
        return "MFU n/a (unknown peak or FLOPs)"
    return f"MFU {flops * images_per_s / peak:.1%} of {peak / 1e12:.0f} TFLOP/s"


def mae_objective(model: str = "vit_base_patch16_224"):
    from mmssl import config as C
    from mmssl.factory import build_objective

    torch.manual_seed(0)
    return build_objective(C.load("mae_vitb", [f"backbone.name={model}"])).cuda()


def images(n: int, size: int = 224) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(n, 3, size, size, device="cuda")}


# ---- rows -----------------------------------------------------------------------------------------------
def row_mae(args, state):
    objective = mae_objective()
    rate, _ = train_rate(objective, images, args.batch, args.steps, args.warmup)
    state["mae_images_per_s"] = rate
    mem = torch.cuda.max_memory_allocated() / 2**30
    return (
        f"{rate:,.0f} img/s",
        f"batch {args.batch}, {mfu(objective.flops_per_sample(), rate)}, peak mem {mem:.1f} GiB",
    )


def row_compile(args, state):
    objective = mae_objective()
    objective.compile()
    rate, warm_s = train_rate(objective, images, args.batch, args.steps, args.warmup)
    eager = state.get("mae_images_per_s")
    vs = f", x{rate / eager:.2f} vs eager" if eager else ""
    return (
        f"{rate:,.0f} img/s",
        f"{mfu(objective.flops_per_sample(), rate)}{vs}, compile + warm-up {warm_s:.0f} s",
    )


SDPA_OPS = {  # dispatcher op -> backend (torch.nn.attention.SDPBackend names)
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
}


def row_sdpa(args, state):
    from torch.profiler import ProfilerActivity, profile

    objective = mae_objective()
    batch = images(min(args.batch, 64))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        objective(batch)["loss"].backward()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            objective(batch)["loss"].backward()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    backends = sorted({b for op, b in SDPA_OPS.items() if op in names})
    gpu = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    kernels = sorted(n for n in gpu if any(k in n.lower() for k in ("flash", "fmha", "attention", "sdpa")))[
        :2
    ]
    return ", ".join(backends) or "none found", "kernels: " + ("; ".join(k[:60] for k in kernels) or "-")


def row_hog(args, state):
    from mmssl.targets.hog import HOGTarget

    target = HOGTarget(patch_size=16)
    rates = {}
    for device, n, reps in (("cuda", args.batch, args.steps), ("cpu", 32, 2)):
        x = torch.randn(n, 3, 224, 224, device=device)
        t = target.to(device)
        t(x)  # warm-up
        start = sync()
        for _ in range(reps):
            t(x)
        rates[device] = n * reps / (sync() - start)
    return f"{rates['cuda']:,.0f} img/s GPU", (
        f"CPU {rates['cpu']:,.0f} img/s ({torch.get_num_threads()} threads), GPU x{rates['cuda'] / rates['cpu']:.0f}"
    )


def row_loader(args, state):
    from mmssl.data import demo
    from mmssl.data.module import ShardDataModule
    from mmssl.data.shards import write_shards
    from mmssl.data.transforms import mae_view

    n_files = 512 if args.quick else 1024
    batch, workers = args.batch, args.workers
    per_worker = 3 if args.quick else 4
    with tempfile.TemporaryDirectory(prefix="mmssl-gpu-check-") as root:
        crops = demo.photo_crops(demo.photo_sources(), n_files, 384, seed=0)  # ImageNet-like 384 px JPEGs
        samples = (
            {"__key__": f"{i:06d}", "jpg": demo.encode(c, quality=90)} for i, (_, c) in enumerate(crops)
        )
        write_shards(samples, root, "train", maxcount=128)
        dm = ShardDataModule(
            str(Path(root) / "train-*.tar"), train_view=mae_view(224), batch_size=batch, num_workers=workers,
            samples_per_epoch=batch * workers * per_worker, shuffle_buffer=500,
        )  # fmt: skip
        seen, start = 0, None
        for i, b in enumerate(dm.train_dataloader()):
            if i == workers - 1:  # every worker has started and delivered once
                start = time.perf_counter()
            elif i >= workers:
                seen += b["image"].shape[0]
        rate = seen / (time.perf_counter() - start)
    need = state.get("mae_images_per_s")
    vs = f"; MAE step eats {need:,.0f} img/s: loader/model = {rate / need:.2f}" if need else ""
    return f"{rate:,.0f} img/s", f"{workers} workers, batch {batch}, 224 px mae_view{vs}"


def row_simclr(args, state):
    from mmssl import config as C
    from mmssl.factory import build_objective

    torch.manual_seed(0)
    objective = build_objective(C.load("simclr_resnet50")).cuda()  # channels_last on (simclr.channels_last)
    n = args.batch

    def views(b):
        return {
            "view1": torch.randn(b, 3, 224, 224, device="cuda"),
            "view2": torch.randn(b, 3, 224, 224, device="cuda"),
        }

    rate, _ = train_rate(objective, views, n, args.steps, args.warmup, optimizer="lars")
    return (
        f"{rate:,.0f} img/s",
        f"batch {n} images ({2 * n} views), LARS, channels_last={objective.channels_last}",
    )


def row_fsdp(args, state):
    import lightning.pytorch as L
    from lightning.pytorch.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block
    from torch.utils.data import DataLoader

    from mmssl import config as C
    from mmssl import factory

    # Built directly: the config's trainer.strategy=fsdp gives Lightning's default wrapping (none), and the
    # fsdp.* keys that choose a wrap policy may not exist on this branch.
    strategy = FSDPStrategy(auto_wrap_policy={Block})
    n, steps, warmup = (32, args.steps, args.warmup) if args.quick else (64, args.steps, args.warmup)
    cfg = C.load("mae_vitb", ["backbone.name=vit_large_patch16_224"])
    torch.manual_seed(0)
    module = factory.build_module(cfg, factory.Plan(1, n, 1e-4, steps + warmup, steps + warmup, 0))
    flops = module.objective.flops_per_sample()  # before FSDP wraps the blocks
    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(sync())

    batch = {"image": torch.randn(n, 3, 224, 224)}
    trainer = L.Trainer(
        accelerator="gpu", devices=1, strategy=strategy, precision="bf16-mixed", max_steps=steps + warmup,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Clock()],
    )  # fmt: skip
    trainer.fit(module, DataLoader([batch] * (steps + warmup), batch_size=None))
    rate = n * steps / (times[-1] - times[warmup - 1])
    wrapped = sum(type(m).__name__ == "FullyShardedDataParallel" for m in trainer.strategy.model.modules())
    mem = torch.cuda.max_memory_allocated() / 2**30
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return f"{rate:,.0f} img/s", (
        f"ViT-L batch {n}, {wrapped} FSDP units, {mfu(flops, rate)}, peak mem {mem:.1f} GiB"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    device = torch.cuda.get_device_name()
    print(
        f"gpu_check on {device}, torch {torch.__version__}, rows: {','.join(args.rows)}{' (quick)' * args.quick}"
    )
    state: dict = {}
    table: list[tuple[str, str, str, float]] = []
    begin = time.perf_counter()
    for name in args.rows:
        start = time.perf_counter()
        try:
            result, detail = globals()[f"row_{name}"](args, state)
        except Exception as exn:  # one broken row must not hide the others
            traceback.print_exc(file=sys.stderr)
            result, detail = (
                "ERROR",
                f"{type(exn).__name__}: {str(exn).splitlines()[0][:150] if str(exn) else ''}",
            )
        seconds = time.perf_counter() - start
        table.append((name, result, detail, seconds))
        print(f"  {name:<8} {result:>18}  {detail}  [{seconds:.0f} s]", flush=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print("\n| row | result | detail | s |\n|---|---|---|---|")
    for name, result, detail, seconds in table:
        print(f"| {name} | {result} | {detail} | {seconds:.0f} |")
    print(f"\ntotal {time.perf_counter() - begin:.0f} s on {device}")
    return 1 if any(r[1] == "ERROR" for r in table) else 0


if __name__ == "__main__":
    sys.exit(main())
