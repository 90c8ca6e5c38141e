"""Checkpoints that survive a full disk: atomic writes (callbacks.AtomicCheckpointIO), and --resume falling back
loudly past an unreadable last.ckpt to the newest readable one, or continuing from an explicit path."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch

from mmssl.callbacks import AtomicCheckpointIO
from mmssl.checkpoints import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import pretrain  # noqa: E402


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail (EFBIG) as they would on a full disk: a real write error, raised by the
    kernel in the middle of whatever writes the file (RLIMIT_FSIZE; SIGXFSZ ignored so it is an error)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def fake_checkpoint(step: int, size: int = 2) -> dict:
    return {"state_dict": {"objective.w": torch.full((size,), float(step))}, "hyper_parameters": {"config": {}},
            "global_step": step}  # fmt: skip


def test_a_failed_write_leaves_no_file_under_a_final_name(tmp_path):
    io = AtomicCheckpointIO()
    good = tmp_path / "last.ckpt"
    io.save_checkpoint(fake_checkpoint(2), good)
    before = good.read_bytes()
    for path in (good, tmp_path / "step0000004.ckpt"):  # over an existing file, and a new one
        with file_size_limit(50_000), pytest.raises(OSError, match="too large"):
            io.save_checkpoint(fake_checkpoint(4, size=100_000), path)  # 400 kB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file, no temporary left
    assert good.read_bytes() == before


def test_resume_falls_back_loudly_to_the_newest_readable_checkpoint(tmp_path, capsys):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    for i, step in enumerate((2, 4)):
        path = ckpt_dir / f"step{step:07d}.ckpt"
        torch.save(fake_checkpoint(step), path)
        os.utime(path, (1000 + i, 1000 + i))  # step 4 is the newer file
    last = ckpt_dir / "last.ckpt"
    torch.save(fake_checkpoint(6), last)
    last.write_bytes(last.read_bytes()[:200])  # cut short, as a full disk leaves a non-atomic write

    path, shapes = pretrain.readable_checkpoint(last, tmp_path)
    assert path == ckpt_dir / "step0000004.ckpt" and shapes == {"objective.w": (2,)}
    err = capsys.readouterr().err
    assert "last.ckpt" in err and "step0000004.ckpt (step 4)" in err and "newest readable" in err

    # an explicit path is taken as given: the older one works, an unreadable one is refused, never replaced
    assert pretrain.readable_checkpoint(ckpt_dir / "step0000002.ckpt", tmp_path)[0].name == "step0000002.ckpt"
    (ckpt_dir / "step0000004.ckpt").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="step0000004.ckpt: not a readable torch checkpoint"):
        pretrain.readable_checkpoint(ckpt_dir / "step0000004.ckpt", tmp_path)
    (ckpt_dir / "step0000002.ckpt").unlink()
    with pytest.raises(CheckpointError, match="no readable checkpoint: .*last.ckpt.*step0000004.ckpt"):
        pretrain.readable_checkpoint(last, tmp_path)


TINY = ["--cfg", "mae_demo", "backbone.img_size=32", "backbone.depth=2", "backbone.embed_dim=64", "backbone.num_heads=4",
        "mae.decoder_embed_dim=64", "mae.decoder_depth=1", "mae.decoder_num_heads=4", "data.batch_size=16",
        "data.num_workers=0", "data.shuffle_buffer=50", "data.val_shards=null", "trainer.precision=32-true",
        "trainer.ckpt_every_n_steps=2", "trainer.log_every_n_steps=1", "trainer.picture_every_n_steps=1000", "optim.warmup_steps=1"]  # fmt: skip


def first_logged_step(run: Path, version: int) -> int:
    import csv

    with open(run / "logs" / f"version_{version}" / "metrics.csv") as f:
        return min(int(r["step"]) for r in csv.DictReader(f) if r.get("train/lr"))


@pytest.mark.slow
def test_resume_falls_back_takes_a_path_and_refuses_another_architecture_or_an_unsafe_file(tmp_path, capsys):
    run, args = tmp_path / "r", [*TINY, f"out_dir={tmp_path}", "name=r"]
    ckpts = run / "checkpoints"
    assert pretrain.main([*args, "trainer.max_steps=4"]) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # cut short
    capsys.readouterr()

    assert pretrain.main([*args, "trainer.max_steps=6", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"{last}: not a readable torch checkpoint" in err and "resuming from" in err
    assert "step0000004.ckpt (step 4)" in err
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert first_logged_step(run, 1) == 4

    assert pretrain.main([*args, "trainer.max_steps=6", "--resume", str(ckpts / "step0000002.ckpt")]) == 0
    assert first_logged_step(run, 2) == 2

    assert pretrain.main([*args, "trainer.max_steps=6", "backbone.depth=3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume {last}: the weights do not fit the model this config builds" in err
    assert "missing (e.g. objective.backbone.model.blocks.2." in err

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "x": Evil()}, evil)
    assert pretrain.main([*args, "trainer.max_steps=6", "--resume", str(evil)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {evil} was refused" in err and "weights_only=False" not in err
