"""Lightning DataModule over webdataset shards (or the bundled ``demo:`` sets).

Training is step-budgeted rather than data-exhausted (DESIGN.md section 5, open_clip's ``resampled``
mode): an "epoch" is ``samples_per_epoch`` samples, each rank yields exactly ``batches_per_rank`` full
batches, each DataLoader worker exactly ``batches_per_rank / num_workers`` of them, whatever the shards.
The loader reports that length so Lightning knows the epoch size for schedules and progress bars.

Randomness: the stream seed mixes ``seed``, the trainer's ``global_step`` when the loader is built, the
rank, the pass number of the loader (one pass per epoch) and the worker id. Every epoch therefore draws a
fresh stream, and a run resumed at step ``s`` draws a stream that is reproducible from ``s``, without
``reload_dataloaders_every_n_epochs``. Leave that at 0: with reloading, Lightning 2.6 calls ``iter()`` on the
new loader twice per epoch (``FitLoop.setup_data`` and ``_TrainingEpochLoop.on_run_start``), starting the
workers twice. Augmentations use torch's RNG in each worker, which Lightning seeds through
``seed_everything(..., workers=True)``: its worker_init_fn mixes the rank and worker id into each worker's
seed, so workers and ranks draw distinct augmentations even though ``seed_everything`` itself gives every rank
the same seed (for identical initial weights). The training processes' own generators (masks, drop-path,
and augmentations when ``num_workers=0``) are reseeded per rank and step by ``PretrainModule`` (``lit.py``).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable

import lightning as L
import torch
import webdataset as wds
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from mmssl.data import demo
from mmssl.data.shards import (
    SampleDecoder,
    count_samples,
    eval_pipeline,
    expand_shards,
    set_epoch,
    train_pipeline,
)
from mmssl.data.transforms import NormalizeBatch, View, defer_normalize

log = logging.getLogger(__name__)


def resolve_shards(spec: str, config_key: str, demo_root: str | None = None) -> list[str]:
    """Expand a shard spec (``"::"``-joined parts, ``demo:`` allowed) naming ``config_key`` on failure."""
    try:
        parts = [demo.resolve(p, demo_root) if p.startswith("demo:") else p for p in spec.split("::")]
        return expand_shards("::".join(parts))
    except (FileNotFoundError, ValueError) as exn:
        raise type(exn)(f"{config_key}={spec!r}: {exn}") from exn


class WorkerInit:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGINT and SIGTERM, then seeds itself as Lightning's
    own ``worker_init_fn`` would (``seed_everything(..., workers=True)``, which Lightning adds only to loaders
    without one).

    timeout, SLURM, Kubernetes and a terminal's Ctrl-C signal the whole process group. Workers that die of the
    signal make the main process fail ("DataLoader worker ... is killed by signal") before it can save, so only
    the main process handles them (``callbacks.LastCheckpoint``); the workers end when the loader shuts them
    down, or when the main process dies (torch's workers watch their parent)."""

    def __init__(self, rank: int):
        self.rank = rank
        atexit.unregister(_kill_leftover_workers)  # registered once, however many loaders are built
        atexit.register(_kill_leftover_workers)

    def __call__(self, worker_id: int) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        if int(os.environ.get("PL_SEED_WORKERS", 0)):  # what lightning.fabric.utilities.data adds otherwise
            pl_worker_init_function(worker_id, rank=self.rank)


