"""Data curation on the demo shapes data, end to end through the CLIs, in one command (CPU; about 75 minutes on two
shared cores for the nine CLIP runs and two LLaVA stages, then 14 minutes for scoring, filtering and the
evaluations; every finished step is reused by a rerun):

    python benchmarks/curation_demo.py --out runs/curation_demo        # --skip-llava, --seeds 0 for less

1. Noisy copies of demo:shapes/train and demo:shapes/val with 30 % of the captions replaced by the caption of
   another picture of a different colour-shape class (the truth per key in ``labels.json``).
2. CLIP score: ``clip_demo`` trained on the clean train split (``clip_clean``) and on the noisy one
   (``clip_noisy``); ``tools/score_shards.py --scorer clip_score`` on both noisy splits; ROC AUC (scikit-learn) of the
   score for "the caption matches", and precision / recall of keeping the top 70 % (positive: a matching pair).
3. Filtering: the noisy train split filtered by its own model's scores (``clip_noisy``: no clean model
   involved) to the top 70 % (``tools/filter_shards.py``), ``clip_demo`` retrained on it for the same 160 steps
   (``clip_filtered``). The three models, each trained with ``--seeds``, on clean held-out data: the last
   validation loss (CLIP's loss on demo:shapes/val), zero-shot accuracy over the 30 classes
   (``tools/zero_shot.py``, demo:shapes/heldout and val, and ``--eval-samples`` fresh pictures of each kind
   drawn with other seeds, for less sampling noise) and retrieval recall@1/5 counting any caption of the
   same colour, shape, size and position as a match (exact-caption recall is a coin toss here: the set
   repeats attribute combinations in four templates).
4. Ask-VLM: the LLaVA demo (``tools/make_decoder.py``, ``llava_demo_stage1``, ``llava_demo_stage2``) whose
   stage-2 conversations also ask (``--verify-share`` of the pictures, default all) the scorer's default
   question about the picture's own caption or, half the time, another picture's (answers "yes" / "no"): the
   stock shapes conversations never ask a yes/no question and their vocabulary has no "yes". Stage 2 runs
   ``--stage2-epochs`` (default 3) epochs. Scored on the noisy val split (pictures no stage saw); precision /
   recall at P(yes) >= 0.5 and at the top 70 %.

Every step is skipped (or resumed) when its output exists, so a second call only prints the results, which
are also written to --out/results.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from sklearn.metrics import precision_score, recall_score, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmssl.data import shapes  # noqa: E402
from mmssl.data.demo import encode  # noqa: E402
from mmssl.data.module import resolve_shards  # noqa: E402
from mmssl.data.shards import write_shards  # noqa: E402
from mmssl.eval.curate.scorers import DEFAULT_PROMPT  # noqa: E402
from mmssl.eval.curate.store import read_scores  # noqa: E402

SWAP = 0.3
KEEP = 0.7  # the filter keeps the top 70 % of the scores
STEPS = 160  # clip_demo's max_steps


def run(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, env=env)


def tool(name: str):
    """A script in tools/ as a module (its ``main(argv)``), loaded once."""
    if name not in _TOOLS:
        module_spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        _TOOLS[name] = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(_TOOLS[name])
    return _TOOLS[name]


_TOOLS: dict = {}


def raw(spec: str):
    return wds.DataPipeline(wds.SimpleShardList(resolve_shards(spec, "demo")), wds.tarfile_to_samples())


def noisy_copy(spec: str, out: Path, split: str, seed: int) -> None:
    """``spec`` with a ``SWAP`` share of captions replaced by another picture's of a different class."""
    if (out / "labels.json").is_file():
        return
    samples = list(raw(spec))
    rng = np.random.default_rng(seed)
    swapped = set(rng.choice(len(samples), size=round(SWAP * len(samples)), replace=False).tolist())
    labels, rows = {}, []
    for i, s in enumerate(samples):
        row = {k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
        if i in swapped:
            j = int(rng.integers(len(samples)))
            while samples[j]["cls"] == s["cls"]:
                j = int(rng.integers(len(samples)))
            row["txt"] = samples[j]["txt"]
        labels[s["__key__"]] = i not in swapped
        rows.append(row)
    info = {"classes": list(shapes.CLASSES), "swapped_captions": SWAP, "seed": seed}
    write_shards(rows, out, split, maxcount=2000, total=len(rows), info=info)
    (out / "labels.json").write_text(json.dumps(labels))


def verify_copy(spec: str, out: Path, seed: int, share: float) -> None:
    """Stage-2 data: a ``share`` of the conversations start with the Ask-VLM question about the picture's own
    caption or (half of those) another picture's of a different class, answered "yes" / "no"."""
    if (out / "manifest.json").is_file():
        return
    samples = list(raw(spec))
    rng = np.random.default_rng(seed)
    rows = []
    for s in samples:
        meta = json.loads(s["json"])
        if rng.random() < share:
            match = rng.random() < 0.5
            j = int(rng.integers(len(samples)))
            while not match and samples[j]["cls"] == s["cls"]:
                j = int(rng.integers(len(samples)))
            caption = (s if match else samples[j])["txt"].decode()
            turns = meta["conversations"]
            turns[0]["value"] = turns[0]["value"].replace("<image>\n", "")
            question = {"from": "human", "value": "<image>\n" + DEFAULT_PROMPT.format(caption=caption)}
            meta["conversations"] = [question, {"from": "gpt", "value": "yes" if match else "no"}, *turns]
        row = {k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
        row["json"] = json.dumps(meta)
        rows.append(row)
    write_shards(rows, out, "train", maxcount=2000, total=len(rows), info={"classes": list(shapes.CLASSES)})


def spec(folder: Path, split: str) -> str:
    n = json.loads((folder / "manifest.json").read_text())["splits"][split]["shards"]
    return (
        str(folder / f"{split}-{{000000..{n - 1:06d}}}.tar") if n > 1 else str(folder / f"{split}-000000.tar")
    )


def pretrain(out: Path, name: str, *overrides: str) -> Path:
    ckpt = out / name / "checkpoints" / "last.ckpt"
    if not (out / name / "rank0.json").is_file():  # written at the end of training
        resume = ["--resume"] if ckpt.is_file() else []
        run("tools/pretrain.py", *overrides, *resume, f"out_dir={out}", f"name={name}")
    return ckpt


def score(shards: str, out: Path, *scorer: str) -> list[dict]:
    # always run: it resumes, skipping the shards already scored
    run("tools/score_shards.py", shards, "--scorer", *scorer, "--out", str(out), "--num-workers", "1",
        "--batch-size", "128")  # fmt: skip
    return read_scores(out).rows


def separation(rows: list[dict], labels: dict[str, bool], field: str, threshold: float | None = None) -> dict:
    y = np.array([labels[r["key"]] for r in rows])
    x = np.array([r[field] for r in rows])
    top = np.quantile(x, 1 - KEEP)  # keep the top 70 %
    out = {"samples": len(rows), "mismatched": int((~y).sum()), "roc_auc": float(roc_auc_score(y, x))}
    for name, t in (("top70", top), ("p0.5", threshold)):
        if t is None:
            continue
        kept = x >= t
        out[name] = {"threshold": float(t), "kept": int(kept.sum()), "precision": float(precision_score(y, kept)),
                     "recall": float(recall_score(y, kept))}  # fmt: skip
    return out


def zero_shot(ckpt: Path, shards: str, name: str) -> dict:
    out = ckpt.parent / f"zs_{name}.json"
    if not out.is_file():  # tools/zero_shot.py in this process: no interpreter start per evaluation
        args = [
            str(ckpt),
            "--shards",
            shards,
            "--templates",
            "shapes",
            "--num-workers",
            "1",
            "--json",
            str(out),
        ]
        print("$ tools/zero_shot.py", " ".join(args), flush=True)
        if tool("zero_shot").main(args) != 0:
            raise RuntimeError(f"tools/zero_shot.py {' '.join(args)} failed")
    r = json.loads(out.read_text())
    return {
        "zero_shot_top1": r["zero_shot"]["present_classes"]["top1"],
        "zero_shot_top1_all": r["zero_shot"]["all_classes"]["top1"],
        "i2t@1_same_caption": r["retrieval"]["same_caption"]["image_to_text@1"],
        "t2i@1_same_caption": r["retrieval"]["same_caption"]["text_to_image@1"],
        "i2t@5_same_caption": r["retrieval"]["same_caption"]["image_to_text@5"],
    }


def attribute_retrieval(ckpt: Path, shards: str) -> dict:
    """Recall@k both ways where any caption of a picture with the same colour, shape, size and position counts
    (the set repeats attribute combinations and says them in four templates, so exact-caption recall is a
    coin toss among equivalent captions)."""
    import torch

    from mmssl import factory
    from mmssl.data.shards import SampleDecoder, eval_pipeline
    from mmssl.data.transforms import CaptionTokens
    from mmssl.eval.zero_shot import retrieval_recall

    model, cfg = factory.objective_from_checkpoint(ckpt)
    text_fn = CaptionTokens(factory.build_tokenizer(cfg))
    pipeline = eval_pipeline(resolve_shards(shards, "shards"), factory.build_views(cfg)[1], 256, rank=0, world_size=1,
                             decoder=SampleDecoder(require_text=True), text_fn=text_fn)  # fmt: skip
    images, texts, attrs = [], [], []
    with torch.no_grad():
        for batch in pipeline:
            images.append(model.encode_image(batch["image"]))
            texts.append(model.encode_text(batch["tokens"]))
            attrs += [(m["color"], m["shape"], m["size"], m["position"]) for m in batch["json"]]
    ids = torch.tensor([hash(a) for a in attrs])  # one id per attribute combination
    same = ids[:, None] == ids[None, :]  # (N, N)
    recall = retrieval_recall(torch.cat(images), torch.cat(texts), positives=same, ks=(1, 5))
    return {k.replace("image_to_text", "i2t").replace("text_to_image", "t2i"): v for k, v in recall.items()}


def last_val_loss(run_dir: Path) -> float:
    import csv

    metrics = sorted(run_dir.glob("logs/version_*/metrics.csv"))[-1]
    return float([r for r in csv.DictReader(open(metrics)) if r.get("val/loss")][-1]["val/loss"])


def eval_sets(data: Path, samples: int) -> list[tuple[str, str]]:
    """(name, shards) of the clean held-out sets: demo:shapes/heldout and val (600 pictures each) and, with
    ``samples`` > 0, fresh pictures of both kinds (other seeds), ``samples`` each, for less sampling noise."""
    sets = [("heldout", "demo:shapes/heldout"), ("val", "demo:shapes/val")]
    for split, seed in (("heldout", 12), ("val", 11)) if samples else ():
        folder = data / f"eval_{split}_{samples}"
        if not (folder / "manifest.json").is_file():
            rows = (
                {"__key__": key, "jpg": encode(img, quality=95), "txt": caption, "cls": cls, "json": meta}
                for key, img, caption, cls, meta in shapes.samples(split, samples, seed)
            )
            info = {"classes": list(shapes.CLASSES), "seed": seed}
            write_shards(rows, folder, split, maxcount=samples, total=samples, info=info)
        sets.append((f"{split}{samples}", spec(folder, split)))
    return sets


def evaluate(ckpt: Path, sets: list[tuple[str, str]]) -> dict:
    out = ckpt.parent / "curation_eval.json"
    saved = json.loads(out.read_text()) if out.is_file() else {}
    if not all(f"{name}_zero_shot" in saved for name, _ in sets):
        result = {"val_loss": last_val_loss(ckpt.parents[1])}
        for name, shards in sets:
            zs = zero_shot(ckpt, shards, name)
            result[f"{name}_zero_shot"] = zs["zero_shot_top1_all"]
            if name.startswith("heldout"):
                result["heldout_zero_shot_present"] = zs["zero_shot_top1"]
            for k, v in attribute_retrieval(ckpt, shards).items():
                result[f"{name}_{k}"] = v
        out.write_text(json.dumps(result, indent=1))
    return json.loads(out.read_text())


def mean_std(runs: list[dict]) -> dict:
    return {k: [float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))] for k in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "curation_demo")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per CLIP model"
    )
    parser.add_argument("--verify-share", type=float, default=1.0, help="stage-2 pictures asked the question")
    parser.add_argument("--stage2-epochs", type=int, default=3)
    parser.add_argument("--skip-llava", action="store_true")
    parser.add_argument("--skip-retrain", action="store_true")
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=3000,
        help="fresh clean pictures per extra evaluation set (0: none)",
    )
    args = parser.parse_args()
    out: Path = args.out.resolve()
    data = out / "data"
    noisy_copy("demo:shapes/train", data / "noisy_train", "train", seed=0)
    noisy_copy("demo:shapes/val", data / "noisy_val", "val", seed=1)
    noisy_train, noisy_val = spec(data / "noisy_train", "train"), spec(data / "noisy_val", "val")
    labels = {**json.loads((data / "noisy_train" / "labels.json").read_text()),
              **json.loads((data / "noisy_val" / "labels.json").read_text())}  # fmt: skip
    results: dict = {"swapped": SWAP, "keep": KEEP, "steps": STEPS, "seeds": args.seeds, "clip_score": {}}

    def name(model: str, seed: int) -> str:
        return model if seed == 0 else f"{model}_s{seed}"

    clean = pretrain(out, "clip_clean", "--cfg", "clip_demo")
    noisy = pretrain(out, "clip_noisy", "--cfg", "clip_demo", f"data.train_shards={noisy_train}")
    for model, ckpt in (("clip_clean", clean), ("clip_noisy", noisy)):
        for split, shards in (("val", noisy_val), ("train", noisy_train)):
            rows = score(shards, out / "scores" / f"{model}_{split}", "clip_score", str(ckpt))
            results["clip_score"][f"{model} on noisy {split}"] = separation(rows, labels, "clip_score")

    if not args.skip_retrain:
        filtered = out / "filtered"  # by clip_noisy's own scores: no clean model involved
        run(
            "tools/filter_shards.py",
            noisy_train,
            "--scores",
            str(out / "scores" / "clip_noisy_train"),
            "--score",
            "clip_score",
            "--top-fraction",
            str(KEEP),
            "--out",
            str(filtered),
        )  # fmt: skip (resumes)
        report = json.loads((filtered / "filter_report.json").read_text())
        decisions = [json.loads(line) for line in (filtered / "decisions.jsonl").read_text().splitlines()]
        kept_keys = {d["key"] for d in decisions if d["reason"] == "kept"}
        results["filter"] = {"counts": report["counts"], "kept": len(kept_keys),
                             "kept_mismatched": sum(not labels[k] for k in kept_keys)}  # fmt: skip
        shards = {
            "clip_noisy": noisy_train,
            "clip_filtered": f"{filtered}/*.tar",
            "clip_clean": "demo:shapes/train",
        }
        runs: dict[str, list[dict]] = {}
        sets = eval_sets(data, args.eval_samples)
        for seed in args.seeds:
            for model, train in shards.items():
                ckpt = pretrain(out, name(model, seed), "--cfg", "clip_demo", f"data.train_shards={train}",
                                f"seed={seed}")  # fmt: skip
                runs.setdefault(model, []).append(evaluate(ckpt, sets))
        results["models"] = {m: {"mean_std": mean_std(r), "runs": r} for m, r in runs.items()}

    if not args.skip_llava:
        share, epochs = args.verify_share, args.stage2_epochs
        verify = data / f"verify_train_{share:g}"
        verify_copy("demo:shapes/train", verify, seed=2, share=share)
        decoder = out / "tiny_llama"  # its vocabulary: the shapes texts plus the question's words, yes and no
        if not (decoder / "config.json").is_file():
            run("tools/make_decoder.py", "--texts", spec(verify, "train"), "--out", str(decoder))
        s1 = out / "llava_s1" / "llava"
        pretrain(out, "llava_s1", "--cfg", "llava_demo_stage1", f"llava.decoder={decoder}")
        s2 = f"llava_s2_v{share:g}_e{epochs}"
        pretrain(out, s2, "--cfg", "llava_demo_stage2", f"llava.decoder={decoder}", f"llava.vision={s1}",
                 f"llava.projector_weights={s1 / 'projector.safetensors'}", f"data.train_shards={spec(verify, 'train')}",
                 f"trainer.max_epochs={epochs}")  # fmt: skip
        rows = score(noisy_val, out / "scores" / f"vlm_val_{s2}", "vlm", str(out / s2 / "llava"))
        results["ask_vlm"] = {f"{s2} on noisy val": separation(rows, labels, "vlm", threshold=0.5),
                              "verify_share": share, "stage2_epochs": epochs}  # fmt: skip

    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
