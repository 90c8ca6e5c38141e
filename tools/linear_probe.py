"""Linear probe of a pretrained encoder: a grid of learning rates (and layers) trained in one pass.

    python tools/linear_probe.py runs/mae_demo/checkpoints/last.ckpt --cfg linprobe_mae \\
        data.train_shards='/data/in1k/train-{000000..001023}.tar' data.val_shards='/data/in1k/val-{000000..000049}.tar'
    python tools/linear_probe.py exported/mae_vitb.safetensors --cfg linprobe_mae data.train_shards=/data/imagenet/train ...
    python tools/linear_probe.py CKPT --cfg linprobe_digits --random-init       # the same architecture, untrained
    python tools/linear_probe.py --cfg linprobe_mae --print-config              # the protocol, resolved

The encoder is a Lightning checkpoint from tools/pretrain.py, an exported ``.safetensors`` (with its ``.json``)
or a Hugging Face-style folder (tools/export.py). Labelled data: shards with ``.cls`` members (``demo:`` sets
included) or an image folder with one subfolder per class. ``configs/linprobe_mae.yaml`` and
``configs/linprobe_simclr.yaml`` hold the published protocols; any key can be overridden (``base_lrs=[0.05,0.1]
layers=[-1,-4] data.cache_dir=/tmp/feats``). Prints a Markdown table; ``--json`` writes every result.

Training features (``data.mode``): ``augment`` (the protocols' default) runs the frozen encoder over freshly
augmented training images every epoch (RandomResizedCrop + flip, as MAE's main_linprobe.py); ``cached`` extracts
one pass of the evaluation view (or ``data.augment_copies`` augmented passes) once and reuses it: much faster,
not the protocol. The printed table and the JSON say which mode made them.

Exit codes: 0 done, 2 bad config, checkpoint or data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmssl.cli import is_program


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "encoder", nargs="?", help="Lightning .ckpt, exported .safetensors, or exported folder"
    )
    parser.add_argument("--cfg", default="linprobe_mae", help="probe protocol: a file or a name in configs/")
    parser.add_argument("--print-config", action="store_true", help="print the resolved protocol and exit")
    parser.add_argument("--random-init", action="store_true", help="the checkpoint's architecture, untrained")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. base_lrs=[0.1,0.3] layers=[-1]"
    )
    args = parser.parse_intermixed_args(argv)
    if args.encoder is None and not args.print_config:
        parser.error("the following arguments are required: encoder")
    return args


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    parse_args(None)

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from mmssl import config as C  # noqa: E402
from mmssl import factory  # noqa: E402
from mmssl.checkpoints import CheckpointError  # noqa: E402
from mmssl.eval.features import fingerprint, probe_train_features, split_features  # noqa: E402
from mmssl.eval.linear_probe import as_rows, best, markdown_table, train_probes  # noqa: E402


def mode_text(cfg) -> str:
    d = cfg.data
    if d.mode == "augment":
        return (f"augment: RandomResizedCrop({d.crop_scale[0]:g}-{d.crop_scale[1]:g}) + flip({d.hflip:g}) drawn "
                "every epoch (the protocol)")  # fmt: skip
    if d.augment_copies:
        return f"cached: {d.augment_copies} augmented copies, epoch e uses e mod {d.augment_copies}"
    return f"cached: one pass of the evaluation view (resize + centre crop {d.crop_pct:g})"


def run(args: argparse.Namespace) -> dict:
    cfg = C.load(args.cfg, args.overrides, schema=C.LinearProbeConfig)
    d = cfg.data
    for key in ("train_shards", "val_shards"):
        if not d[key]:
            raise C.ConfigError(
                f"config key 'data.{key}': required (labelled shards, an image folder, demo:X/Y)"
            )
    backbone, info = factory.load_encoder(args.encoder, random_init=args.random_init, seed=cfg.seed)
    encoder_id = f"{fingerprint(args.encoder)}:{'random' if args.random_init else 'trained'}:{cfg.seed}"
    common = dict(
        encoder_id=encoder_id, layers=list(cfg.layers), pool=cfg.pool, img_size=d.img_size, crop_pct=d.crop_pct,
        batch_size=d.batch_size, num_workers=d.num_workers, label_key=d.label_key, crop_scale=tuple(d.crop_scale),
        hflip=d.hflip, seed=cfg.seed, device=args.device,
    )  # fmt: skip
    train = probe_train_features(
        backbone, info, d.train_shards, mode=d.mode, augment_copies=d.augment_copies, cache_dir=d.cache_dir,
        **common,
    )  # fmt: skip
    val = split_features(backbone, info, d.val_shards, cache_dir=d.cache_dir, **common)
    results = train_probes(
        train, val, base_lrs=list(cfg.base_lrs), optimizer=cfg.optimizer, momentum=cfg.momentum,
        nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs, batchnorm=cfg.batchnorm, head_init=cfg.head_init,
        lr_scaling=cfg.lr_scaling, seed=cfg.seed, device=args.device,
    )  # fmt: skip
    top = best(results)
    n_train = top.train_samples
    summary = {
        "encoder": str(args.encoder),
        "random_init": args.random_init,
        "objective": info.get("objective", ""),
        "architecture": info["architecture"],
        "protocol": cfg.name,
        "mode": mode_text(cfg),
        "train_samples": n_train,
        "val_samples": len(val),
        "best": {"layer": top.layer, "base_lr": top.base_lr, "top1": top.top1, "top5": top.top5},
        "results": as_rows(results),
        "config": C.to_dict(cfg),
    }
    if top.batch_size < cfg.batch_size:
        print(f"note: batch_size {cfg.batch_size} > {n_train} training samples: used {top.batch_size}")
    print(f"training features: {mode_text(cfg)}")
    print(markdown_table(results))
    print(f"best: {top.layer}, base lr {top.base_lr:g}: top-1 {top.top1:.2f}, top-5 {top.top5:.2f} "
          f"({len(val)} val samples; lr chosen on this split)")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.print_config:  # the protocol as YAML (configs/linprobe_*.yaml), no encoder or data needed
            print(OmegaConf.to_yaml(C.load(args.cfg, args.overrides, schema=C.LinearProbeConfig)), end="")
            return 0
        run(args)
    except (C.ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
