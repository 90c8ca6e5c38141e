"""The only place where a config becomes objects (DESIGN.md §1): plain name -> spec tables.

``objectives.py`` holds the objective table (one ``ObjectiveSpec`` per objective, ``spec.py``: builder, data
views, text handling, encoder, checkpoint fix-ups); ``loading.py`` rebuilds objectives and encoders from
checkpoints through it; ``encoders.py`` a config's backbone and the run config inside a checkpoint; this module
wires a run together (objective, data module, schedule, Lightning module, trainer, checkpointing) and is the one
entry point: ``from mmssl import factory``.
Shared code asks an objective's spec, never its name. Nothing in mmssl imports this package; tools do.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from torch import nn

from mmssl import config as C
from mmssl import launch, linear
from mmssl.callbacks import AtomicCheckpointIO, LastCheckpoint, RankReport, SaveParts
from mmssl.data.module import ShardDataModule, resolve_shards
from mmssl.data.shards import SampleDecoder, count_samples
from mmssl.data.transforms import CaptionTokens, eval_view
from mmssl.eval.knn import bank_too_small
from mmssl.eval.online import KNNMonitor, OnlineLinearProbe
from mmssl.factory.encoders import (  # re-exported: mmssl.factory is the one entry point for tools
    build_backbone,
    encoder_info,
    img_size,
)
from mmssl.factory.fsdp import block_classes, fsdp_kwargs, fsdp_strategy
from mmssl.factory.loading import (
    load_encoder,
    load_pretrained_backbone,
    objective_from_checkpoint,
    objective_from_config,
    read_run,
)
from mmssl.factory.objectives import OBJECTIVES, build_tokenizer, build_views, spec_of
from mmssl.factory.precision import device_of, resolve_precision
from mmssl.factory.spec import ObjectiveSpec
from mmssl.linear import use_fast_linear
from mmssl.lit import PretrainModule
from mmssl.loggers import make_loggers
from mmssl.throughput import ThroughputLogger
from mmssl.viz import PictureCallback

log = logging.getLogger(__name__)

__all__ = [
    "OBJECTIVES", "ObjectiveSpec", "Plan", "block_classes", "build_backbone", "build_datamodule", "build_module",
    "build_objective", "build_tokenizer", "build_trainer", "build_views", "checkpointing", "encoder_info",
    "eval_callbacks", "fsdp_kwargs", "fsdp_strategy", "img_size", "load_encoder", "objective_from_checkpoint",
    "objective_from_config", "plan", "read_run", "run_dir", "spec_of", "trainer_args",
]  # fmt: skip


# PretrainModule.load_from_checkpoint(path) rebuilds the objective from the checkpoint's run config through this
# factory: lit.py may not import build (DESIGN.md §3), so build hands it over when it is imported.
PretrainModule.objective_factory = staticmethod(objective_from_config)


def build_objective(cfg: DictConfig) -> nn.Module:
    objective = spec_of(cfg).build(cfg)
    # continued pretraining: the starting weights go in after the objective's own init (MAE re-inits everything)
    if cfg.backbone.weights:
        load_pretrained_backbone(objective, cfg)
    use_fast_linear(objective)  # every plain nn.Linear (decoders, heads, towers): oneDNN fp32 where it wins
    return objective


def build_datamodule(cfg: DictConfig) -> ShardDataModule:
    if not cfg.data.train_shards:
        raise C.ConfigError("config key 'data.train_shards': required (a shard pattern or demo:NAME/SPLIT)")
    C.validate_training(cfg)  # what only training needs (an iGPT palette file), before any model or process
    spec = spec_of(cfg)
    train_view, val_view = spec.views(cfg)
    tokens = spec.text == "tokens"  # token ids made in the workers; samples without a caption are skipped
    d = cfg.data
    return ShardDataModule(
        d.train_shards,
        d.val_shards or "",
        train_view=train_view,
        val_view=val_view,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        samples_per_epoch=d.samples_per_epoch,
        seed=cfg.seed,
        decoder=SampleDecoder(
            max_image_pixels=d.max_image_pixels,
            require_text=tokens,
            image_optional=spec.image_optional is not None and spec.image_optional(cfg),
        ),
        shuffle_buffer=d.shuffle_buffer,
        text_fn=CaptionTokens(spec.tokenizer(cfg)) if tokens else None,
        normalize_on_device=True,  # uint8 from the workers, one normalisation per batch on the device
    )


@dataclass(frozen=True)
class Plan:
    """Derived schedule numbers, computed where a reader sees them and printed at the start of a run."""

    world_size: int
    global_batch: int
    lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def describe(self) -> str:
        return (
            f"world size {self.world_size}, global batch {self.global_batch}, lr {self.lr:.3g}, "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps ({self.warmup_steps} warmup)"
        )


def plan(cfg: DictConfig, datamodule: ShardDataModule) -> Plan:
    world = C.world_size(cfg)
    per_epoch = datamodule.steps_per_epoch(world, cfg.trainer.accumulate_grad_batches)
    steps = cfg.trainer.max_steps  # None: whole epochs (config.validate refuses 0 and negatives)
    total = steps if steps is not None else cfg.trainer.max_epochs * per_epoch
    warmup = cfg.optim.warmup_steps
    if warmup is None:
        warmup = round(cfg.optim.warmup_epochs * per_epoch)
    return Plan(world, C.global_batch(cfg), C.learning_rate(cfg), per_epoch, total, min(warmup, total))


def build_module(
    cfg: DictConfig, p: Plan, objective: nn.Module | None = None, layer_decay: float | None = None
) -> PretrainModule:
    """The Lightning module training ``objective`` (the config's when None) on plan ``p``; ``layer_decay``: the
    layer-wise lr decay of fine-tuning (``optim.layer_decay_param_groups``)."""
    o = cfg.optim
    objective = objective if objective is not None else build_objective(cfg)
    if cfg.trainer.compile:
        # nn.Module.compile compiles the call in place: torch.compile(module) would wrap it and prefix every
        # state-dict key with "_orig_mod.", breaking checkpoints, export and evaluation
        objective.compile()
    return PretrainModule(
        objective,
        lr=p.lr,
        total_steps=p.total_steps,
        warmup_steps=p.warmup_steps,
        optimizer=o.name,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
        eps=o.eps,
        momentum=o.momentum,
        min_lr=o.min_lr,
        seed=cfg.seed,
        warmup_start_lr=o.warmup_start_lr,
        config=C.to_dict(cfg),
        layer_decay=layer_decay,
    )


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


def _strategy(cfg: DictConfig, objective: nn.Module | None):
    t = cfg.trainer
    if t.strategy == "fsdp":
        if objective is None:
            raise TypeError(
                "build_trainer: trainer.strategy=fsdp needs objective= (its blocks are the FSDP units)"
            )
        return fsdp_strategy(cfg, objective)
    timeout = timedelta(seconds=t.ddp_timeout_s)
    if t.strategy in ("ddp", "ddp_spawn", "ddp_fork") or (t.strategy == "auto" and C.world_size(cfg) > 1):
        start = {"ddp_spawn": "spawn", "ddp_fork": "fork"}.get(t.strategy, "popen")
        # broadcast_buffers=False: validation sees unequal batch counts per rank and must not synchronise
        return DDPStrategy(start_method=start, timeout=timeout, broadcast_buffers=False)
    return t.strategy


def eval_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Online evaluation during pretraining (``eval.*``): a linear head on detached features, periodic kNN."""
    e, d = cfg.eval, cfg.data
    callbacks: list[L.Callback] = []
    if e.online_probe:
        callbacks.append(OnlineLinearProbe(e.num_classes, lr=e.online_lr))
    if e.knn_every_n_epochs:
        bank = resolve_shards(e.knn_train_shards, "eval.knn_train_shards")
        note = bank_too_small(e.knn_k, count_samples(bank) or math.inf, "eval.knn_k")  # manifest count
        if note is not None:
            log.warning("%s (eval.knn_train_shards)", note)
        view = eval_view(img_size(cfg), interpolation=d.interpolation, mean=tuple(d.mean), std=tuple(d.std))
        callbacks.append(
            KNNMonitor(
                bank,
                resolve_shards(e.knn_val_shards, "eval.knn_val_shards"),
                view,
                every_n_epochs=e.knn_every_n_epochs,
                k=e.knn_k,
                temperature=e.knn_t,
                batch_size=d.batch_size,
                label_key=e.label_key,
            )
        )
    return callbacks


def build_trainer(cfg: DictConfig, p: Plan, objective: nn.Module | None = None) -> L.Trainer:
    """``objective`` (the one being trained) is needed by trainer.strategy=fsdp: its blocks become the units."""
    t, out = cfg.trainer, run_dir(cfg)
    strategy = _strategy(cfg, objective)
    # Pictures are drawn on rank 0 outside the training step, where FSDP holds only shards of the weights.
    pictures = [] if t.strategy == "fsdp" else [
        PictureCallback(out / "pictures", cfg.data.mean, cfg.data.std, every_n_steps=t.picture_every_n_steps)
    ]  # fmt: skip
    saving, plugins = checkpointing(t, out / "checkpoints")
    callbacks = [
        *saving,
        *pictures,
        RankReport(out),
        ThroughputLogger(),  # train/images_per_s, tokens_per_s, mfu
        *eval_callbacks(cfg),
    ]
    save_parts = spec_of(cfg).save_parts  # files other tools load without Lightning (LLaVA's parts)
    if save_parts is not None:
        callbacks.append(SaveParts(out / cfg.objective, save_parts))
    return L.Trainer(
        **trainer_args(cfg, p),
        strategy=strategy,
        limit_val_batches=None if cfg.data.val_shards else 0,
        enable_model_summary=False,  # tools/pretrain.py prints the parameter count in its opening line
        logger=make_loggers(t.loggers, out, cfg.name),  # logs/version_N: a resumed run keeps earlier metrics
        enable_progress_bar=t.progress_bar,
        callbacks=callbacks,
        plugins=plugins,
    )


def trainer_args(cfg: DictConfig, p: Plan) -> dict:
    """The ``L.Trainer`` arguments pretraining and fine-tuning share: devices, precision (``auto`` resolved and
    printed), the step budget of plan ``p``, accumulation, clipping and the logging and validation cadence (the
    ``trainer`` section), and the run directory. Shards split themselves (and image folders bring their own
    samplers): no distributed sampler."""
    t = cfg.trainer
    precision, why = resolve_precision(t.precision, t.accelerator)
    rank_zero_only(print)(f"mmssl: precision {precision} ({why})")
    if str(precision).startswith("32") and device_of(t.accelerator) == "cpu":
        rank_zero_only(print)(f"mmssl: {linear.describe()}")  # the library fp32 linear layers run on
    return dict(
        accelerator=t.accelerator,
        precision=precision,
        devices=t.devices,
        num_nodes=t.num_nodes,
        max_steps=p.total_steps,
        max_epochs=math.ceil(p.total_steps / p.steps_per_epoch),
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.val_every_n_epochs,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        sync_batchnorm=t.sync_batchnorm,
        default_root_dir=run_dir(cfg),
    )


def checkpointing(t: DictConfig, ckpt_dir: Path) -> tuple[list[L.Callback], list]:
    """(callbacks, trainer plugins) that save a run, shared by pretraining and fine-tuning (``t``: the trainer
    section): step checkpoints every ``ckpt_every_n_steps`` (the newest ``keep_checkpoints`` kept), ``last.ckpt``
    at the end and on SIGTERM/SIGINT, all written atomically (no truncated .ckpt under a final name that
    ``--resume`` would pick up) and, under srun, without Lightning's own SLURM requeue."""
    step = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.ckpt_every_n_steps,
        save_top_k=t.keep_checkpoints,
        monitor="step",
        mode="max",
        save_last=True,
        enable_version_counter=False,  # last.ckpt is always the newest state, never last-v1.ckpt
    )
    return [step, LastCheckpoint(ckpt_dir / "last.ckpt")], [*_cluster_plugins(), AtomicCheckpointIO()]


def _cluster_plugins() -> list:
    """Under srun, Lightning's SLURM auto-requeue (SIGUSR1: hpc_ckpt_N.ckpt + scontrol requeue, and a silent
    resume from that file) is switched off: mmssl has one scheme, SIGTERM -> last.ckpt -> exit 143 ->
    tools/slurm/pretrain.sbatch requeues -> --resume auto."""
    found = launch.detect()
    return [SLURMEnvironment(auto_requeue=False)] if found is not None and found.name == "SLURM" else []
