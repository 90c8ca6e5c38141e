"""Complete images from their top half with an iGPT checkpoint (Chen et al. 2020, Figure 1) and save the grid
original | quantised | given half | completions as a picture.

    python tools/complete.py runs/igpt_demo/checkpoints/last.ckpt --shards demo:digits/val --out completions.png \\
        --num-images 8 --num-completions 4 --temperature 1.0 --top-k 8 --seed 0

Images go through the run's evaluation view (shorter side to the model's resolution, centre crop, the run's
normalisation). Sampling is seeded: the same command gives the same picture.
"""

from __future__ import annotations

import argparse
import sys

from mmssl.cli import is_program


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="Lightning checkpoint of an iGPT run (tools/pretrain.py)")
    p.add_argument(
        "--shards", default="demo:digits/val", help="images to complete (webdataset spec or demo:)"
    )
    p.add_argument("--out", default="completions.png")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--num-completions", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0, help="0: always the most likely colour")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    make_parser().parse_args()

import torch  # noqa: E402

from mmssl.checkpoints import CheckpointError  # noqa: E402
from mmssl.data.module import resolve_shards  # noqa: E402
from mmssl.data.shards import SampleDecoder, eval_pipeline  # noqa: E402
from mmssl.data.transforms import eval_view  # noqa: E402
from mmssl.factory import objective_from_checkpoint  # noqa: E402
from mmssl.viz import Denormalize, save_grid  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = make_parser()
    a = p.parse_args(argv)
    overrides = [f"igpt.temperature={a.temperature}", f"igpt.num_completions={a.num_completions}"]
    overrides.append(f"igpt.top_k={a.top_k if a.top_k is not None else 'null'}")
    try:
        objective, _ = objective_from_checkpoint(a.ckpt, overrides)
        if not hasattr(objective, "complete"):
            raise CheckpointError(f"checkpoint {a.ckpt}: not an iGPT run ({type(objective).__name__})")
        side = int(objective.transformer.seq_len**0.5)
        mean, std = objective.mean.flatten().tolist(), objective.std.flatten().tolist()
        view = eval_view(side, crop_pct=1.0, mean=mean, std=std)
        urls = resolve_shards(a.shards, "--shards")
        pipeline = eval_pipeline(
            urls, view, a.num_images, rank=0, world_size=1, decoder=SampleDecoder(label_key=None)
        )
        batch = next(iter(pipeline), None)
        if batch is None:
            raise ValueError(f"--shards={a.shards!r}: no image could be read")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with torch.no_grad():
        generator = torch.Generator().manual_seed(a.seed)  # the objective and the images are on the CPU
        columns = objective.visualize({"image": batch["image"]}, Denormalize(mean, std), generator)
    title = f"{a.ckpt}: T={a.temperature}, top-k={a.top_k}, seed {a.seed}"
    print(
        f"{len(batch['image'])} images x {a.num_completions} completions -> {save_grid(columns, a.out, title)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
