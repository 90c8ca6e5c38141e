"""Pretrain any mmssl objective.

    python tools/pretrain.py --cfg mae_demo                      # bundled demo data, CPU, a few minutes
    python tools/pretrain.py --cfg mae_vitb data.train_shards='/data/in1k/train-{000000..001023}.tar'
    python tools/pretrain.py --cfg mae_vitb --print-config       # the resolved recipe, then exit
    python tools/pretrain.py --cfg mae_demo --resume             # continue from <run dir>/checkpoints/last.ckpt

Exit codes: 0 finished, 2 bad config or input, 143 stopped by SIGTERM after saving last.ckpt.
"""

from __future__ import annotations

import argparse
import sys

import lightning.pytorch as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from mmssl import build
from mmssl import config as C

EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a job killed by the signal


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cfg", help="config file, or a name in configs/ (e.g. mae_vitb)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last.ckpt")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.base_lr=3e-4"
    )
    return parser.parse_args(argv)


def count_parameters(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = C.load(args.cfg, args.overrides)
    except (C.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.print_config:
        total, trainable = count_parameters(build.build_objective(cfg))
        print(OmegaConf.to_yaml(C.active(cfg)), end="")
        print(f"# {cfg.objective} objective: {total:,} parameters ({trainable:,} trainable)")
        return 0

    out = build.run_dir(cfg)
    last = out / "checkpoints" / "last.ckpt"
    if args.resume and not last.is_file():
        print(f"error: --resume: no checkpoint at {last}", file=sys.stderr)
        return 2
    if not args.resume and last.is_file():
        print(
            f"error: {out} already holds a run; pass --resume to continue it or set name=...", file=sys.stderr
        )
        return 2

    L.seed_everything(cfg.seed, workers=True)
    try:
        datamodule = build.build_datamodule(cfg)
        plan = build.plan(cfg, datamodule)
        module = build.build_module(cfg, plan)  # backbone.weights are read here
    except (C.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer = build.build_trainer(cfg, plan)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(C.active(cfg), out / "config.yaml")
        total, trainable = count_parameters(module.objective)
        print(
            f"mmssl: {cfg.objective} in {out}: {total:,} parameters ({trainable:,} trainable); {plan.describe()}"
        )

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=last if args.resume else None, weights_only=True)
    except SIGTERMException:
        print(
            f"mmssl: SIGTERM at step {trainer.global_step}: saved {last}; continue with --resume",
            file=sys.stderr,
        )
        return EXIT_SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
