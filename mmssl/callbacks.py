"""Training-system callbacks around the generic LightningModule (``lit.py``): the last checkpoint on exit,
SIGTERM or SIGINT, atomic checkpoint writes, a per-rank report, and files an objective saves beside its
checkpoints. Objective-agnostic.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # preemption / timeout / scancel, and Ctrl-C


class LastCheckpoint(L.Callback):
    """Saves ``last.ckpt`` when training ends (step checkpoints only come every N steps) and on SIGTERM
    (preemption, scancel, SLURM's --signal before the time limit) or SIGINT (Ctrl-C), where every rank stops at
    the same step. ``signum`` is the signal that stopped the run (None when none did); the pretrain CLI exits
    with 128 + signum (143, 130) so schedulers and shells see that the job did not finish.

    Lightning notices SIGTERM and raises SIGTERMException (a SystemExit with code 0) but saves nothing, and turns
    SIGINT into a KeyboardInterrupt wherever the main process is (inside an optimizer step, say) and saves
    nothing either.

    Lightning 2.6's own SIGTERM handler (``signal_connector._sigterm_notifier_fn``) runs ``dist.broadcast``
    inside the handler, on whichever ranks got the signal, wherever each one is: an unmatched collective that
    hangs DDP when one rank is signalled, or all at slightly different points (seen with torchrun on gloo).
    From the start of training this callback's handler only records the signal (and forwards it to processes
    Lightning's ddp started, as Lightning's does); ranks agree in ``on_train_batch_end`` through a collective
    every rank runs at the same point. A second SIGINT raises KeyboardInterrupt at once (no save).

    timeout, SLURM and Kubernetes signal the whole process group: the data workers must outlive the signal
    until the main process has saved, so they ignore both signals (``data.module.WorkerInit``) and end when
    the loader shuts them down (or, as torch's workers do, when the main process dies).
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.saved_step: int | None = None
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def signalled(self) -> bool:
        return self.signum is not None

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        launcher = trainer.strategy.launcher

        def record(signum, frame) -> None:
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # Ctrl-C twice: stop now, without saving
            if self.signum is None and launcher is not None:
                launcher.kill(signum)  # no-op unless this process started the others
            self.signum = self.signum or signum

        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:  # Lightning restores SIGTERM at teardown; ``teardown`` below the rest
                self._previous.setdefault(signum, signal.getsignal(signum))
                signal.signal(signum, record)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self.signum or (signal.SIGTERM if trainer.received_sigterm else 0)
        flag = torch.tensor(float(signum), device=pl_module.device)
        if (
            trainer.world_size > 1
        ):  # ranks may receive the signal at different steps; SIGTERM wins over SIGINT
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if flag.item():
            self.signum = int(flag.item())
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: optimizer, schedule, loops
            self.saved_step = trainer.global_step
            trainer._signal_connector.received_sigterm = True  # Lightning then raises on every rank

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):  # SIGINT before training started, or a second one
            self.signum = signal.SIGINT
            return
        # A signal before on_train_start met Lightning's handler; under DDP Lightning then raises at the start of
        # the next batch on every rank (training_epoch_loop._broadcast_sigterm_tensor), before the hook above.
        if isinstance(exception, SIGTERMException):
            self.signum = self.signum or signal.SIGTERM
            if trainer.training and self.saved_step != trainer.global_step:
                trainer.save_checkpoint(self.path, weights_only=False)
                self.saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # full state: optimizer, schedule, loops

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                if signum != signal.SIGTERM and handler is not None:  # Lightning restores its own
                    signal.signal(signum, handler)
        self._previous.clear()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, but a checkpoint appears under its final name only once it is complete: it
    is written to a temporary file in the same folder, flushed to disk, and renamed over the final name
    (``os.replace``, atomic on POSIX). Lightning 2.6's ``_atomic_save`` writes through an fsspec transaction,
    whose temporary file lives in the system temp folder (``tempfile.mkstemp()``) and is committed with
    ``shutil.move``: across filesystems that is a copy into the final name, so a full checkpoint disk leaves a
    truncated ``.ckpt`` that ``--resume`` would pick up. A failed write removes the temporary file and re-raises
    the OSError."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: the rename stays atomic
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
                raise e.__context__ from None  # torch's zip writer wraps the file's error (a full disk)
            raise
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


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
