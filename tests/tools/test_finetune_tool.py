"""tools/finetune.py end to end on the real digits: learning, best checkpoint, export, SIGTERM + resume at the
same step and lr, image folders, 2-process DDP, and bad input stopped before training."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import wait_for
from PIL import Image
from tool_loader import ROOT, tool

from mmssl import config as C
from mmssl.checkpoints import load_exported
from mmssl.config import finetune as F
from mmssl.data.module import resolve_shards
from mmssl.data.shards import SampleDecoder, eval_pipeline
from mmssl.data.transforms import eval_view
from mmssl.factory import build_objective
from mmssl.optim import warmup_cosine

TINY_MAE = ["backbone.depth=2", "backbone.embed_dim=64", "backbone.num_heads=4", "mae.decoder_embed_dim=32",
            "mae.decoder_depth=1", "mae.decoder_num_heads=4"]  # fmt: skip
# the digits recipe without the heavy augmentation, so that a short run learns
FAST = ["data.num_workers=0", "data.batch_size=32", "trainer.log_every_n_steps=1", "augment.mixup=0",
        "augment.cutmix=0", "augment.auto_augment=null", "augment.re_prob=0", "optim.warmup_epochs=0.5",
        "optim.base_lr=1.6e-2"]  # fmt: skip


def save_pretraining_checkpoint(path: Path, cfg_name: str, overrides: list[str]) -> Path:
    """A checkpoint in tools/pretrain.py's format (state dict + run config) of an objective at its init."""
    cfg = C.load(cfg_name, overrides)
    torch.manual_seed(0)
    objective = build_objective(cfg)
    state = {f"objective.{k}": v for k, v in objective.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": C.to_dict(cfg)}, "global_step": 0}, path)
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    os.environ.setdefault("MMSSL_DATA", str(tmp_path_factory.mktemp("mmssl_data")))
    return save_pretraining_checkpoint(tmp_path_factory.mktemp("enc") / "mae.ckpt", "mae_digits", TINY_MAE)


def metrics(run: Path, version: int = 0) -> list[dict]:
    with open(run / "logs" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_print_config_shows_the_mae_and_maskfeat_recipes(capsys):
    finetune = tool("finetune")
    assert finetune.main(["--cfg", "finetune_mae_vitb", "--print-config"]) == 0
    out = capsys.readouterr().out
    for line in ("layer_decay: 0.65", "base_lr: 0.0005", "drop_path_rate: 0.1", "mixup: 0.8", "cutmix: 1.0",
                 "re_prob: 0.25", "smoothing: 0.1", "auto_augment: rand-m9-mstd0.5-inc1", "warmup_epochs: 5.0",
                 "max_epochs: 100", "weight_decay: 0.05", "global_pool: avg", "# lr 0.002 (0.0005 x 1024 / 256"):  # fmt: skip
        assert line in out, line
    assert finetune.main(["--cfg", "finetune_maskfeat_vitb", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "warmup_epochs: 20.0" in out and "# lr 0.008 (0.001 x 2048 / 256" in out


def test_bad_input_stops_before_training_naming_the_problem(encoder, tmp_path, capsys):
    finetune = tool("finetune")
    base = ["--cfg", "finetune_digits", f"out_dir={tmp_path}", *FAST]
    cases = [
        ([], "config key 'encoder': required"),
        ([f"encoder={encoder}", "num_classes=5"], "has label 5, outside the head's 0..4 (num_classes=5)"),
        ([f"encoder={encoder}", "num_classes=12"], "the held-out labels are 0..9 (10 classes), but the head has num_classes=12"),
        ([f"encoder={encoder}", "data.train_shards=demo:photos/train"], "data.train_shards: none of the"),
        ([f"encoder={encoder}", "arch=vit_base_patch16_224"], "an encoder of another architecture"),
        ([f"encoder={tmp_path / 'missing.ckpt'}"], "no such file"),
        ([f"encoder={encoder}", "augment.mixup=0.8", "data.batch_size=33"], "'data.batch_size': must be even"),
    ]  # fmt: skip
    for extra, message in cases:
        assert finetune.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
    assert not any(tmp_path.glob("*/checkpoints"))  # nothing trained


@pytest.mark.slow
def test_finetune_learns_keeps_the_best_epoch_and_exports(encoder, tmp_path):
    run = tmp_path / "learn"
    args = ["--cfg", "finetune_digits", f"encoder={encoder}", *FAST, "trainer.max_steps=156", f"out_dir={tmp_path}",
            "name=learn"]  # fmt: skip
    assert tool("finetune").main(args) == 0
    results = json.loads((run / "results.json").read_text())
    logged = [float(r["val/top1"]) for r in metrics(run) if r.get("val/top1")]
    assert len(logged) == 6  # 39 steps per epoch: every epoch evaluated, then the last and the best weights
    per_epoch = logged[:4]
    assert logged[4:] == pytest.approx([results["last"]["val/top1"], results["best"]["val/top1"]])
    assert results["best"]["val/top1"] == pytest.approx(max(per_epoch), abs=1e-3)  # best.ckpt is that epoch
    # a ViT from scratch (the encoder is at its MAE init) after 156 steps; measured 50.0 / 94.1, chance 10 / 50
    assert results["best"]["val/top1"] > 40 and results["last"]["val/top5"] > 85
    assert results["export"]["round_trip_max_abs_diff"] == {"safetensors": 0.0, "hf_folder": 0.0}

    # the export is a timm classifier with the sidecar of tools/export.py; its logits classify the digits
    backbone, info = load_exported(run / "export" / "learn.safetensors")
    assert info["objective"] == "finetune" and info["model_args"]["num_classes"] == 10
    view_cfg = dict(interpolation=info["interpolation"], mean=info["mean"], std=info["std"])
    view = eval_view(info["img_size"], crop_pct=info["crop_pct"], **view_cfg)
    urls = resolve_shards("demo:digits/val", "val")
    hits = total = 0
    with torch.no_grad():
        for batch in eval_pipeline(urls, view, 256, rank=0, world_size=1, decoder=SampleDecoder()):
            hits += (backbone.model(batch["image"]).argmax(1) == batch["label"]).sum().item()
            total += len(batch["label"])
    assert total == 540 and 100 * hits / total == pytest.approx(results["best"]["val/top1"], abs=0.01)


@pytest.mark.slow
def test_sigterm_then_resume_continues_at_the_same_step_and_lr(encoder, tmp_path):
    run = tmp_path / "resume"
    args = ["--cfg", "finetune_digits", f"encoder={encoder}", *FAST, "trainer.max_steps=60",
            "trainer.ckpt_every_n_steps=10", f"out_dir={tmp_path}", "name=resume"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(ROOT / "tools" / "finetune.py"), *args]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(run / "checkpoints" / "step0000010.ckpt", proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    stopped = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 10 <= stopped < 60

    res = subprocess.run([*cmd, "--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 60
    resumed = [r for r in metrics(run, version=1) if r.get("train/lr")]
    assert int(resumed[0]["step"]) == stopped  # the first step after the checkpoint, not step 0
    cfg = F.load("finetune_digits", args[2:])
    lr, warmup = C.learning_rate(cfg), round(0.5 * 39)  # 1257 // 32 = 39 steps per epoch
    for row in resumed:  # group 0 is the head's (layer-decay scale 1)
        expected = lr * warmup_cosine(int(row["step"]), warmup, 60, cfg.optim.min_lr / lr)
        assert float(row["train/lr"]) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def write_class_folders(root: Path, split: str, per_class: int) -> Path:
    urls = resolve_shards(f"demo:digits/{split}", split)
    seen: dict[int, int] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        label = int(sample["cls"])
        if seen.get(label, 0) >= per_class:
            continue
        seen[label] = seen.get(label, 0) + 1
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{sample['__key__']}.png").write_bytes(sample["png"])
    return root / split


@pytest.mark.slow
def test_image_folders_train_like_shards(encoder, tmp_path, capsys):
    train, val = write_class_folders(tmp_path, "train", 20), write_class_folders(tmp_path, "val", 5)
    assert Image.open(next(train.rglob("*.png"))).size == (32, 32)
    finetune = tool("finetune")
    args = ["--cfg", "finetune_digits", f"encoder={encoder}", *FAST, f"data.train_shards={train}",
            f"data.val_shards={val}", "trainer.max_steps=12", f"out_dir={tmp_path}"]  # fmt: skip
    assert finetune.main([*args, "num_classes=9", "name=bad"]) == 2
    assert "has 10 class folders, but num_classes=9" in capsys.readouterr().err
    assert finetune.main([*args, "name=folders"]) == 0
    results = json.loads((tmp_path / "folders" / "results.json").read_text())
    assert results["global_step"] == 12 and 0 <= results["best"]["val/top1"] <= 100
    rows = [r for r in metrics(tmp_path / "folders") if r.get("val/top1")]
    assert len(rows) == 4  # 200 images / 32 = 6 steps per epoch: 2 epochs, then the last and best weights


@pytest.mark.slow
def test_two_process_ddp(encoder, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--cfg", "finetune_digits", f"encoder={encoder}", *FAST, "data.batch_size=16", "trainer.max_steps=4",
            "data.samples_per_epoch=64", "trainer.devices=2", "trainer.strategy=ddp", "trainer.ddp_timeout_s=120",
            f"out_dir={tmp_path}", "name=ddp"]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "tools" / "finetune.py"), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in reports] == [4, 4]  # 2 epochs of 2 steps, each evaluated on both ranks
    assert "world size 2, global batch 32" in res.stdout
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert (tmp_path / "ddp" / "checkpoints" / "best.ckpt").is_file() and "val/top1" in results["best"]