def _kill_leftover_workers() -> None:
    """At interpreter exit, SIGKILL the daemonic children (DataLoader workers) still alive, e.g. after a run
    stopped by an exception whose loader was never shut down. multiprocessing's own exit handler, which runs
    after this one, would send them SIGTERM, which these workers ignore, and then wait for them forever."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


class _TrainLoader(DataLoader):
    """DataLoader with the exact epoch length and a fresh stream on each pass.

    Workers receive a new copy of the pipeline each pass, so the pass number has to be set from here
    (``set_epoch``); otherwise a loader that Lightning iterates again would replay the same samples.
    """

    def __init__(self, pipeline, length: int, **kwargs) -> None:
        super().__init__(pipeline, batch_size=None, **kwargs)
        self.length = length
        self.passes = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        set_epoch(self.dataset, self.passes)
        self.passes += 1
        return super().__iter__()


class ShardDataModule(L.LightningDataModule):
    """Batches of dicts (``image``, ``label``, ...) from shard specs; see the module docstring."""

    def __init__(
        self,
        train_shards: str,
        val_shards: str = "",
        *,
        train_view: View,
        val_view: View | None = None,
        batch_size: int,
        num_workers: int = 4,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        decoder: SampleDecoder | None = None,
        shuffle_buffer: int = 2000,
        text_fn: Callable | None = None,
        demo_root: str | None = None,
        normalize_on_device: bool = False,
    ) -> None:
        """``normalize_on_device``: a training view ending in its normalisation (``mae_view``, ``clip_view``) makes
        uint8 pictures in the workers, and ``on_after_batch_transfer`` normalises each batch on the training
        device (Lightning calls it; a loop of your own gets uint8 batches and calls ``self.batch_transform``).
        Those uint8 batches are laid out channels-last (``ScaledRandomResizedCrop``'s layout, kept by ``collate``);
        ``batch_transform`` returns contiguous float32 (B, C, H, W).
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        # Expand now so that a typo fails before any model is built or process is spawned.
        self.train_urls = resolve_shards(train_shards, "data.train_shards", demo_root)
        self.val_urls = resolve_shards(val_shards, "data.val_shards", demo_root) if val_shards else []
        if samples_per_epoch is None:
            samples_per_epoch = count_samples(self.train_urls)
            if samples_per_epoch is None:
                raise ValueError(
                    f"data.samples_per_epoch is not set and data.train_shards={train_shards!r} has no "
                    "manifest.json (write_shards/tools/make_shards.py) or sizes.json (open_clip) with counts for "
                    "every shard; set data.samples_per_epoch"
                )
        elif (held := count_samples(self.train_urls)) is not None and samples_per_epoch > held:
            # a recipe's fixed epoch (simclr_digits: 5120) reused on a small set repeats every image many times
            log.warning(
                "mmssl: data.samples_per_epoch=%d is %.1f passes over the %d samples of data.train_shards "
                "(manifest.json) per epoch; set data.samples_per_epoch=null for one pass",
                samples_per_epoch, samples_per_epoch / held, held,
            )  # fmt: skip
        if samples_per_epoch < 1:
            raise ValueError(f"data.samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.samples_per_epoch = samples_per_epoch
        self.batch_transform: NormalizeBatch | None = None
        if normalize_on_device:
            train_view, self.batch_transform = defer_normalize(train_view)
        self.train_view = train_view
        self.val_view = val_view
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.decoder = decoder if decoder is not None else SampleDecoder()
        self.shuffle_buffer = shuffle_buffer
        self.text_fn = text_fn

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Training batches of a deferred view arrive uint8; validation batches (eval views) are float already.
        return self.batch_transform(batch) if self.batch_transform is not None else batch

    def batches_per_rank(self, world_size: int) -> int:
        """Full batches per rank and epoch: a multiple of the worker count, at least one per worker."""
        workers = max(self.num_workers, 1)
        n = self.samples_per_epoch // (self.batch_size * world_size)
        return max(n // workers, 1) * workers

    def steps_per_epoch(self, world_size: int, accumulate_grad_batches: int = 1) -> int:
        """Optimizer steps per epoch; Lightning also steps on a last, incomplete accumulation window."""
        return -(-self.batches_per_rank(world_size) // accumulate_grad_batches)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _pin_memory(self) -> bool:
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_world()
        step = self.trainer.global_step if self.trainer is not None else 0
        per_rank = self.batches_per_rank(world_size)
        pipeline = train_pipeline(
            self.train_urls,
            self.train_view,
            self.batch_size,
            per_rank // max(self.num_workers, 1),
            rank=rank,
            world_size=world_size,
            seed=wds.utils.make_seed(self.seed, step),
            decoder=self.decoder,
            shuffle_buffer=self.shuffle_buffer,
            text_fn=self.text_fn,
        )
        return _TrainLoader(
            pipeline,
            per_rank,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=self._pin_memory(),
            worker_init_fn=WorkerInit(rank),
            # The workers' base seed (augmentations) comes from this generator, not the global one, so a run
            # resumed at step s draws the augmentations an uninterrupted run would, not epoch 0's again.
            generator=torch.Generator().manual_seed(wds.utils.make_seed(self.seed, step, rank)),
        )

    def val_dataloader(self) -> DataLoader | list:
        # Lightning 2.x skips validation when this returns an empty list (sum of max_batches == 0).
        if not self.val_urls:
            return []
        if self.val_view is None:
            raise ValueError("data.val_shards is set but no val_view was given")
        rank, world_size = self._rank_world()
        pipeline = eval_pipeline(
            self.val_urls,
            self.val_view,
            self.batch_size,
            rank=rank,
            world_size=world_size,
            decoder=self.decoder,
            text_fn=self.text_fn,
        )
        # No more workers than this rank has shards: the extra ones would only start up and idle.
        my_shards = len(self.val_urls[rank::world_size])
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=min(self.num_workers, my_shards),
            pin_memory=self._pin_memory(),
            worker_init_fn=WorkerInit(rank),
        )
