"""tools/pretrain.py with every training step's mask recorded: run as a script by the 2-process CLI test
(tests/tools/test_pretrain_cli.py; Lightning's ddp strategy re-launches this script for the other rank, so it is
wrapped too), or installed in-process by tests/test_randomness.py.

Wraps ``MaskedModeling.forward`` (keeps the last mask) and ``PretrainModule.training_step`` (appends the mask of
each (rank, step, batch_idx) to ``<log dir>/rank{r}.jsonl``; the script takes the folder from ``$MASK_LOG_DIR``).
With a ``preempt_at`` step, every rank marks SIGTERM as received during that step, so ``LastCheckpoint`` saves ``last.ckpt`` after it and the
run exits with 143: a preemption at a known step that keeps the schedule (stopping through ``trainer.max_steps``
would change it, and ``should_stop`` ends the epoch, so a resume would find nothing left to do). No real signal
is sent: Lightning 2.6's SIGTERM handler runs a broadcast inside the handler, which times out under DDP when the
other rank is in a gradient all-reduce at that moment.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import pretrain  # noqa: E402
import torch  # noqa: E402

from mmssl.lit import PretrainModule, step_seed  # noqa: E402
from mmssl.objectives.masked import MaskedModeling  # noqa: E402
from mmssl.ops import random_masking  # noqa: E402


def recording(log_dir: str | Path, preempt_at: int = -1) -> list[tuple[type, str, object]]:
    """(class, attribute, wrapper) for ``setattr``/``monkeypatch.setattr``: the two wrapped methods."""
    last: dict = {}
    forward, training_step = MaskedModeling.forward, PretrainModule.training_step

    def recording_forward(self, batch, *args, **kwargs):
        out = forward(self, batch, *args, **kwargs)
        last["mask"] = out["mask"]
        return out

    def recording_training_step(self, batch, batch_idx):
        loss = training_step(self, batch, batch_idx)
        mask = last.pop("mask").detach().cpu().int().tolist()
        rank, step = self.global_rank, self.global_step
        with open(Path(log_dir) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"rank": rank, "step": step, "batch_idx": batch_idx, "mask": mask}) + "\n")
        if step == preempt_at:
            self.trainer._signal_connector.received_sigterm = True  # what Lightning's handler sets
        return loss

    return [
        (MaskedModeling, "forward", recording_forward),
        (PretrainModule, "training_step", recording_training_step),
    ]


def masks(log_dir: Path) -> dict[tuple[int, int], dict]:
    """(rank, step) -> that step's record; a step logged twice must have drawn the same mask."""
    out: dict[tuple[int, int], dict] = {}
    for path in sorted(log_dir.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert out.setdefault((row["rank"], row["step"]), row) == row
    return out


def drawn_mask(
    seed: int, rank: int, step: int, batch_idx: int, batch: int, patches: int, ratio: float
) -> list:
    """The MAE mask that a fresh generator seeded ``step_seed(seed, rank, step, batch_idx)`` gives: what
    ``PretrainModule`` reseeds the global generator with before each training batch (mmssl/lit.py)."""
    generator = torch.Generator().manual_seed(step_seed(seed, rank, step, batch_idx))
    return random_masking(torch.rand(batch, patches, generator=generator), ratio)[2].int().tolist()


if __name__ == "__main__":
    for owner, name, wrapper in recording(os.environ["MASK_LOG_DIR"]):
        setattr(owner, name, wrapper)
    sys.exit(pretrain.main())
