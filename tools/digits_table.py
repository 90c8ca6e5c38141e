"""The README's digits table: linear probe and kNN accuracy on scikit-learn's handwritten digits for every
objective in ``factory.OBJECTIVES`` that trains an image encoder, random initialisation against a brief
pretraining, on CPU.

    python tools/digits_table.py --tsne assets/digits_tsne.png --json runs/digits_table/results.json

For each objective NAME it
1. pretrains with ``configs/NAME_digits.yaml`` (else ``configs/NAME_demo.yaml`` pointed at the digits) through
   tools/pretrain.py, into ``--out-dir/NAME`` (``--reuse`` keeps an earlier run);
2. takes two encoders of the same architecture: at the objective's own initialisation (same seed), and
   pretrained (the run's last.ckpt);
3. extracts features of ``demo:digits/train`` (1257 real digits) and ``demo:digits/val`` (540) and runs the
   linear probe of ``configs/linprobe_digits.yaml`` (the MAE protocol at batch 256 with an lr grid; the best
   lr is picked on val, as the papers' grids do) and weighted kNN (``mmssl.eval.knn.SETTINGS``: k=20, T=0.07 and k=200, T=0.07).
Objectives without a recipe, or whose pretraining or evaluation fails on digits, get a row that says so (the
error and its traceback go to ``--out-dir/NAME/error.log``) and the next objective runs. The table and every
number so far are written after each row (``--json``, default ``--out-dir/results.json``, and
``--out-dir/table.md``), so an interrupted run keeps what it finished; ``--reuse`` then skips finished
pretraining and fine-tuning runs. Prints a Markdown table; ``--tsne`` draws t-SNE maps of the val features.

``--finetune`` adds the fine-tuning table: each encoder (pretrained, and the same architecture at random init)
fine-tuned end to end with ``configs/finetune_digits.yaml`` through tools/finetune.py (the MAE protocol scaled
to the digits, same budget for both), best-epoch held-out top-1 / top-5 and the last epoch's top-1. Encoders
that are not timm models (iGPT's) get a row saying they are not fine-tuned:

    python tools/digits_table.py --finetune --json runs/digits_table/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from mmssl.cli import is_program


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--objectives",
        nargs="+",
        default=None,
        help="default: every objective in factory.OBJECTIVES with an encoder",
    )
    parser.add_argument("--out-dir", default="runs/digits_table")
    parser.add_argument("--reuse", action="store_true", help="keep existing pretraining runs in --out-dir")
    parser.add_argument("--probe-cfg", default="linprobe_digits")
    parser.add_argument(
        "--pretrain", nargs="*", default=[], metavar="key=value", help="extra pretraining overrides"
    )
    parser.add_argument("--probe", nargs="*", default=[], metavar="key=value", help="probe config overrides")
    parser.add_argument("--finetune", action="store_true", help="also fine-tune every encoder end to end")
    parser.add_argument("--finetune-cfg", default="finetune_digits")
    parser.add_argument(
        "--finetune-args", nargs="*", default=[], metavar="key=value", help="fine-tuning config overrides"
    )
    parser.add_argument("--tsne", help="write t-SNE maps of the val features here (PNG)")
    parser.add_argument("--json", help="write every number here (default: --out-dir/results.json)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    make_parser().parse_args()

import torch  # noqa: E402

from mmssl import config as C  # noqa: E402
from mmssl import factory  # noqa: E402
from mmssl.checkpoints import read_checkpoint  # noqa: E402
from mmssl.eval.features import Features, fingerprint, probe_train_features, split_features  # noqa: E402
from mmssl.eval.knn import SETTINGS, knn_accuracy  # noqa: E402
from mmssl.eval.linear_probe import best, train_probes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIGITS = {"train": "demo:digits/train", "val": "demo:digits/val"}
# Applied when an objective has no NAME_digits.yaml: its demo recipe on the 32 px digits.
DIGITS_OVERRIDES = [
    f"data.train_shards={DIGITS['train']}",
    f"data.val_shards={DIGITS['val']}",
    "backbone.img_size=32",
    "data.img_size=null",
    "trainer.max_epochs=20",
]


def recipe(name: str) -> tuple[str, list[str]] | None:
    for candidate, extra in ((f"{name}_digits", []), (f"{name}_demo", DIGITS_OVERRIDES)):
        if (C.CONFIG_DIR / f"{candidate}.yaml").is_file():
            return candidate, extra
    return None


def pretrain(
    name: str, cfg_name: str, overrides: list[str], out_dir: Path, reuse: bool
) -> tuple[Path, float]:
    run = out_dir / name
    ckpt = run / "checkpoints" / "last.ckpt"
    if reuse and ckpt.is_file():
        return ckpt, float("nan")
    if run.exists():
        shutil.rmtree(run)  # a run directory of this tool's own out_dir
    run.mkdir(parents=True)
    cmd = [sys.executable, str(ROOT / "tools" / "pretrain.py"), "--cfg", cfg_name, *overrides,
           f"out_dir={out_dir}", f"name={name}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"[{name}] pretraining: {' '.join(cmd[1:])} (log: {run / 'pretrain.log'})", flush=True)
    start = time.monotonic()
    with open(run / "pretrain.log", "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0 or not ckpt.is_file():
        tail = (run / "pretrain.log").read_text().strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"pretraining exited with {code}: {tail[0][:200]}")
    return ckpt, time.monotonic() - start


def evaluate(ckpt: Path, random_init: bool, probe: dict, cache: Path, device: str) -> dict:
    backbone, info = factory.load_encoder(ckpt, random_init=random_init, seed=probe["seed"])
    d = probe["data"]
    common = dict(
        encoder_id=f"{fingerprint(ckpt)}:{'random' if random_init else 'trained'}:{probe['seed']}",
        layers=list(probe["layers"]), pool=probe["pool"], img_size=d["img_size"], crop_pct=d["crop_pct"],
        batch_size=d["batch_size"], num_workers=d["num_workers"], label_key=d["label_key"],
        crop_scale=tuple(d["crop_scale"]), hflip=d["hflip"], seed=probe["seed"], device=device,
    )  # fmt: skip
    train = probe_train_features(
        backbone, info, DIGITS["train"], mode=d["mode"], augment_copies=d["augment_copies"], cache_dir=cache,
        **common,
    )  # fmt: skip
    val = split_features(backbone, info, DIGITS["val"], cache_dir=cache, **common)
    # kNN needs one fixed memory bank: the evaluation view of the training split
    bank = train if isinstance(train, Features) else split_features(backbone, info, DIGITS["train"], **common)
    results = train_probes(
        train, val, base_lrs=list(probe["base_lrs"]), optimizer=probe["optimizer"], momentum=probe["momentum"],
        nesterov=probe["nesterov"], weight_decay=probe["weight_decay"], batch_size=probe["batch_size"],
        epochs=probe["epochs"], warmup_epochs=probe["warmup_epochs"], batchnorm=probe["batchnorm"],
        head_init=probe["head_init"], lr_scaling=probe["lr_scaling"], seed=probe["seed"], device=device,
    )  # fmt: skip
    top = best(results)
    layer = top.layer
    knn = knn_accuracy(bank.features[layer], bank.labels, val.features[layer], val.labels, SETTINGS)
    return {
        "linear_top1": top.top1,
        "linear_base_lr": top.base_lr,
        "linear_layer": layer,
        "linear_grid": {f"{r.layer}@{r.base_lr:g}": round(r.top1, 2) for r in results},
        "knn": {f"k{r['k']}_T{r['T']:g}": r["top1"] for r in knn},
        "val_features": val.features[layer],
        "val_labels": val.labels,
    }


def finetune(name: str, ckpt: Path, random_init: bool, out_dir: Path, cfg_name: str, extra: list[str],
             reuse: bool) -> dict:  # fmt: skip
    """tools/finetune.py on one encoder; its results.json, summarised."""
    run = f"{name}_{'random' if random_init else 'pretrained'}"
    folder = out_dir / "finetune"
    results = folder / run / "results.json"
    if not (reuse and results.is_file()):
        if (folder / run).exists():
            shutil.rmtree(folder / run)  # a run directory of this tool's own out_dir
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(ROOT / "tools" / "finetune.py"), "--cfg", cfg_name, f"encoder={ckpt}",
               f"random_init={str(random_init).lower()}", f"out_dir={folder}", f"name={run}", *extra]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        log = folder / f"{run}.log"
        print(f"[{name}] fine-tuning: {' '.join(cmd[1:])} (log: {log})", flush=True)
        with open(log, "w") as f:
            code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if code != 0 or not results.is_file():
            errors = [ln for ln in log.read_text().splitlines() if ln.startswith("error:")] or ["?"]
            raise (ValueError if code == 2 else RuntimeError)(
                f"fine-tuning exited with {code}: {errors[-1][:400]}"
            )
    r = json.loads(results.read_text())
    return {"top1": r["best"]["val/top1"], "top5": r["best"]["val/top5"], "last_top1": r["last"]["val/top1"],
            "steps": r["global_step"]}  # fmt: skip


def markdown_finetune(rows: list[dict]) -> str:
    head = "| objective | encoder | fine-tuned top-1 (best epoch) | top-5 | top-1, last epoch |"
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        if "finetune" in r:
            f = r["finetune"]
            lines.append(
                f"| {r['objective']} | {r['encoder']} | {f['top1']:.1f} | {f['top5']:.1f} | {f['last_top1']:.1f} |"
            )
        elif "finetune_error" in r:
            lines.append(f"| {r['objective']} | {r['encoder']} | {r['finetune_error']} | | |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    knn_keys = [f"k{k}_T{t:g}" for k, t in SETTINGS]
    head = "| objective | encoder | linear probe top-1 | " + " | ".join(
        f"kNN k={k}, T={t:g}" for k, t in SETTINGS
    )
    lines = [head + " |", "|---|---|---|" + "---|" * len(SETTINGS)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['objective']} | — | {r['error']} |" + " |" * len(SETTINGS))
            continue
        knn = " | ".join(f"{r['knn'][key]:.1f}" for key in knn_keys)
        lines.append(f"| {r['objective']} | {r['encoder']} | {r['linear_top1']:.1f} | {knn} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = C.to_dict(C.load(args.probe_cfg, args.probe, schema=C.LinearProbeConfig))
    # by default every objective that trains an image encoder from images alone: the digits have no captions
    names = args.objectives or [
        n for n, spec in factory.OBJECTIVES.items() if spec.encoder and spec.text == "none"
    ]
    json_path = Path(args.json) if args.json else out_dir / "results.json"
    rows, panels = [], {}

    def save() -> None:
        """Tables and numbers so far, after every row: a crash or a kill later loses nothing finished."""
        tables = {"table": markdown(rows)}
        if args.finetune:
            tables["finetune_table"] = markdown_finetune(rows)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"rows": rows, "probe": probe, **tables}, indent=1) + "\n")
        (out_dir / "table.md").write_text("\n\n".join(tables.values()) + "\n")

    for name in names:
        found = recipe(name)
        if found is None:
            rows.append({"objective": name, "error": f"no configs/{name}_digits.yaml or {name}_demo.yaml"})
            save()
            continue
        try:
            run_objective(name, found, args, probe, out_dir, rows, panels, save)
        except Exception as e:  # noqa: BLE001 -- one objective's failure must not lose the other rows
            (out_dir / name).mkdir(parents=True, exist_ok=True)
            (out_dir / name / "error.log").write_text(traceback.format_exc())
            kind = (
                ""
                if isinstance(e, (RuntimeError, ValueError, FileNotFoundError))
                else f"{type(e).__name__}: "
            )
            rows.append({"objective": name, "error": f"failed: {kind}{e}"[:300]})
            print(f"[{name}] failed: {kind}{e} (traceback: {out_dir / name / 'error.log'})", flush=True)
        save()
    print(markdown(rows))
    if args.finetune:
        print(markdown_finetune(rows))
    print(f"results: {json_path}, {out_dir / 'table.md'}")
    if args.tsne and panels:
        from mmssl.viz import save_embedding_plot

        path = save_embedding_plot(panels, args.tsne, "t-SNE of linear-probe features, digits val split")
        print(f"t-SNE: {path}")
    return 1 if any(r.get("error", "").startswith("failed") for r in rows) else 0


def run_objective(name, found, args, probe, out_dir, rows, panels, save) -> None:
    """Pretrain one objective (or reuse its run), then probe (and fine-tune) its random-init and pretrained
    encoders; each finished row is appended to ``rows`` and saved at once."""
    ckpt, seconds = pretrain(name, found[0], [*found[1], *args.pretrain], out_dir, args.reuse)
    steps = read_checkpoint(ckpt)["global_step"]
    for random_init in (True, False):
        result = evaluate(ckpt, random_init, probe, out_dir / "features", args.device)
        encoder = "random init" if random_init else f"pretrained, {steps} steps"
        panels[f"{name}: {encoder}"] = (result.pop("val_features"), result.pop("val_labels"))
        rows.append({"objective": name, "encoder": encoder, "recipe": found[0],
                     "pretrain_seconds": None if random_init else seconds, **result})  # fmt: skip
        print(f"[{name}] {encoder}: linear {result['linear_top1']:.1f}, kNN {result['knn']}", flush=True)
        save()
        if args.finetune:
            try:
                ft = finetune(
                    name, ckpt, random_init, out_dir, args.finetune_cfg, args.finetune_args, args.reuse
                )
                rows[-1]["finetune"] = ft
                print(f"[{name}] {encoder}: fine-tuned top-1 {ft['top1']:.1f}", flush=True)
            except (
                RuntimeError,
                ValueError,
            ) as e:  # ValueError: refused before training (not a timm encoder)
                rows[-1]["finetune_error"] = (
                    f"{'not fine-tuned' if isinstance(e, ValueError) else 'failed'}: {e}"
                )
            save()


if __name__ == "__main__":
    sys.exit(main())
