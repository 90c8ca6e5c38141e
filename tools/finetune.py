"""Fine-tune a pretrained encoder end to end with a new classification head (the MAE protocol).

    python tools/finetune.py --cfg finetune_mae_vitb encoder=runs/mae_vitb/checkpoints/last.ckpt \\
        data.train_shards='/data/in1k/train-{000000..001023}.tar' data.val_shards='/data/in1k/val-{000000..000049}.tar'
    python tools/finetune.py --cfg finetune_mae_vitb --print-config        # the resolved recipe, then exit
    python tools/finetune.py --cfg finetune_digits encoder=runs/digits_table/mae/checkpoints/last.ckpt
    python tools/finetune.py --cfg finetune_digits encoder=... --resume    # continue from <run>/checkpoints/last.ckpt

The encoder is a pretraining checkpoint (``.ckpt``), an exported ``.safetensors`` (with its ``.json``) or an
exported folder (tools/export.py); ``random_init=true`` takes a checkpoint's architecture untrained (the
baseline). Data: labelled shards (``.cls``), ``demo:`` sets, or a folder of class folders for each split.
Held-out top-1/top-5 are logged every epoch (``val/top1``, ``val/top5``); the best epoch is kept as
``checkpoints/best.ckpt``. At the end the last and the best weights are evaluated once more
(``results.json``) and the best is exported as timm weights with the sidecar of tools/export.py
(``export/NAME.safetensors`` + ``.json`` + ``_hf/``, reloaded through timm and checked to give the same logits).

Exit codes: 0 finished, 1 the export does not reproduce the model, 2 bad config or input, 143 stopped by
SIGTERM after saving last.ckpt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmssl.cli import is_program

EXIT_SIGTERM = 143


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cfg", help="config file, or a name in configs/ (e.g. finetune_mae_vitb)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last.ckpt")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. encoder=PATH num_classes=10")
    return parser.parse_intermixed_args(argv)


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    parse_args(None)

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from mmssl import config as C  # noqa: E402
from mmssl import factory  # noqa: E402
from mmssl.backbones import as_backbone  # noqa: E402
from mmssl.checkpoints import CheckpointError, strip_prefix  # noqa: E402
from mmssl.config import finetune as F  # noqa: E402
from mmssl.export import export_backbone, round_trip_diff  # noqa: E402
from mmssl.factory import finetune as FT  # noqa: E402


def print_config(cfg) -> None:
    print(OmegaConf.to_yaml(cfg), end="")
    o = cfg.optim
    rule = (
        f"{o.base_lr:g} x {C.global_batch(cfg)} / 256" if o.lr is None and o.lr_scaling == "linear" else "set"
    )
    print(f"# lr {C.learning_rate(cfg):.3g} ({rule}; global batch {C.global_batch(cfg)} = data.batch_size x devices "
          f"x nodes x accumulation), layer decay {o.layer_decay}, {cfg.trainer.max_epochs} epochs")  # fmt: skip


def export_best(module, cfg, best: Path, out: Path, extra: dict) -> dict[str, float]:
    """Load ``best`` into ``module`` and export its classifier as timm weights; the round-trip differences."""
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    model = module.objective.model
    model.load_state_dict(strip_prefix(state, "objective.model."))
    d = cfg.data
    export_backbone(
        as_backbone(model.cpu().eval(), d.img_size), out, img_size=d.img_size, mean=list(d.mean), std=list(d.std),
        interpolation=d.interpolation, crop_pct=d.crop_pct, objective="finetune", extra=extra, keep_head=True,
    )  # fmt: skip
    return round_trip_diff(as_backbone(model, d.img_size), out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = F.load(args.cfg, args.overrides)
    except (C.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print_config(cfg)
        return 0

    out = factory.run_dir(cfg)
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
        F.require_run_inputs(cfg)
        backbone, info = FT.load_encoder_for(cfg)
        FT.resolve_image_settings(cfg, info)
        datamodule = FT.build_datamodule(cfg)
        classifier, report = FT.build_classifier(cfg, backbone)
    except (C.ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = factory.plan(cfg, datamodule)
    module = FT.build_module(cfg, plan, classifier)
    trainer = FT.build_trainer(cfg, plan)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml")
        n = sum(p.numel() for p in classifier.parameters())
        source = "random init" if cfg.random_init else f"{info.get('objective') or 'exported'} weights"
        print(f"mmssl: fine-tuning {info['architecture']} ({source} from {cfg.encoder}, {n:,} parameters) for "
              f"{cfg.num_classes} classes in {out}; {plan.describe()}")  # fmt: skip
        print(
            f"mmssl: new (not from the encoder): {report['missing']}; encoder weights unused: {report['unused']}"
        )

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=last if args.resume else None, weights_only=True)
    except SIGTERMException:
        print(
            f"mmssl: SIGTERM at step {trainer.global_step}: saved {last}; continue with --resume",
            file=sys.stderr,
        )
        return EXIT_SIGTERM

    # Held-out top-1/top-5 at the end: the last weights, then the best epoch's.
    results = {"last": trainer.validate(module, datamodule=datamodule, verbose=False)[0]}
    best = Path(trainer.checkpoint_callback.best_model_path or last)
    results["best"] = trainer.validate(
        module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True
    )[0]
    if not trainer.is_global_zero:
        return 0
    results |= {"best_checkpoint": str(best), "global_step": trainer.global_step, "encoder": cfg.encoder,
                "random_init": cfg.random_init, "architecture": info["architecture"]}  # fmt: skip
    for which in ("last", "best"):
        r = results[which]
        print(
            f"{which}: held-out top-1 {r['val/top1']:.2f}, top-5 {r['val/top5']:.2f}, loss {r['val/loss']:.4f}"
        )
    export = out / "export" / cfg.name
    extra = {"source": str(best), "encoder": cfg.encoder, "num_classes": cfg.num_classes,
             "val_top1": results["best"]["val/top1"]}  # fmt: skip
    diffs = export_best(module, cfg, best, export, extra)
    results["export"] = {"path": f"{export}.safetensors", "round_trip_max_abs_diff": diffs}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"exported the best classifier to {export}.safetensors (+ .json, _hf/); round trip through timm: "
          f"{json.dumps(diffs)}")  # fmt: skip
    if any(v != 0.0 for v in diffs.values()):
        print("error: the exported weights do not reproduce the classifier's logits", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
