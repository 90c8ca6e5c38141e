"""Training-system callbacks around the generic LightningModule (``lit.py``): the last checkpoint on exit or
SIGTERM, a per-rank report, and files an objective saves beside its checkpoints. Objective-agnostic.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn


class LastCheckpoint(L.Callback):
    """Saves ``last.ckpt`` when training ends (step checkpoints only come every N steps) and on SIGTERM
    (preemption, scancel, SLURM's --signal before the time limit), where every rank stops at the same step.

    Lightning notices SIGTERM and raises SIGTERMException (a SystemExit with code 0) but saves nothing; the
    pretrain CLI turns that into exit code 143 so schedulers see that the job did not finish.

    Lightning 2.6's own SIGTERM handler (``signal_connector._sigterm_notifier_fn``) runs ``dist.broadcast``
    inside the handler, on whichever ranks got the signal, wherever each one is: an unmatched collective that
    hangs DDP when one rank is signalled, or all at slightly different points (seen with torchrun on gloo).
    From the start of training this callback's handler only records the signal (and forwards it to processes
    Lightning's ddp started, as Lightning's does); ranks agree in ``on_train_batch_end`` through a collective
    every rank runs at the same point.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.saved_step: int | None = None
        self.signalled = False

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        launcher = trainer.strategy.launcher

        def record(signum, frame) -> None:
            if not self.signalled and launcher is not None:
                launcher.kill(signum)  # no-op unless this process started the others
            self.signalled = True

        if (
            threading.current_thread() is threading.main_thread()
        ):  # Lightning restores its handlers at teardown
            signal.signal(signal.SIGTERM, record)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = torch.tensor(float(self.signalled or trainer.received_sigterm), device=pl_module.device)
        if trainer.world_size > 1:  # ranks may receive the signal at different steps
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if flag.item():
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: optimizer, schedule, loops
            self.saved_step = trainer.global_step
            trainer._signal_connector.received_sigterm = True  # Lightning then raises on every rank

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        # A signal before on_train_start met Lightning's handler; under DDP Lightning then raises at the start of
        # the next batch on every rank (training_epoch_loop._broadcast_sigterm_tensor), before the hook above.
        if (
            isinstance(exception, SIGTERMException)
            and trainer.training
            and self.saved_step != trainer.global_step
        ):
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # full state: optimizer, schedule, loops


class RankReport(L.Callback):
    """Writes ``rank{r}.json`` (steps and batches this rank took) into the run directory at the end of fit."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_train_end(self, trainer, pl_module) -> None:
        report = {"rank": trainer.global_rank, "global_step": trainer.global_step, "batches": self.batches}
        (self.run_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class SaveParts(L.Callback):
    """Calls ``save(objective, directory, state_dict)`` on rank 0 whenever a full checkpoint is saved (step
    checkpoints, ``last.ckpt`` at the end and on SIGTERM), once per step: files that other tools load without
    Lightning (e.g. a LLaVA projector as safetensors; the objective's ``ObjectiveSpec.save_parts``).

    ``state_dict`` is the checkpoint's own (keys relative to the objective): on rank 0 it holds every tensor in
    full under any strategy (FSDP gathers it, ``state_dict_type="full"``), where the live parameters under FSDP
    are only this rank's shards."""

    def __init__(self, directory: str | Path, save: Callable[[nn.Module, Path, dict], object]):
        self.directory = Path(directory)
        self.save = save
        self.saved_step: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if not trainer.is_global_zero or self.saved_step == trainer.global_step:
            return
        prefix = "objective."
        state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        self.save(pl_module.objective, self.directory, state)
        self.saved_step = trainer.global_step
