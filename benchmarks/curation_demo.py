"""Data curation on the demo shapes data, end to end through the CLIs, in one command (CPU, about an hour):

    python benchmarks/curation_demo.py --out runs/curation_demo            # add --skip-llava for CLIP only

1. Noisy copies of demo:shapes/train and demo:shapes/val with 30 % of the captions replaced by the caption of
   another picture of a different colour-shape class (the truth per key in ``labels.json``).
2. CLIP: ``clip_demo`` trained on the clean train split (``clip_clean``) and on the noisy one (``clip_noisy``);
   ``tools/score_shards.py --scorer clip`` on the noisy sets; ROC AUC (scikit-learn) of the score for
   "caption matches", and precision / recall of keeping the top 70 % (positive = a matching pair kept).
3. Filtering: the noisy train split filtered by its own model's scores (``clip_noisy``, no clean model needed)
   to the top 70 % (``tools/filter_shards.py``), ``clip_demo`` retrained on it for the same 160 steps
   (``clip_filtered``); held-out zero-shot accuracy and retrieval (``tools/zero_shot.py``) of the three models.
4. Ask-VLM: the LLaVA demo (``tools/make_decoder.py``, ``llava_demo_stage1``, ``llava_demo_stage2``) whose
   stage-2 conversations also ask, for half of the pictures, the scorer's default question about their own
   caption or another picture's ("yes" / "no"): the stock shapes conversations never ask a yes/no question,
   and their vocabulary has no "yes". Scored on the noisy val split (pictures no stage saw).

Every step is skipped when its output exists, so a second call only prints the table; results.json and
results.md are written under --out.
"""

from __future__ import annotations

import argparse
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
from mmssl.data.module import resolve_shards  # noqa: E402
from mmssl.data.shards import write_shards  # noqa: E402
from mmssl.eval.curate.scoring import DEFAULT_PROMPT, read_scores  # noqa: E402

SWAP = 0.3
KEEP = 0.7  # the filter keeps the top 70 % of the scores
STEPS = 160  # clip_demo's max_steps


def run(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, env=env)


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


def verify_copy(spec: str, out: Path, seed: int) -> None:
    """Stage-2 data: half of the conversations start with the Ask-VLM question about the picture's own caption
    or (half of those) another picture's of a different class, answered "yes" / "no"."""
    if (out / "manifest.json").is_file():
        return
    samples = list(raw(spec))
    rng = np.random.default_rng(seed)
    rows = []
    for s in samples:
        meta = json.loads(s["json"])
        if rng.random() < 0.5:
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
    return str(folder / f"{split}-{{000000..{n - 1:06d}}}.tar") if n > 1 else str(folder / f"{split}-000000.tar")


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
    if not out.is_file():
        run("tools/zero_shot.py", str(ckpt), "--shards", shards, "--templates", "shapes", "--num-workers", "1",
            "--json", str(out))  # fmt: skip
    r = json.loads(out.read_text())
    return {
        "zero_shot_top1": r["zero_shot"]["present_classes"]["top1"],
        "zero_shot_top1_all": r["zero_shot"]["all_classes"]["top1"],
        "i2t@1_same_caption": r["retrieval"]["same_caption"]["image_to_text@1"],
        "t2i@1_same_caption": r["retrieval"]["same_caption"]["text_to_image@1"],
        "i2t@5_same_caption": r["retrieval"]["same_caption"]["image_to_text@5"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "curation_demo")
    parser.add_argument("--skip-llava", action="store_true")
    parser.add_argument("--skip-retrain", action="store_true")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    data = out / "data"
    noisy_copy("demo:shapes/train", data / "noisy_train", "train", seed=0)
    noisy_copy("demo:shapes/val", data / "noisy_val", "val", seed=1)
    noisy_train, noisy_val = spec(data / "noisy_train", "train"), spec(data / "noisy_val", "val")
    labels = {**json.loads((data / "noisy_train" / "labels.json").read_text()),
              **json.loads((data / "noisy_val" / "labels.json").read_text())}  # fmt: skip
    results: dict = {"swapped": SWAP, "keep": KEEP, "steps": STEPS, "clip_score": {}, "models": {}}

    clean = pretrain(out, "clip_clean", "--cfg", "clip_demo")
    noisy = pretrain(out, "clip_noisy", "--cfg", "clip_demo", f"data.train_shards={noisy_train}")
    for model, ckpt in (("clip_clean", clean), ("clip_noisy", noisy)):
        for split, shards in (("val", noisy_val), ("train", noisy_train)):
            rows = score(shards, out / "scores" / f"{model}_{split}", "clip", str(ckpt))
            results["clip_score"][f"{model} on noisy {split}"] = separation(rows, labels, "clip")

    if not args.skip_retrain:
        filtered = out / "filtered"
        run("tools/filter_shards.py", noisy_train, "--scores", str(out / "scores" / "clip_noisy_train"),
            "--score", "clip", "--top-fraction", str(KEEP), "--out", str(filtered))  # fmt: skip (resumes)
        report = json.loads((filtered / "filter_report.json").read_text())
        kept_keys = {json.loads(line)["key"] for line in (filtered / "decisions.jsonl").read_text().splitlines()
                     if json.loads(line)["reason"] == "kept"}  # fmt: skip
        results["filter"] = {
            "counts": report["counts"],
            "kept_mismatched": sum(not labels[k] for k in kept_keys),
            "kept": len(kept_keys),
        }
        refit = pretrain(out, "clip_filtered", "--cfg", "clip_demo", f"data.train_shards={filtered}/*.tar")
        for model, ckpt in (("clip_noisy", noisy), ("clip_filtered", refit), ("clip_clean", clean)):
            results["models"][model] = {
                "heldout": zero_shot(ckpt, "demo:shapes/heldout", "heldout"),
                "val": zero_shot(ckpt, "demo:shapes/val", "val"),
            }

    if not args.skip_llava:
        verify = data / "verify_train"
        verify_copy("demo:shapes/train", verify, seed=2)
        decoder = out / "tiny_llama"
        if not (decoder / "config.json").is_file():
            run("tools/make_decoder.py", "--texts", spec(verify, "train"), "--out", str(decoder))
        s1 = out / "llava_s1" / "llava"
        pretrain(out, "llava_s1", "--cfg", "llava_demo_stage1", f"llava.decoder={decoder}")
        pretrain(out, "llava_s2", "--cfg", "llava_demo_stage2", f"llava.decoder={decoder}", f"llava.vision={s1}",
                 f"llava.projector_weights={s1 / 'projector.safetensors'}", f"data.train_shards={spec(verify, 'train')}")  # fmt: skip
        rows = score(noisy_val, out / "scores" / "vlm_val", "vlm", str(out / "llava_s2" / "llava"))
        results["ask_vlm"] = {"llava_s2 on noisy val": separation(rows, labels, "vlm", threshold=0.5)}

    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
