"""Export a pretraining run into the formats other libraries load, and check each by loading it back.

    python tools/export.py runs/mae_demo/checkpoints/last.ckpt --out exported/mae_demo
    python tools/export.py runs/llava_demo_stage2/llava --out exported/llava_demo     # a LLaVA parts folder

Formats (``--formats``, comma-separated; default: every one that applies to the run):

  timm       PREFIX.safetensors + PREFIX.json: the encoder in timm's layout and a sidecar (architecture, timm
             arguments, image size, mean/std, objective)
  hf         PREFIX_hf/: timm's save_for_hf folder; loads with timm ("local-dir:PREFIX_hf"),
             transformers.AutoModel / AutoImageProcessor / pipeline("image-feature-extraction")
  vit        PREFIX_vit/: ViT encoders as a native transformers ViTModel (+ ViTImageProcessor)
  vitmae     PREFIX_vitmae/: MAE (encoder and decoder) as transformers ViTMAEForPreTraining
  open_clip  PREFIX_open_clip/: CLIP, both towers, as an open_clip checkpoint + model config:
             open_clip.create_model_and_transforms("local-dir:PREFIX_open_clip"), or add_model_config on
             its NAME.json and pretrained=".../open_clip_model.safetensors"
  imagegpt   PREFIX_imagegpt/: autoregressive iGPT as ImageGPTForCausalImageModeling + ImageGPTImageProcessor
             (the palette)
  llava      PREFIX_llava/: LLaVA as LlavaForConditionalGeneration + LlavaProcessor (<image> token, chat template)

Every written format is loaded back with its own library and compared with mmssl's outputs on the same inputs;
the largest difference is printed. Exit codes: 0 exported and verified, 1 a reloaded format differs (timm and
hf formats: any difference; others: more than 1e-5), 2 bad input or a format the run cannot express.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmssl.cli import is_program

ENCODER = ("timm", "hf", "vit")  # every objective whose spec names an encoder
TOLERANCE = 1e-5  # float32 reorderings between implementations (fused vs split q/k/v, etc.)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", help="Lightning checkpoint written by tools/pretrain.py, or a llava/ folder"
    )
    parser.add_argument("--out", help="output prefix (default: beside the checkpoint)")
    parser.add_argument(
        "--formats",
        default="auto",
        help=f"comma-separated: {', '.join(ENCODER)} (an encoder) or the objective's own (see above)",
    )
    parser.add_argument("--no-hf", action="store_true", help="skip the timm/transformers folder (hf)")
    return parser


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    make_parser().parse_args()

from mmssl.interop import Unsupported  # a plain exception class: imports nothing heavy  # noqa: E402

# Heavy imports (torch, timm, transformers through mmssl) happen after argument parsing, so --help and usage
# errors answer at once.


def export_encoder(backbone, info: dict, out: Path, formats: list[str], source: str) -> dict[str, float]:
    """``info``: ``factory.load_encoder``'s (image size, mean/std, interpolation, objective, global step)."""
    from mmssl.export import export_backbone, round_trip_diff

    diffs: dict[str, float] = {}
    if "timm" in formats or "hf" in formats:
        sidecar = export_backbone(
            backbone, out, img_size=info["img_size"], mean=info["mean"], std=info["std"],
            interpolation=info["interpolation"], crop_pct=info["crop_pct"], objective=info["objective"],
            extra={"source": source, "global_step": info["global_step"]}, hf_folder="hf" in formats,
        )  # fmt: skip
        args_text = "".join(f", {k}={v!r}" for k, v in sidecar["model_args"].items())
        print(f"timm: {out}.safetensors + .json ({sidecar['architecture']})")
        print(
            f"  timm.create_model({sidecar['architecture']!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(out.with_suffix('.safetensors'))!r}){args_text})"
        )
        if "hf" in formats:
            print(f"hf: {out}_hf/  timm.create_model('local-dir:{out}_hf', pretrained=True), "
                  f"transformers.AutoModel.from_pretrained('{out}_hf')")  # fmt: skip
        named = {
            ("timm" if k == "safetensors" else "hf"): v for k, v in round_trip_diff(backbone, out).items()
        }
        diffs |= {k: v for k, v in named.items() if k in formats}  # not an older _hf folder left there
        if "hf" in formats:
            from mmssl.interop.hf_timm import round_trip as hf_round_trip

            diffs["hf (transformers)"] = hf_round_trip(backbone, Path(f"{out}_hf"))
    if "vit" in formats:
        from mmssl.interop import hf_vit

        folder = hf_vit.save_vit_model(
            backbone.model,
            f"{out}_vit",
            mean=info["mean"],
            std=info["std"],
            interpolation=info["interpolation"],
        )
        print(f"vit: {folder}/  transformers.ViTModel.from_pretrained('{folder}')")
        diffs["vit"] = hf_vit.round_trip(backbone.model, folder)
    return diffs


