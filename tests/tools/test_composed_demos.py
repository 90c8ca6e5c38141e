"""The demo recipes of the compositions and SigLIP train through tools/pretrain.py on the bundled demo data (a few
steps at a small batch, CPU): every part's loss is logged and finite, and checkpoints are written."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["data.batch_size=16", "data.num_workers=0", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
         "optim.warmup_steps=1", "data.val_shards=null"]  # fmt: skip
DEMOS = {  # recipe -> metrics that must be logged
    "slip_demo": ("train/loss", "train/clip/loss", "train/simclr/loss", "train/simclr/contrast_acc"),
    "flip_demo": ("train/loss", "train/logit_scale"),
    "siglip_demo": ("train/loss", "train/logit_bias"),
    "maskfeat_pixel_hog_demo": ("train/loss", "train/hog/loss", "train/pixel/loss"),
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("recipe", list(DEMOS))
def test_demo_recipe_trains_through_the_cli(recipe, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "pretrain.py"),
        "--cfg",
        recipe,
        *SHORT,
        f"out_dir={tmp_path}",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / recipe
    assert (run / "checkpoints" / "last.ckpt").is_file()
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in DEMOS[recipe]:
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 4 and all(math.isfinite(v) for v in values), (key, values)
