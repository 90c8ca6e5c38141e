"""The only place where a config becomes objects (DESIGN.md §1): plain name -> constructor tables.

Nothing in mmssl imports this module; tools do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmssl import config as C
from mmssl.backbones import Backbone, create_backbone
from mmssl.data.module import ShardDataModule
from mmssl.data.shards import SampleDecoder
from mmssl.data.transforms import eval_view, igpt_view, mae_view
from mmssl.heads import MAEDecoder, mae_init_
from mmssl.lit import LastCheckpoint, PretrainModule, RankReport
from mmssl.objectives.igpt import ImageGPT
from mmssl.objectives.masked import MaskedModeling
from mmssl.sequence import SequenceTransformer
from mmssl.targets.palette import Palette
from mmssl.targets.pixels import PixelTarget
from mmssl.viz import PictureCallback


def build_backbone(cfg: DictConfig) -> Backbone:
    b = cfg.backbone
    return create_backbone(
        b.name,
        img_size=b.img_size,
        patch_size=b.patch_size,
        embed_dim=b.embed_dim,
        depth=b.depth,
        num_heads=b.num_heads,
        drop_path_rate=b.drop_path_rate or None,
    )


def _mae(cfg: DictConfig) -> nn.Module:
    backbone = build_backbone(cfg)
    backbone.use_fixed_sincos_pos_embed()  # MAE §A.1
    target = PixelTarget(backbone.patch_size, normalize=cfg.mae.norm_pix_loss)
    decoder = MAEDecoder(
        backbone.embed_dim,
        backbone.grid_size,
        target.out_dim,
        num_prefix_tokens=backbone.num_prefix_tokens,
        embed_dim=cfg.mae.decoder_embed_dim,
        depth=cfg.mae.decoder_depth,
        num_heads=cfg.mae.decoder_num_heads,
    )
    objective = MaskedModeling(backbone, target, decoder, mask_ratio=cfg.mae.mask_ratio)
    mae_init_(objective)
    return objective


def _igpt(cfg: DictConfig) -> nn.Module:
    g = cfg.igpt
    # Without a palette file (print-config, or a checkpoint about to be loaded) the palette is a NaN
    # placeholder of the right size: load_state_dict fills it, and quantising before that raises.
    palette = Palette.load(C.find_file(g.palette)) if g.palette else Palette.unfitted(g.num_colors)
    if palette.num_colors != g.num_colors:
        raise C.ConfigError(
            f"config key 'igpt.num_colors': {g.num_colors}, but igpt.palette={g.palette!r} has "
            f"{palette.num_colors} colours"
        )
    transformer = SequenceTransformer(
        g.num_colors,
        g.resolution**2,
        embed_dim=g.embed_dim,
        depth=g.depth,
        num_heads=g.num_heads,
        mlp_ratio=g.mlp_ratio,
        causal=g.mode == "ar",
        norm=g.norm,
    )
    return ImageGPT(
        transformer,
        palette,
        mode=g.mode,
        mask_prob=g.mask_prob,
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
        feature_layer=g.feature_layer,
        temperature=g.temperature,
        top_k=g.top_k,
        num_completions=g.num_completions,
    )


OBJECTIVES: dict[str, Callable[[DictConfig], nn.Module]] = {
    "mae": _mae,
    "igpt": _igpt,
}


def _img_size(cfg: DictConfig) -> int:
    return cfg.data.img_size or cfg.backbone.img_size


def _mae_views(cfg: DictConfig):
    d = cfg.data
    train = mae_view(
        _img_size(cfg), tuple(d.crop_scale), d.interpolation, d.hflip, tuple(d.mean), tuple(d.std)
    )
    return train, eval_view(
        _img_size(cfg), interpolation=d.interpolation, mean=tuple(d.mean), std=tuple(d.std)
    )


def _igpt_views(cfg: DictConfig):
    d, g = cfg.data, cfg.igpt
    # Checked here rather than in config.validate: --print-config and checkpoint loading need no palette
    # file, but a training run does, and this runs before any model is built or process spawned.
    if not g.palette:
        raise C.ConfigError(
            "config key 'igpt.palette': required for training; fit one with tools/fit_palette.py "
            "(e.g. --shards <train shards> --k 512 --out palette.safetensors) and pass igpt.palette=<file>"
        )
    norm = {"interpolation": d.interpolation, "mean": tuple(d.mean), "std": tuple(d.std)}
    return igpt_view(g.resolution, tuple(g.resize_range), **norm), eval_view(g.resolution, crop_pct=1.0, **norm)


VIEWS: dict[str, Callable[[DictConfig], tuple]] = {
    "mae": _mae_views,
    "igpt": _igpt_views,
}


def build_objective(cfg: DictConfig) -> nn.Module:
    return OBJECTIVES[cfg.objective](cfg)


def objective_from_checkpoint(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """The objective of a pretraining checkpoint (config and weights from the file), in eval mode."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved = ckpt["hyper_parameters"]["config"]
    cfg = OmegaConf.merge(OmegaConf.structured(C.Config), saved, OmegaConf.from_dotlist(list(overrides)))
    if cfg.objective == "igpt":
        cfg.igpt.palette = None  # the palette is a buffer in the checkpoint; its file need not exist here
    C.validate(cfg)
    objective = build_objective(cfg)
    state = {k.removeprefix("objective."): v for k, v in ckpt["state_dict"].items()}
    objective.load_state_dict(state)
    return objective.eval()


