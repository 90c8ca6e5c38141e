"""SimCLR through tools/pretrain.py on the bundled demo digits: a ResNet and a ViT learn (falling loss).
Subprocesses, as in test_pretrain_cli.py. The gathered loss under 2-process DDP: tests/test_dist.py."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STEPS = 25
SMALL = [
    "data.batch_size=32",
    "data.num_workers=1",  # a worker runs the augmentations single-threaded, faster than the main process
    f"data.samples_per_epoch={32 * STEPS}",  # one epoch: one loader start
    "data.shuffle_buffer=200",
    "optim.warmup_steps=3",
    "trainer.log_every_n_steps=1",
    "data.val_shards=null",
]
RESNET = ["backbone.name=resnet18"]
VIT = ["backbone.name=vit_tiny_patch16_224", "backbone.patch_size=8", "backbone.depth=4",
       "optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=0.05"]  # fmt: skip


def cli(args: list[str], demo_root: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMSSL_DATA": demo_root, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tools" / "pretrain.py"), "--cfg", "simclr_digits", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def train_losses(run: Path) -> list[float]:
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [RESNET, VIT], ids=["resnet18", "vit"])
def test_pretrain_on_demo_digits_loss_falls(tmp_path, demo_root, backbone):
    steps = STEPS
    res = cli([*SMALL, *backbone, f"trainer.max_steps={steps}", f"out_dir={tmp_path}", "name=run"], demo_root)
    assert res.returncode == 0, res.stderr[-3000:]
    losses = train_losses(tmp_path / "run")
    assert len(losses) == steps and all(map(lambda x: x == x, losses))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, losses  # from about 2 log(2 * 32 - 1) = 8.3 at the start
    assert (tmp_path / "run" / "pictures" / "final.png").is_file()  # views + nearest second view