def export_objective(cfg, objective, spec, out: Path, formats: list[str], strict: bool) -> dict[str, float]:
    """Write and check each of the spec's whole-objective formats (``spec.exports``) into ``OUT_<format>/``; a
    format the objective's settings cannot express fails when ``strict`` (asked for by name), else it is
    skipped with the reason."""
    diffs: dict[str, float] = {}
    for name in formats:
        fmt = spec.exports[name]
        try:
            folder = fmt.save(cfg, objective, Path(f"{out}_{name}"))
        except Unsupported as e:
            if strict:
                raise Unsupported(f"--formats {name}: {e}") from None
            print(f"{name}: skipped ({e})")
            continue
        print(f"{name}: {folder}/  {fmt.usage.format(folder=folder, name=folder.name)}")
        diffs[name] = fmt.round_trip(objective, folder)
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    source = Path(args.checkpoint)
    requested = None if args.formats == "auto" else [f.strip() for f in args.formats.split(",") if f.strip()]
    if requested == []:
        parser.error("--formats: give at least one format name (or auto)")

    from mmssl import config as C
    from mmssl.checkpoints import CheckpointError

    diffs: dict[str, float] = {}
    try:
        if source.is_dir():
            diffs = _export_parts(source, args, requested)
        else:
            diffs = _export_checkpoint(source, args, requested)
    except (CheckpointError, C.ConfigError, Unsupported, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"round trip through each library, max |output difference|: {json.dumps(diffs)}")
    exact = {k for k in diffs if k in ("timm", "hf")}
    bad = [k for k, v in diffs.items() if (v != 0.0 if k in exact else not v <= TOLERANCE)]
    if bad:
        print(f"error: the exported {', '.join(bad)} do not reproduce mmssl's outputs", file=sys.stderr)
        return 1
    return 0


def _check_requested(requested: list[str] | None, offered: list[str], what: str) -> None:
    refused = [f for f in requested or () if f not in offered]
    if refused:
        raise Unsupported(
            f"--formats {','.join(refused)}: {what} exports as {', '.join(offered) or 'nothing'}"
        )


def _export_parts(source: Path, args, requested: list[str] | None) -> dict[str, float]:
    """A folder of saved parts (a LLaVA run's llava/): the model without Lightning, through the spec that
    writes such folders (``ObjectiveSpec.load_parts``)."""
    from mmssl import factory

    specs = [s for s in factory.OBJECTIVES.values() if s.load_parts is not None]
    if len(specs) != 1:
        raise Unsupported(f"{source}: a folder, but {len(specs)} objectives load saved parts")
    spec = specs[0]
    _check_requested(requested, list(spec.exports), f"{source} (saved parts)")
    out = Path(args.out) if args.out else source.with_name(f"{source.name}_export")
    return export_objective(None, spec.load_parts(source), spec, out, requested or list(spec.exports), True)


def _export_checkpoint(path: Path, args, requested: list[str] | None) -> dict[str, float]:
    from mmssl import factory

    ckpt, cfg, spec = factory.read_run(path)  # which formats apply: the spec's, never the objective's name
    out = Path(args.out) if args.out else path.with_name(f"{cfg.name}_{cfg.objective}")
    # a CLIP run with open_clip's image tower keeps no mmssl backbone at its spec's encoder attribute
    prefix = f"objective.{spec.encoder}.model."
    encoder = spec.encoder is not None and any(k.startswith(prefix) for k in ckpt["state_dict"])
    what = f"checkpoint {path} (objective {cfg.objective!r})"
    if spec.encoder is not None and not spec.timm_encoder:  # e.g. iGPT's: evaluated in place, never exported
        encoder = False
        what += (f"; the {cfg.objective!r} objective's encoder is not a timm model, so it cannot be exported to "
                 f"{', '.join(ENCODER)} (the evaluation tools read it from the checkpoint directly)")  # fmt: skip
    offered = [*(ENCODER if encoder else ()), *spec.exports]
    _check_requested(requested, offered, what)
    wanted = [f for f in offered if f in (requested or offered) and not (args.no_hf and f == "hf")]
    diffs: dict[str, float] = {}
    encoder_formats = [f for f in wanted if f in ENCODER]
    if encoder_formats:
        backbone, info = factory.load_encoder(path)
        if requested is None and "vit" in encoder_formats:
            from mmssl.interop.hf_vit import check_vit

            try:
                check_vit(backbone.model)
            except Unsupported as e:
                print(f"vit: skipped ({e})")
                encoder_formats.remove("vit")
        diffs |= export_encoder(backbone, info, out, encoder_formats, str(path))
    objective_formats = [f for f in wanted if f not in ENCODER]
    if objective_formats:  # only these need the whole objective (an encoder export builds the encoder alone)
        objective, cfg = factory.objective_from_checkpoint(path)
        diffs |= export_objective(cfg, objective, spec, out, objective_formats, strict=requested is not None)
    return diffs


if __name__ == "__main__":
    sys.exit(main())