def build_datamodule(cfg: DictConfig) -> ShardDataModule:
    if not cfg.data.train_shards:
        raise C.ConfigError("config key 'data.train_shards': required (a shard pattern or demo:NAME/SPLIT)")
    train_view, val_view = VIEWS[cfg.objective](cfg)
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
        decoder=SampleDecoder(max_image_pixels=d.max_image_pixels),
        shuffle_buffer=d.shuffle_buffer,
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
    total = cfg.trainer.max_steps or cfg.trainer.max_epochs * per_epoch
    warmup = cfg.optim.warmup_steps
    if warmup is None:
        warmup = round(cfg.optim.warmup_epochs * per_epoch)
    return Plan(world, C.global_batch(cfg), C.learning_rate(cfg), per_epoch, total, min(warmup, total))


def build_module(cfg: DictConfig, p: Plan, objective: nn.Module | None = None) -> PretrainModule:
    o = cfg.optim
    return PretrainModule(
        objective if objective is not None else build_objective(cfg),
        lr=p.lr,
        total_steps=p.total_steps,
        warmup_steps=p.warmup_steps,
        optimizer=o.name,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
        eps=o.eps,
        momentum=o.momentum,
        min_lr=o.min_lr,
        config=C.to_dict(cfg),
    )


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


def _strategy(cfg: DictConfig):
    t = cfg.trainer
    timeout = timedelta(seconds=t.ddp_timeout_s)
    if t.strategy in ("ddp", "ddp_spawn", "ddp_fork") or (t.strategy == "auto" and C.world_size(cfg) > 1):
        start = {"ddp_spawn": "spawn", "ddp_fork": "fork"}.get(t.strategy, "popen")
        # broadcast_buffers=False: validation sees unequal batch counts per rank and must not synchronise
        return DDPStrategy(start_method=start, timeout=timeout, broadcast_buffers=False)
    if t.strategy == "fsdp":
        return FSDPStrategy(timeout=timeout)
    return t.strategy


def build_trainer(cfg: DictConfig, p: Plan) -> L.Trainer:
    t, out = cfg.trainer, run_dir(cfg)
    ckpt_dir = out / "checkpoints"
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=t.ckpt_every_n_steps,
            save_top_k=t.keep_checkpoints,
            monitor="step",
            mode="max",
            save_last=True,
        ),
        LastCheckpoint(ckpt_dir / "last.ckpt"),
        PictureCallback(out / "pictures", cfg.data.mean, cfg.data.std, every_n_steps=t.picture_every_n_steps),
        RankReport(out),
    ]
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(cfg),
        precision=t.precision,
        max_steps=p.total_steps,
        max_epochs=math.ceil(p.total_steps / p.steps_per_epoch),
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.val_every_n_epochs,
        limit_val_batches=None if cfg.data.val_shards else 0,
        use_distributed_sampler=False,  # shards are split by the pipeline itself
        num_sanity_val_steps=0,
        sync_batchnorm=t.sync_batchnorm,
        logger=CSVLogger(out, name="logs"),  # logs/version_N: a resumed run keeps earlier metrics
        callbacks=callbacks,
        default_root_dir=out,
    )
