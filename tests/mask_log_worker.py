"""tools/pretrain.py with every training step's mask recorded, for tests/test_randomness.py.

Wraps ``MaskedModeling.forward`` (keeps the last mask) and ``PretrainModule.training_step`` (appends a digest
of that mask per (rank, step) to ``$MASK_LOG_DIR/rank{r}.jsonl``), then runs ``pretrain.main``. Lightning's
ddp strategy re-launches this script for the other ranks, so they are wrapped too. With ``$PREEMPT_AT_STEP``
set, every rank marks SIGTERM as received during that step, so ``LastCheckpoint`` saves ``last.ckpt`` after it
and the run exits with 143: a preemption at a known step that keeps the schedule (stopping through
``trainer.max_steps`` would change it, and ``should_stop`` ends the epoch, so a resume would find nothing left
to do). No real signal is sent: Lightning 2.6's SIGTERM handler runs a broadcast inside the handler, which
times out under DDP when the other rank is in a gradient all-reduce at that moment.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import pretrain  # noqa: E402

from mmssl.lit import PretrainModule  # noqa: E402
from mmssl.objectives.masked import MaskedModeling  # noqa: E402

_last: dict = {}
_forward, _training_step = MaskedModeling.forward, PretrainModule.training_step


def forward(self, batch, *args, **kwargs):
    out = _forward(self, batch, *args, **kwargs)
    _last["mask"] = out["mask"]
    return out


def training_step(self, batch, batch_idx):
    loss = _training_step(self, batch, batch_idx)
    mask = _last.pop("mask").detach().cpu().contiguous()
    digest = hashlib.sha256(mask.numpy().tobytes()).hexdigest()[:16]
    rank, step = self.global_rank, self.global_step
    with open(Path(os.environ["MASK_LOG_DIR"]) / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"rank": rank, "step": step, "masked": int(mask.sum()), "digest": digest}) + "\n")
    if step == int(os.environ.get("PREEMPT_AT_STEP", "-1")):
        self.trainer._signal_connector.received_sigterm = True  # what Lightning's handler sets
    return loss


MaskedModeling.forward, PretrainModule.training_step = forward, training_step

if __name__ == "__main__":
    sys.exit(pretrain.main())
