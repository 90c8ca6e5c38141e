"""Randomness at scale: every rank draws its own reproducible masks (also after a resume), and drawing
pictures neither reads nor reseeds a global random generator (DESIGN.md §9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
from conftest import MAE_TINY_RUN as TINY
from conftest import tiny_cfg, tiny_igpt
from lightning.pytorch.plugins.precision import Precision
from torch.utils.data import DataLoader

from mmssl import config as C
from mmssl.factory import build_objective
from mmssl.lit import PretrainModule, step_seed
from mmssl.objectives.masked import MaskedModeling
from mmssl.ops import random_masking
from mmssl.viz import PictureCallback

ROOT = Path(__file__).resolve().parent.parent
STEPS, PREEMPT_AT = 6, 2  # the interrupted run stops after step 2: last.ckpt holds global step 3


def global_states() -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states += torch.cuda.get_rng_state_all()
    return states


def picture_objectives() -> dict[str, torch.nn.Module]:
    maskfeat = ["backbone.img_size=32", "backbone.patch_size=16", "backbone.depth=2", "backbone.embed_dim=64",
                "backbone.num_heads=4"]  # fmt: skip
    block = build_objective(C.load("maskfeat_demo", maskfeat))  # block masks from ops.block_masking
    random = MaskedModeling(block.backbone, block.target, mask="random", mask_ratio=0.4)  # mask-token path
    return {
        "mae": build_objective(tiny_cfg()),
        "maskfeat block": block,
        "maskfeat random": random,
        "igpt ar": tiny_igpt("ar"),
        "igpt bert": tiny_igpt("bert"),
    }


def picture_batch(name: str, device: torch.device) -> dict[str, torch.Tensor]:
    side = 8 if name.startswith("igpt") else 32
    return {"image": torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)}


@pytest.mark.parametrize("name", ["mae", "maskfeat block", "maskfeat random", "igpt ar", "igpt bert"])
def test_pictures_use_only_their_generator(name):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    objective = picture_objectives()[name].to(device).eval()
    if name.startswith("igpt"):
        torch.nn.init.normal_(objective.transformer.head.weight, std=0.5)  # non-zero logits: varied samples
    batch = picture_batch(name, device)

    def draw(seed: int) -> dict[str, torch.Tensor]:
        return objective.visualize(batch, lambda x: x.sigmoid(), torch.Generator(device).manual_seed(seed))

    before = global_states()
    first = draw(0)
    after = global_states()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "a global generator moved"
    torch.manual_seed(123)  # the pictures do not read the global state either
    again, other = draw(0), draw(1)
    assert list(first) == list(again) and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first), "the generator's seed changes nothing"


def test_picture_callback_never_reseeds_a_global_generator(tmp_path, monkeypatch):
    """CPU state is compared directly; CUDA generators (reseeded by ``torch.manual_seed`` even when a
    ``fork_rng(devices=[])`` restores only the CPU) are checked on a GPU and by spying on their seeding."""
    calls = []
    for fn in ("manual_seed", "manual_seed_all", "seed", "seed_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, fn, lambda *a, _fn=fn: calls.append(_fn))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = PretrainModule(build_objective(tiny_cfg()), lr=1e-3, total_steps=1).to(device)
    trainer = SimpleNamespace(is_global_zero=True, precision_plugin=Precision(), global_step=7)
    callback = PictureCallback(tmp_path, mean=(0.5,) * 3, std=(0.2,) * 3, num_images=2)
    callback._keep(picture_batch("mae", device), held_out=True)

    before = global_states()
    path = callback.draw(trainer, module, "a.png")
    assert path.stat().st_size > 1000
    assert all(torch.equal(a, b) for a, b in zip(before, global_states(), strict=True))
    assert calls == [], f"pictures reseeded CUDA generators: {calls}"


# ---- per-rank streams through the real CLI ---------------------------------------------------------------
def run_logged(args: list[str], logs: Path, root: str, **env: str) -> subprocess.CompletedProcess:
    logs.mkdir(parents=True, exist_ok=True)
    full_env = {
        **os.environ,
        **env,
        "MASK_LOG_DIR": str(logs),
        "MMSSL_DATA": root,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, str(ROOT / "tests" / "mask_log_worker.py"), "--cfg", "mae_demo", *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def masks(logs: Path) -> dict[tuple[int, int], str]:
    """(rank, step) -> digest of that step's mask; a step logged twice must have drawn the same mask."""
    out: dict[tuple[int, int], str] = {}
    for path in sorted(logs.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert out.setdefault((row["rank"], row["step"]), row["digest"]) == row["digest"]
    return out


@pytest.mark.slow
def test_ddp_ranks_draw_own_masks_reproducibly_and_resume_continues_them(tmp_path, demo_root):  # noqa: F811
    args = [*TINY, f"out_dir={tmp_path}", "data.batch_size=4", "data.val_shards=null",
            f"trainer.max_steps={STEPS}", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.strategy=ddp", "trainer.ddp_timeout_s=60"]  # fmt: skip
    res = run_logged([*args, "name=whole"], tmp_path / "whole", demo_root)
    assert res.returncode == 0, res.stderr[-3000:]
    whole = masks(tmp_path / "whole")
    assert sorted(whole) == [(r, s) for r in (0, 1) for s in range(STEPS)]
    # every rank at every step has a mask of its own (the old shared seed gave both ranks the same masks)
    assert len(set(whole.values())) == 2 * STEPS

    # the same seed again, preempted (SIGTERM path of LastCheckpoint) after step PREEMPT_AT, then resumed
    parted = [*args, "name=parted"]
    res = run_logged(parted, tmp_path / "parted", demo_root, PREEMPT_AT_STEP=str(PREEMPT_AT))
    assert res.returncode == 143, res.stderr[-3000:]
    before = masks(tmp_path / "parted")
    assert sorted(before) == [(r, s) for r in (0, 1) for s in range(PREEMPT_AT + 1)]
    assert before == {k: whole[k] for k in before}  # run to run: the same masks for the same seed
    res = run_logged([*parted, "--resume"], tmp_path / "resumed", demo_root)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = masks(tmp_path / "resumed")
    assert sorted(resumed) == [(r, s) for r in (0, 1) for s in range(PREEMPT_AT + 1, STEPS)]
    assert resumed == {k: whole[k] for k in resumed}  # the resumed run continues the same streams


def test_each_micro_batch_draws_from_its_own_rank_step_stream(tmp_path):
    """With gradient accumulation the micro-batches of one optimizer step share ``global_step``; each still
    draws its own mask, the one a fresh generator seeded ``step_seed(seed, rank, step, batch_idx)`` gives."""
    objective = build_objective(tiny_cfg())
    drawn, forward = [], objective.forward

    def recording_forward(batch):
        out = forward(batch)
        drawn.append(out["mask"])
        return out

    objective.forward = recording_forward
    images = torch.randn(4, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loader = DataLoader([{"image": x} for x in images], batch_size=None)
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(PretrainModule(objective, lr=1e-3, total_steps=2, seed=5), train_dataloaders=loader)
    num_patches = objective.backbone.num_patches
    expected = [
        random_masking(
            torch.rand(2, num_patches, generator=torch.Generator().manual_seed(step_seed(5, 0, s, i))), 0.75
        )[2]
        for s, i in [(0, 0), (0, 1), (1, 2), (1, 3)]
    ]
    assert len(drawn) == 4 and all(torch.equal(a, b) for a, b in zip(drawn, expected, strict=True))
    assert len({tuple(m.flatten().tolist()) for m in drawn}) == 4
