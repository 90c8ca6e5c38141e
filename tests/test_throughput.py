"""Throughput in the logs (mmssl/throughput.py) and ``trainer.compile`` (mmssl/factory): real Lightning fits on
CPU with objectives whose speed is known, and a compiled MAE against the eager one."""

from __future__ import annotations

import csv
import time

import lightning.pytorch as L
import pytest
import torch
from conftest import tiny_cfg
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from mmssl import factory
from mmssl import throughput as T
from mmssl.lit import PretrainModule

BATCH, STEP_S, TOKENS = 8, 0.05, 10


class Sleepy(nn.Module):
    """An objective whose step takes a known time: ``STEP_S`` seconds (the first step 1 s, validation 1 s)."""

    def __init__(self, tokens: bool = True, flops: int | None = None):
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.calls, self.tokens, self.flops = 0, tokens, flops

    def forward(self, batch):
        self.calls += 1
        time.sleep(1.0 if self.calls == 1 or not self.training else STEP_S)
        images = batch["image"]
        out = {"loss": self.linear(images.mean((2, 3))).pow(2).mean()}
        if self.tokens:
            out["tokens"] = torch.tensor(float(TOKENS * len(images)))
        return out

    def flops_per_sample(self):
        return self.flops


def fit(tmp_path, objective, steps=7, log_every=2, val=False, accumulate=1) -> list[dict]:
    batches = [{"image": torch.randn(BATCH, 3, 4, 4)} for _ in range(steps * accumulate)]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=log_every,
        logger=CSVLogger(tmp_path, name="logs"), callbacks=[T.ThroughputLogger()],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=accumulate, limit_val_batches=1 if val else 0,
        val_check_interval=3 if val else None, num_sanity_val_steps=0,
    )  # fmt: skip
    module = PretrainModule(objective, lr=1e-3, total_steps=steps)
    loader = DataLoader(batches, batch_size=None)
    trainer.fit(module, loader, DataLoader(batches[:1], batch_size=None) if val else None)
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/images_per_s")]


def test_images_and_tokens_per_second_skip_the_first_step_and_validation(tmp_path):
    rows = fit(tmp_path, Sleepy(), val=True)
    # logged steps only (every 2nd: Lightning counts from 0), the first step's 1 s and validation's 1 s left out
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    expected = BATCH / STEP_S  # 160 images/s if nothing but the sleep took time
    for row in rows:
        speed = float(row["train/images_per_s"])
        assert 0.6 * expected < speed < 1.02 * expected, row
        assert float(row["train/tokens_per_s"]) == pytest.approx(TOKENS * speed, rel=1e-6)
    assert "train/mfu" not in rows[0]  # CPU: no known peak


def test_gradient_accumulation_measures_whole_optimizer_steps(tmp_path):
    rows = fit(tmp_path, Sleepy(tokens=False), steps=4, log_every=1, accumulate=2)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert not rows[0].get("train/tokens_per_s")
    # step 0's interval starts after its first micro-batch: one counted batch of 8 in one sleep
    for row in rows:
        assert 0.6 * BATCH / STEP_S < float(row["train/images_per_s"]) < 1.02 * BATCH / STEP_S, row


def test_mfu_is_achieved_flops_over_peak(tmp_path, monkeypatch):
    assert T.peak_flops(torch.device("cpu"), "bf16-mixed") is None
    monkeypatch.setattr(T, "peak_flops", lambda device, precision: 1e6)  # as if on a 1 MFLOP/s device
    rows = fit(tmp_path, Sleepy(flops=1000), steps=5)
    assert len(rows) == 2
    for row in rows:
        assert float(row["train/mfu"]) == pytest.approx(1000 * float(row["train/images_per_s"]) / 1e6)


def test_every_trainer_logs_throughput():
    cfg = tiny_cfg("data.train_shards=demo:photos/train")
    plan = factory.Plan(1, 64, 1e-3, 10, 10, 0)
    assert any(isinstance(c, T.ThroughputLogger) for c in factory.build_trainer(cfg, plan).callbacks)


@pytest.mark.slow
def test_compiled_mae_trains_like_eager_and_keeps_checkpoint_keys(tmp_path, monkeypatch):
    # Inductor draws its own random numbers unless told to fall back to eager's: then the MAE masks agree.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    batches = [{"image": torch.randn(8, 3, 32, 32)} for _ in range(3)]
    plan = factory.Plan(1, 8, 1e-3, 3, 3, 0)

    def run(compile: bool) -> tuple[list[float], list[str]]:
        cfg = tiny_cfg("trainer.precision=32-true", f"trainer.compile={str(compile).lower()}")
        torch.manual_seed(0)
        module = factory.build_module(cfg, plan)
        losses = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(outputs["loss"].item())

        trainer = L.Trainer(
            accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
        )  # fmt: skip
        trainer.fit(module, DataLoader(batches, batch_size=None))
        trainer.save_checkpoint(tmp_path / f"compile_{compile}.ckpt", weights_only=True)
        ckpt = torch.load(tmp_path / f"compile_{compile}.ckpt", weights_only=True)
        return losses, list(ckpt["state_dict"])

    eager, eager_keys = run(False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, compiled_keys = run(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert eager[-1] != eager[0]  # the steps trained
    assert compiled_keys == eager_keys
