"""A fine-tuning config (``mmssl.config.finetune``) -> encoder, classifier, data, Lightning module and trainer.

The classifier trains inside the same generic Lightning module as pretraining (``lit.PretrainModule``: the
schedule, precision, DDP, resume, NaN stop and logging are shared); only the callbacks differ: the best
held-out top-1 is kept as ``checkpoints/best.ckpt`` besides the step checkpoints and ``last.ckpt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from mmssl import config as C
from mmssl.backbones import CNNBackbone, ViTBackbone
from mmssl.callbacks import RankReport
from mmssl.checkpoints import CheckpointError
from mmssl.config import finetune as F
from mmssl.data.folder import FolderDataModule
from mmssl.data.module import ShardDataModule, resolve_shards
from mmssl.data.shards import SampleDecoder
from mmssl.eval.finetune import (
    Classifier,
    check_architecture,
    check_shard_labels,
    classifier_from_encoder,
    finetune_views,
    make_mixup,
)
from mmssl.factory import Plan, _strategy, checkpointing, run_dir, trainer_args
from mmssl.factory import build_module as pretraining_module
from mmssl.factory.loading import load_encoder
from mmssl.lit import PretrainModule
from mmssl.throughput import ThroughputLogger

VAL_LABELS_CHECKED = 100_000  # held-out labels read before training (all of an ImageNet-size val split)
TRAIN_LABELS_CHECKED = 2_000  # training labels read before training (a sample: the set may be huge)


def load_encoder_for(cfg: DictConfig):
    """(timm backbone, info) of ``cfg.encoder``; refuses encoders that are not timm models and, with ``arch``
    set, an encoder of another architecture."""
    backbone, info = load_encoder(cfg.encoder, random_init=cfg.random_init, seed=cfg.seed)
    if not isinstance(backbone, (ViTBackbone, CNNBackbone)):
        raise CheckpointError(
            f"config key 'encoder': {cfg.encoder} holds a {type(backbone).__name__}, not a timm model; "
            "fine-tuning rebuilds the encoder as a timm classifier (ViTs and CNNs)"
        )
    if cfg.arch is not None:
        check_architecture(backbone.model, cfg.arch, f"config key 'encoder': {cfg.encoder}")
    return backbone, info


def resolve_image_settings(cfg: DictConfig, info: dict) -> None:
    """Fill the data keys left null with the encoder's own (image size, normalisation), in place, so the run's
    saved config says what was used."""
    d = cfg.data
    d.img_size = d.img_size or info["img_size"]
    d.interpolation = d.interpolation or info.get("interpolation", "bicubic")
    d.mean = list(d.mean if d.mean is not None else info["mean"])
    d.std = list(d.std if d.std is not None else info["std"])


def _is_folder(spec: str) -> bool:
    return os.path.isdir(spec) and not any(Path(spec).glob("*.tar"))


def build_datamodule(cfg: DictConfig) -> ShardDataModule | FolderDataModule:
    """Labelled shards (labels checked from the tar headers first) or class folders; views as MAE's."""
    d, a = cfg.data, cfg.augment
    train_view, val_view = finetune_views(
        d.img_size, mean=d.mean, std=d.std, interpolation=d.interpolation, crop_pct=d.crop_pct,
        crop_scale=a.crop_scale, hflip=a.hflip, auto_augment=a.auto_augment, color_jitter=a.color_jitter,
        re_prob=a.re_prob, re_mode=a.re_mode, re_count=a.re_count,
    )  # fmt: skip
    folders = [_is_folder(d.train_shards), _is_folder(d.val_shards)]
    if any(folders):
        if not all(folders):
            raise C.ConfigError(
                "config keys 'data.train_shards', 'data.val_shards': both shards or both folders"
            )
        dm = FolderDataModule(
            d.train_shards, d.val_shards, train_view=train_view, val_view=val_view, batch_size=d.batch_size,
            num_workers=d.num_workers, seed=cfg.seed,
        )  # fmt: skip
        if len(dm.classes) != cfg.num_classes:
            raise ValueError(
                f"data.train_shards={d.train_shards!r} has {len(dm.classes)} class folders, but num_classes="
                f"{cfg.num_classes}"
            )
        return dm
    val_urls = resolve_shards(d.val_shards, "data.val_shards")
    val = check_shard_labels(val_urls, d.label_key, cfg.num_classes, "data.val_shards", VAL_LABELS_CHECKED)
    if sum(val.values()) < VAL_LABELS_CHECKED and max(val, default=-1) + 1 != cfg.num_classes:
        raise ValueError(
            f"data.val_shards: the held-out labels are 0..{max(val, default=-1)} ({len(val)} classes), but the head "
            f"has num_classes={cfg.num_classes}: set num_classes to the data's number of classes"
        )
    train_urls = resolve_shards(d.train_shards, "data.train_shards")
    check_shard_labels(train_urls, d.label_key, cfg.num_classes, "data.train_shards", TRAIN_LABELS_CHECKED)
    return ShardDataModule(
        d.train_shards, d.val_shards, train_view=train_view, val_view=val_view, batch_size=d.batch_size,
        num_workers=d.num_workers, samples_per_epoch=d.samples_per_epoch, seed=cfg.seed,
        decoder=SampleDecoder(label_key=d.label_key, require_label=True, max_image_pixels=d.max_image_pixels),
        shuffle_buffer=d.shuffle_buffer,
    )  # fmt: skip


def build_classifier(cfg: DictConfig, backbone) -> tuple[Classifier, dict]:
    m, a = cfg.model, cfg.augment
    model, report = classifier_from_encoder(
        backbone, cfg.num_classes, global_pool=m.global_pool, drop_path_rate=m.drop_path_rate,
        head_init_std=m.head_init_std, seed=cfg.seed,
    )  # fmt: skip
    mixup = make_mixup(
        cfg.num_classes, a.mixup, a.cutmix, a.cutmix_minmax, a.mixup_prob, a.mixup_switch_prob, a.mixup_mode,
        a.smoothing,
    )  # fmt: skip
    return Classifier(model, mixup, smoothing=a.smoothing), report


def build_module(cfg: DictConfig, p: Plan, classifier: Classifier) -> PretrainModule:
    """Pretraining's Lightning module (optimizer, schedule, compile) around ``classifier``, with layer decay."""
    return pretraining_module(cfg, p, classifier, layer_decay=cfg.optim.layer_decay)


def build_trainer(cfg: DictConfig, p: Plan) -> L.Trainer:
    t, out = cfg.trainer, run_dir(cfg)
    ckpt_dir = out / "checkpoints"
    saving, plugins = checkpointing(t, ckpt_dir)  # step checkpoints and last.ckpt as pretraining's
    callbacks = [
        ModelCheckpoint(  # first: trainer.checkpoint_callback, "best" of trainer.validate(ckpt_path="best")
            dirpath=ckpt_dir,
            filename="best",
            monitor="val/top1",
            mode="max",
            save_top_k=1,
            save_weights_only=True,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),  # fmt: skip
        *saving,
        RankReport(out),
        ThroughputLogger(),
    ]
    return L.Trainer(
        **trainer_args(cfg, p),
        strategy=_strategy(cfg, None),  # fsdp is refused by the config (mmssl.config.finetune)
        logger=CSVLogger(out, name="logs"),
        callbacks=callbacks,
        plugins=plugins,
    )


__all__ = ["F", "build_classifier", "build_datamodule", "build_module", "build_trainer", "load_encoder_for",
           "resolve_image_settings"]  # fmt: skip
