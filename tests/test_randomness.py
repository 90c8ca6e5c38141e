"""Randomness at scale: every micro-batch draws its own reproducible masks (run to run, and after a resume), and
drawing pictures neither reads nor reseeds a global random generator (DESIGN.md §9). Every rank's own stream is
checked on 2 real ranks by tests/tools/test_pretrain_cli.py's 2-process run."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
from conftest import MAE_TINY_RUN as TINY
from conftest import tiny_cfg, tiny_igpt
from lightning.pytorch.plugins.precision import Precision
from mask_log_worker import masks, recording
from torch.utils.data import DataLoader

from mmssl import config as C
from mmssl.factory import build_objective
from mmssl.lit import PretrainModule, step_seed
from mmssl.objectives.masked import MaskedModeling
from mmssl.ops import random_masking
from mmssl.viz import PictureCallback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import pretrain  # noqa: E402

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


# ---- the streams through the real CLI, in this process ------------------------------------------------------
def run_recorded(args: list[str], logs: Path, monkeypatch, preempt_at: int = -1) -> int:
    """tools/pretrain.py in this process (one rank), every step's mask logged to ``logs``."""
    logs.mkdir(parents=True)
    with monkeypatch.context() as m:
        for owner, name, wrapper in recording(logs, preempt_at):
            m.setattr(owner, name, wrapper)
        return pretrain.main(["--cfg", "mae_demo", *args])


def test_rerun_and_resume_draw_the_masks_of_the_uninterrupted_run(tmp_path, demo_root, monkeypatch):
    """The same seed gives the same masks run to run, and a run preempted (the SIGTERM path of LastCheckpoint)
    after step PREEMPT_AT and resumed continues the very same streams. That each rank draws its own stream, the
    one ``step_seed(seed, global rank, step, batch)`` gives, is checked on 2 real ranks by
    tests/tools/test_pretrain_cli.py::test_two_process_ddp_on_uneven_shards."""
    monkeypatch.setenv("MMSSL_DATA", demo_root)
    args = [*TINY, f"out_dir={tmp_path}", "data.batch_size=4", "data.val_shards=null", f"trainer.max_steps={STEPS}",
            "trainer.accelerator=cpu", "trainer.picture_every_n_steps=1000"]  # fmt: skip
    assert run_recorded([*args, "name=whole"], tmp_path / "whole", monkeypatch) == 0
    whole = masks(tmp_path / "whole")
    assert sorted(whole) == [(0, s) for s in range(STEPS)]
    assert len({str(row["mask"]) for row in whole.values()}) == STEPS  # a new mask every step

    parted = [*args, "name=parted"]
    assert (
        run_recorded(parted, tmp_path / "parted", monkeypatch, preempt_at=PREEMPT_AT) == pretrain.EXIT_SIGTERM
    )
    before = masks(tmp_path / "parted")
    assert sorted(before) == [(0, s) for s in range(PREEMPT_AT + 1)]
    assert before == {k: whole[k] for k in before}  # run to run: the same masks for the same seed
    assert run_recorded([*parted, "--resume"], tmp_path / "resumed", monkeypatch) == 0
    resumed = masks(tmp_path / "resumed")
    assert sorted(resumed) == [(0, s) for s in range(PREEMPT_AT + 1, STEPS)]
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
