"""Export a pretrained encoder from a Lightning checkpoint for use with plain timm.

    python tools/export.py runs/mae_demo/checkpoints/last.ckpt --out exported/mae_demo

writes ``exported/mae_demo.safetensors`` (timm's layout, backbone only), ``exported/mae_demo.json`` (sidecar:
architecture, timm arguments, image size, mean/std, objective) and ``exported/mae_demo_hf/`` (a Hugging
Face-style folder: config.json + model.safetensors). It then reloads both through timm and checks that they
give exactly the same features as the checkpoint (exit 1 otherwise). Load them with::

    timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=".../mae_demo.safetensors",
                      num_classes=0), **model_args)        # arch, model_args: from mae_demo.json
    timm.create_model("local-dir:exported/mae_demo_hf", pretrained=True)

Exit codes: 0 exported and verified, 1 the reloaded features differ, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmssl import build
from mmssl import config as C
from mmssl.checkpoints import CheckpointError
from mmssl.export import export_backbone, round_trip_diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint written by tools/pretrain.py")
    parser.add_argument("--out", help="output path without suffix (default: beside the checkpoint)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face-style folder")
    args = parser.parse_args(argv)

    try:
        backbone, info = build.load_encoder(args.checkpoint)
        if "config" in info and not build.OBJECTIVES[info["objective"]].timm_encoder:
            raise CheckpointError(
                f"{args.checkpoint}: the {info['objective']!r} objective's encoder is not a timm model, so it "
                "cannot be exported to timm (the evaluation tools read it from the checkpoint directly)"
            )
    except (CheckpointError, C.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "config" not in info:
        print(f"error: {args.checkpoint}: not a Lightning checkpoint of tools/pretrain.py", file=sys.stderr)
        return 2
    name, objective = info["config"]["name"], info["objective"]
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(f"{name}_{objective}_backbone")
    sidecar = export_backbone(
        backbone,
        out,
        img_size=info["img_size"],
        mean=info["mean"],
        std=info["std"],
        interpolation=info["interpolation"],
        crop_pct=info["crop_pct"],
        objective=objective,
        extra={"source": str(args.checkpoint), "global_step": info["global_step"]},
        hf_folder=not args.no_hf,
    )
    diffs = round_trip_diff(backbone, out)
    args_text = "".join(f", {k}={v!r}" for k, v in sidecar["model_args"].items())
    print(f"exported {objective} encoder ({sidecar['architecture']}) to {out}.safetensors + .json")
    print(
        f"  timm.create_model({sidecar['architecture']!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(out.with_suffix('.safetensors'))!r}){args_text})"
    )
    if not args.no_hf:
        print(f"  timm.create_model('local-dir:{out}_hf', pretrained=True)")
    print(f"round trip through timm, max |feature difference|: {json.dumps(diffs)}")
    if any(d != 0.0 for d in diffs.values()):
        print("error: the exported weights do not reproduce the checkpoint's features", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
