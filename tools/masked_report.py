"""Held-out masked-patch loss of an MAE / MaskFeat checkpoint beside the baselines of ``mmssl.eval.masked``: the
best constant (per-dimension mean of the masked targets) and copying the nearest visible patch's target.

    python tools/masked_report.py runs/maskfeat_demo/checkpoints/last.ckpt
    python tools/masked_report.py runs/maskfeat_digits/checkpoints/last.ckpt --random-init

The held-out images are the run's ``data.val_shards`` in its evaluation view; masks come from a fixed seed, so
two checkpoints are compared on the same masks. Prints one JSON line. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from mmssl.cli import is_program


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a pretraining checkpoint (Lightning .ckpt) of a masked objective")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--random-init", action="store_true", help="the same model at its initialisation")
    return parser.parse_args(argv)


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    parse_args(None)

import torch  # noqa: E402

from mmssl import factory  # noqa: E402
from mmssl.checkpoints import CheckpointError  # noqa: E402
from mmssl.eval.masked import masked_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        objective, cfg = factory.objective_from_checkpoint(
            args.checkpoint, ["data.num_workers=0"], random_init=args.random_init
        )
    except (CheckpointError, FileNotFoundError) as e:
        print(f"masked_report: {e}", file=sys.stderr)
        return 2
    if not cfg.data.val_shards:
        print(f"masked_report: {args.checkpoint}: the run has no data.val_shards", file=sys.stderr)
        return 2
    batches = factory.build_datamodule(cfg).val_dataloader()
    report = masked_report(objective, batches, torch.Generator().manual_seed(args.seed))
    print(json.dumps({"checkpoint": str(args.checkpoint), **report}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
