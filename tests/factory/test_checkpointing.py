"""Pretraining and fine-tuning save a run the same way (``factory.checkpointing``): step checkpoints every
``trainer.ckpt_every_n_steps``, ``last.ckpt``, and every file written through ``callbacks.AtomicCheckpointIO``
(the fine-tune trainer used Lightning's own IO, whose temporary file lives in the system temp folder and is
copied into the final name when that is another filesystem: a kill mid-copy left a truncated checkpoint)."""

from __future__ import annotations

import resource
import signal

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mmssl import config as C
from mmssl import factory
from mmssl.callbacks import AtomicCheckpointIO, LastCheckpoint
from mmssl.config import finetune as F
from mmssl.factory import finetune as FT

SAVING = ["trainer.ckpt_every_n_steps=3", "trainer.keep_checkpoints=2", "trainer.accelerator=cpu",
          "trainer.devices=1"]  # fmt: skip
PLAN = factory.Plan(world_size=1, global_batch=32, lr=0.1, steps_per_epoch=10, total_steps=20, warmup_steps=2)


def pretrain_trainer(tmp_path):
    cfg = C.load("mae_demo", [f"out_dir={tmp_path}", "name=pre", "trainer.precision=32-true", *SAVING])
    return factory.build_trainer(cfg, PLAN), tmp_path / "pre" / "checkpoints"


def finetune_trainer(tmp_path):
    cfg = F.load("finetune_digits", [f"out_dir={tmp_path}", "name=ft", "trainer.precision=32-true", *SAVING])
    return FT.build_trainer(cfg, PLAN), tmp_path / "ft" / "checkpoints"


@pytest.mark.parametrize("build", [pretrain_trainer, finetune_trainer], ids=["pretrain", "finetune"])
def test_both_trainers_save_step_and_last_checkpoints_atomically(build, tmp_path):
    trainer, ckpt_dir = build(tmp_path)
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, AtomicCheckpointIO), type(io).__name__

    [step] = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor == "step"]
    seen = (step.dirpath, step.filename, step._every_n_train_steps, step.save_top_k, step.save_last)
    assert seen == (str(ckpt_dir), "step{step:07d}", 3, 2, True)
    [last] = [c for c in trainer.callbacks if isinstance(c, LastCheckpoint)]
    assert last.path == str(ckpt_dir / "last.ckpt")

    # a save that fails part way (a full disk: writes past 50 kB fail) through this trainer's own IO leaves the
    # previous last.ckpt as it was and no partial or temporary file beside it
    path = ckpt_dir / "last.ckpt"
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(2)}}, path)
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error (EFBIG), not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
    try:
        with pytest.raises(OSError, match="too large"):
            io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.zeros(100_000)}}, path)  # 400 kB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_bytes() == before
    assert [p.name for p in ckpt_dir.iterdir()] == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["global_step"] == 2
