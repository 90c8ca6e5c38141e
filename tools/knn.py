"""Weighted kNN evaluation of a pretrained encoder on L2-normalised features.

    python tools/knn.py runs/mae_digits/checkpoints/last.ckpt --train demo:digits/train --val demo:digits/val
    python tools/knn.py exported/mae_vitb.safetensors --train /data/imagenet/train --val /data/imagenet/val

Defaults: k=20, T=0.07 (DINO) and k=200, T=0.07 (Wu et al. 2018), both from one similarity pass; ``--k``/``--t``
give other pairs. Encoders and data as in tools/linear_probe.py. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmssl.cli import is_program


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("encoder", help="Lightning .ckpt, exported .safetensors, or exported folder")
    parser.add_argument("--train", required=True, help="labelled memory bank: shards, image folder, demo:X/Y")
    parser.add_argument("--val", required=True, help="labelled queries")
    parser.add_argument("--k", type=int, nargs="+", help="default: the k of mmssl.eval.knn.SETTINGS")
    parser.add_argument(
        "--t", type=float, nargs="+", help="one per --k (default: the T of mmssl.eval.knn.SETTINGS)"
    )
    parser.add_argument("--pool", default="default", choices=("default", "cls", "avg"))
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--img-size", type=int, default=None, help="default: the encoder's")
    parser.add_argument("--crop-pct", type=float, default=0.875)
    parser.add_argument("--label-key", default="cls")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--random-init", action="store_true", help="the checkpoint's architecture, untrained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    make_parser().parse_args()

import torch  # noqa: E402

from mmssl import factory  # noqa: E402
from mmssl.checkpoints import CheckpointError  # noqa: E402
from mmssl.eval.features import fingerprint, split_features  # noqa: E402
from mmssl.eval.knn import SETTINGS, bank_too_small, knn_accuracy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.k = args.k or [k for k, _ in SETTINGS]
    args.t = args.t or [t for _, t in SETTINGS]
    if len(args.k) != len(args.t):
        print(
            f"error: --k has {len(args.k)} values but --t has {len(args.t)}; give one T per k",
            file=sys.stderr,
        )
        return 2
    try:
        backbone, info = factory.load_encoder(args.encoder, random_init=args.random_init, seed=args.seed)
        common = dict(
            encoder_id=f"{fingerprint(args.encoder)}:{'random' if args.random_init else 'trained'}:{args.seed}",
            layers=[args.layer], pool=args.pool, img_size=args.img_size, crop_pct=args.crop_pct,
            batch_size=args.batch_size, num_workers=args.num_workers, label_key=args.label_key,
            cache_dir=args.cache_dir, device=args.device,
        )  # fmt: skip
        bank = split_features(backbone, info, args.train, **common)
        queries = split_features(backbone, info, args.val, **common)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (layer,) = bank.features
    for k in args.k:
        note = bank_too_small(k, len(bank.labels), "--k")
        if note is not None:
            print(f"{note} (--train)", file=sys.stderr)
    results = knn_accuracy(
        bank.features[layer],
        bank.labels,
        queries.features[layer],
        queries.labels,
        list(zip(args.k, args.t, strict=True)),
    )
    print("| k | T | top-1 | top-5 |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['k']} | {r['T']:g} | {r['top1']:.2f} | {r['top5']:.2f} |")
    if args.json:
        summary = {
            "encoder": args.encoder,
            "random_init": args.random_init,
            "layer": layer,
            "results": results,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
