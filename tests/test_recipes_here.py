"""Paper recipes on the machine they are started on (issue 19 item 3): a recipe states its global batch
(``trainer.global_batch``) and takes devices / nodes from this machine or the launcher, keeping the batch by
gradient accumulation; settings that cannot work here are refused at config time, naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmssl import config as C
from mmssl import launch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import pretrain  # noqa: E402

TORCHRUN_2x2 = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "3"}
LAUNCH_VARS = (
    "TORCHELASTIC_RUN_ID",
    "SLURM_NTASKS",
    "NODE_RANK",
    "MASTER_ADDR",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
)
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA does")


@pytest.fixture
def no_launcher(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)


@CPU_ONLY
def test_recipes_keep_their_global_batch_by_accumulation(no_launcher, monkeypatch):
    cfg, note = C.keep_global_batch(launch.configure(C.load("mae_vitb")))  # one CPU process here
    assert (C.world_size(cfg), cfg.trainer.accumulate_grad_batches) == (1, 64)
    assert cfg.data.batch_size * 1 * cfg.trainer.accumulate_grad_batches == C.global_batch(cfg) == 4096
    assert C.learning_rate(cfg) == pytest.approx(1.5e-4 * 4096 / 256)  # the paper's lr, whatever the devices
    assert "trainer.global_batch=4096" in note and "trainer.accumulate_grad_batches=64" in note

    for key, value in TORCHRUN_2x2.items():  # torchrun: 2 nodes x 2 processes
        monkeypatch.setenv(key, value)
    cfg, note = C.keep_global_batch(launch.configure(C.load("mae_vitb")))
    assert (C.world_size(cfg), cfg.trainer.accumulate_grad_batches) == (4, 16)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (2, 2)

    with pytest.raises(C.ConfigError, match=r"'trainer\.global_batch': 4096 is not a multiple of .* 48 x 4"):
        C.keep_global_batch(launch.configure(C.load("mae_vitb", ["data.batch_size=48"])))
    with pytest.raises(C.ConfigError, match=r"'trainer\.accumulate_grad_batches': 2, .* needs 16"):
        C.keep_global_batch(launch.configure(C.load("mae_vitb", ["trainer.accumulate_grad_batches=2"])))
    plain, note = C.keep_global_batch(C.load("mae_demo"))  # no global batch stated: nothing changes
    assert note is None and plain.trainer.accumulate_grad_batches == 1


@CPU_ONLY
@pytest.mark.parametrize(
    "recipe, overrides, key",
    [
        ("simclr_resnet50", [], "trainer.sync_batchnorm"),  # SyncBatchNorm needs CUDA
        ("mae_vitb", ["trainer.num_nodes=8"], "trainer.num_nodes"),  # the paper's 8 nodes, no launcher
        ("clip_vitb32", [], "trainer.num_nodes"),  # the recipe's own 16 nodes
    ],
)
def test_what_cannot_work_here_is_refused_at_config_time(
    no_launcher, tmp_path, capsys, recipe, overrides, key
):
    argv = ["--cfg", recipe, f"out_dir={tmp_path}", "data.train_shards=demo:photos/train", *overrides]
    assert pretrain.main(argv) == 2
    assert f"config key '{key}'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before any run folder, model or process


@CPU_ONLY
@pytest.mark.slow
def test_mae_vitb_runs_here_with_the_global_batch_by_accumulation(tmp_path):
    small = ["backbone.img_size=32", "backbone.depth=1", "backbone.embed_dim=32", "backbone.num_heads=2",
             "mae.decoder_embed_dim=32", "mae.decoder_depth=1", "mae.decoder_num_heads=2", "data.num_workers=0",
             "data.shuffle_buffer=64", "data.samples_per_epoch=4096", "trainer.precision=32-true",
             "trainer.max_steps=1", "optim.warmup_steps=0"]  # fmt: skip
    argv = ["--cfg", "mae_vitb", "data.train_shards=demo:photos/train", f"out_dir={tmp_path}", *small]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "pretrain.py"), *argv], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trainer.accumulate_grad_batches=64" in res.stderr
    report = json.loads((tmp_path / "mae_vitb" / "rank0.json").read_text())
    assert report == {
        "rank": 0,
        "global_step": 1,
        "batches": 64,
    }  # 64 micro-batches of 64 for one step of 4096
