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
from mmssl.data.module import ShardDataModule, resolve_shards
from mmssl.data.shards import SampleDecoder
from mmssl.data.transforms import (
    CaptionTokens,
    clip_view,
    eval_view,
    igpt_view,
    llava_view,
    mae_view,
    simclr_view,
)
from mmssl.eval.online import KNNMonitor, OnlineLinearProbe
from mmssl.export import (
    BACKBONE_PREFIX,
    CheckpointError,
    load_exported,
    load_state_checked,
    read_checkpoint,
    strip_prefix,
)
from mmssl.heads import MAEDecoder, ProjectionHead, mae_init_
from mmssl.lit import LastCheckpoint, PretrainModule, RankReport, SaveParts
from mmssl.objectives.clip import (
    CLIP,
    clip_tokenizer,
    load_backbone_weights,
    open_clip_model,
    open_clip_text_tower,
)
from mmssl.objectives.igpt import ImageGPT
from mmssl.objectives.masked import MaskedModeling
from mmssl.objectives.simclr import SimCLR
from mmssl.sequence import SequenceTransformer
from mmssl.targets.hog import HOGTarget
from mmssl.targets.palette import Palette
from mmssl.targets.pixels import PixelTarget
from mmssl.viz import PictureCallback
from mmssl.vlm.decoders import load_decoder
from mmssl.vlm.llava import LLaVA
from mmssl.vlm.parts import MANIFEST, load_vision_tower
from mmssl.vlm.projector import Projector, load_projector
from mmssl.vlm.prompt import PromptEncoder
from mmssl.vlm.vision import VisionTower, create_encoder


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


def _timm_spec(cfg: DictConfig) -> dict:
    """A config's ``backbone`` section as a vision-tower spec (what saved LLaVA parts rebuild from)."""
    b = cfg.backbone
    sizes = {k: b[k] for k in ("patch_size", "embed_dim", "depth", "num_heads") if b[k] is not None}
    return {"source": "timm", "name": b.name, "kwargs": {"img_size": b.img_size, **sizes}}


def _llava_vision(cfg: DictConfig) -> VisionTower:
    """The frozen encoder named by ``llava.vision``, cut after ``llava.vision_layer``."""
    o = cfg.llava
    if o.vision == "backbone":
        spec = _timm_spec(cfg)
        encoder = create_encoder(spec)
    elif o.vision.startswith("open_clip:"):
        spec = {"source": "open_clip", "name": o.vision.removeprefix("open_clip:")}
        encoder = create_encoder(spec, o.vision_weights)
    elif o.vision.endswith(".ckpt"):  # an mmssl run's encoder (MAE, ...), via the shared checkpoint loader
        run_cfg, backbone, _ = load_backbone(o.vision)
        encoder, spec = backbone.model, _timm_spec(run_cfg)
    elif Path(o.vision, MANIFEST).is_file():
        vision = load_vision_tower(o.vision)
        if vision.layer != o.vision_layer:
            raise C.ConfigError(
                f"config key 'llava.vision_layer': {o.vision_layer}, but {o.vision} holds layer {vision.layer}"
            )
        return vision
    else:
        raise FileNotFoundError(
            f"llava.vision={o.vision!r}: not backbone, open_clip:MODEL, a .ckpt file or a folder with {MANIFEST}"
        )
    if o.vision == "backbone" or (o.vision.startswith("open_clip:") and not o.vision_weights):
        print(
            f"mmssl: llava.vision={o.vision}: a randomly initialised, frozen encoder (no pretrained weights)"
        )
    return VisionTower(encoder, spec, layer=o.vision_layer)


def _llava(cfg: DictConfig) -> nn.Module:
    o, d = cfg.llava, cfg.data
    vision = _llava_vision(cfg)
    decoder, tokenizer = load_decoder(o.decoder)
    width = decoder.get_input_embeddings().embedding_dim
    if o.projector_weights:  # stage 2 starts from stage 1's projector
        projector = load_projector(o.projector_weights, vision.dim, width)
        if projector.kind != o.projector:
            raise C.ConfigError(
                f"config key 'llava.projector': {o.projector!r}, but llava.projector_weights holds a "
                f"{projector.kind!r} projector"
            )
    else:
        projector = Projector(o.projector, vision.dim, width)
    system = {} if o.system is None else {"system": o.system}
    prompt = PromptEncoder(tokenizer, vision.num_tokens, o.conversation, max_length=o.max_length, **system)
    image = {
        "img_size": _img_size(cfg),
        "interpolation": d.interpolation,
        "mean": list(d.mean),
        "std": list(d.std),
    }
    return LLaVA(vision, projector, decoder, prompt, train_decoder=o.train_decoder, image_processing=image)


def _clip(cfg: DictConfig) -> nn.Module:
    c = cfg.clip
    text_cfg, vision_cfg = OmegaConf.to_container(c.text_cfg), OmegaConf.to_container(c.vision_cfg)
    scale = 1 / c.init_temperature
    if c.image_tower == "open_clip" or c.pretrained:
        model = open_clip_model(
            c.model,
            pretrained=c.pretrained,
            image_size=_img_size(cfg),
            embed_dim=c.embed_dim,
            text_cfg=text_cfg,
            vision_cfg=vision_cfg,
        )
        image_tower, text_tower = model.visual, model.text
        if c.pretrained:  # a loaded checkpoint brings its learned temperature
            scale = model.logit_scale.exp().item()
    else:  # no open_clip image tower needed at all
        text_tower = open_clip_text_tower(c.model, embed_dim=c.embed_dim, text_cfg=text_cfg)
    if c.image_tower == "backbone":
        backbone = build_backbone(cfg)
        if c.backbone_weights:
            load_backbone_weights(backbone, c.backbone_weights)
        image_tower = backbone  # + a linear projection into the text tower's joint space, in CLIP
    return CLIP(image_tower, text_tower, logit_scale=scale, max_logit_scale=c.max_logit_scale)


def _maskfeat(cfg: DictConfig) -> nn.Module:
    m = cfg.maskfeat
    backbone = build_backbone(cfg)  # learned position embedding, timm's trunc-normal init (as SlowFast's ViT)
    target = HOGTarget(
        backbone.patch_size,
        cell_size=m.cell_size,
        nbins=m.nbins,
        gradient=m.gradient,
        gaussian_window=m.gaussian_window,
    )
    return MaskedModeling(  # the default linear head on every patch token
        backbone,
        target,
        mask="block",
        mask_ratio=m.mask_ratio,
        min_block=m.min_block,
        min_aspect=m.min_aspect,
    )


def _simclr(cfg: DictConfig) -> nn.Module:
    s, backbone = cfg.simclr, build_backbone(cfg)
    head = ProjectionHead(
        backbone.embed_dim,
        s.proj_hidden_dim or backbone.embed_dim,  # SimCLR §2.1: the hidden layer as wide as h
        s.proj_out_dim,
        num_layers=s.proj_num_layers,
    )
    return SimCLR(
        backbone,
        head,
        temperature=s.temperature,
        gather_distributed=s.gather_distributed,
        channels_last=s.channels_last,
    )


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
    "llava": _llava,
    "clip": _clip,
    "maskfeat": _maskfeat,
    "simclr": _simclr,
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


def _llava_views(cfg: DictConfig):
    d = cfg.data
    view = llava_view(_img_size(cfg), d.interpolation, tuple(d.mean), tuple(d.std))
    return view, view


def _clip_views(cfg: DictConfig):
    d = cfg.data
    train = clip_view(_img_size(cfg), tuple(d.crop_scale), d.interpolation, tuple(d.mean), tuple(d.std))
    # open_clip's eval transform: resize the shorter side to the input size, centre crop (crop_pct 1)
    val = eval_view(_img_size(cfg), 1.0, d.interpolation, tuple(d.mean), tuple(d.std))
    return train, val


def _simclr_views(cfg: DictConfig):
    # Validation draws the same two random views of held-out images, so val/loss is the same quantity.
    d, s = cfg.data, cfg.simclr
    view = simclr_view(
        _img_size(cfg), tuple(d.crop_scale), d.interpolation, d.hflip, color_jitter=s.color_jitter,
        blur_p=s.blur_p, mean=tuple(d.mean), std=tuple(d.std),
    )  # fmt: skip
    return view, view


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
    return igpt_view(g.resolution, tuple(g.resize_range), **norm), eval_view(
        g.resolution, crop_pct=1.0, **norm
    )


VIEWS: dict[str, Callable[[DictConfig], tuple]] = {
    "mae": _mae_views,
    "maskfeat": _mae_views,  # RandomResizedCrop(data.crop_scale: 0.5-1 for MaskFeat) + flip, as MAE's
    "simclr": _simclr_views,
    "clip": _clip_views,
    "llava": _llava_views,
    "igpt": _igpt_views,
}


def build_tokenizer(cfg: DictConfig):
    """open_clip's tokenizer at the text tower's context length (``clip.text_cfg.context_length`` or the model's)."""
    return clip_tokenizer(cfg.clip.model, cfg.clip.text_cfg.get("context_length"))


# Objectives that read captions: name -> caption-to-tokens function run in the data workers.
TEXT: dict[str, Callable[[DictConfig], Callable]] = {
    "clip": lambda cfg: CaptionTokens(build_tokenizer(cfg)),
}


def build_objective(cfg: DictConfig) -> nn.Module:
    return OBJECTIVES[cfg.objective](cfg)


def objective_from_checkpoint(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), random_init: bool = False, seed: int = 0
) -> nn.Module:
    """The objective of a pretraining checkpoint (config and weights from the file), in eval mode.
    ``random_init``: the same architecture at its own (seeded) initialisation, keeping only the checkpoint's
    buffers that are data rather than learned weights (an iGPT palette): the baseline of a probe."""
    ckpt = read_checkpoint(path)
    values = OmegaConf.merge(ckpt["hyper_parameters"]["config"], OmegaConf.from_dotlist(list(overrides)))
    if values.get("objective") == "igpt":
        values.igpt.palette = None  # the palette is a buffer in the checkpoint; its file need not exist here
    try:
        cfg = C.from_dict(OmegaConf.to_container(values), source=f"config in {path}")
    except C.ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its run config does not load here: {e}") from None
    torch.manual_seed(seed)
    objective = build_objective(cfg)
    state = {k.removeprefix("objective."): v for k, v in ckpt["state_dict"].items()}
    if random_init:
        state = {**objective.state_dict(), **{k: v for k, v in state.items() if k.startswith("palette.")}}
    load_state_checked(
        objective, state, f"checkpoint {path}", f"the {cfg.objective!r} objective of its config"
    )
    return objective.eval()


def encoder_of(objective: nn.Module, source: str = "objective") -> Backbone:
    """The objective's encoder (contract: ``objective.backbone``, see objectives/base.py)."""
    backbone = getattr(objective, "backbone", None)
    if backbone is None:
        raise TypeError(f"{source}: {type(objective).__name__} exposes no encoder as .backbone")
    return backbone


def _checkpoint_config(path: str | Path, ckpt: dict) -> DictConfig:
    try:
        return C.from_dict(ckpt["hyper_parameters"]["config"], source=f"config in {path}")
    except C.ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its run config does not load here: {e}") from None


def load_backbone(path: str | Path) -> tuple[DictConfig, Backbone, dict]:
    """Lightning checkpoint -> (run config, its encoder with weights, raw checkpoint), for any objective that
    keeps its encoder at ``.backbone`` (state dict keys ``objective.backbone.model.*``); nothing else is built."""
    ckpt = read_checkpoint(path)
    cfg = _checkpoint_config(path, ckpt)
    state = strip_prefix(ckpt["state_dict"], BACKBONE_PREFIX)
    if not state:
        raise CheckpointError(
            f"checkpoint {path}: no encoder weights under '{BACKBONE_PREFIX}*' (the {cfg.objective!r} objective "
            "must expose its encoder as .backbone, see objectives/base.py)"
        )
    backbone = build_backbone(cfg)
    what = f"backbone {cfg.backbone.name!r} of its config"
    load_state_checked(backbone.model, state, f"checkpoint {path}", what)
    return cfg, backbone.eval(), ckpt


def encoder_info(cfg: DictConfig) -> dict:
    """What an evaluation or export needs to know about a run's images."""
    d = cfg.data
    return {
        "architecture": cfg.backbone.name,
        "img_size": _img_size(cfg),
        "mean": list(d.mean),
        "std": list(d.std),
        "interpolation": d.interpolation,
        "crop_pct": 0.875,
        "objective": cfg.objective,
    }


def load_encoder(path: str | Path, random_init: bool = False, seed: int = 0) -> tuple[Backbone, dict]:
    """Any trained encoder -> (backbone in eval mode, info): a Lightning ``.ckpt``, an exported
    ``.safetensors`` (with its ``.json``), or a Hugging Face-style folder. ``random_init`` keeps a Lightning
    checkpoint's architecture and the objective's own initialisation (seeded) but not its weights."""
    path = Path(path)
    if path.suffix == ".ckpt":
        if random_init:
            cfg = _checkpoint_config(path, read_checkpoint(path))
            torch.manual_seed(seed)
            return encoder_of(build_objective(cfg), str(path)).eval(), encoder_info(cfg)
        cfg, backbone, _ = load_backbone(path)
        return backbone, encoder_info(cfg)
    if random_init:
        raise CheckpointError(
            f"{path}: random_init needs a Lightning checkpoint (.ckpt), which holds the config"
        )
    return load_exported(path)


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
        decoder=SampleDecoder(max_image_pixels=d.max_image_pixels, require_text=cfg.objective in TEXT),
        shuffle_buffer=d.shuffle_buffer,
        text_fn=TEXT[cfg.objective](cfg) if cfg.objective in TEXT else None,
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


def eval_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Online evaluation during pretraining (``eval.*``): a linear head on detached features, periodic kNN."""
    e, d = cfg.eval, cfg.data
    callbacks: list[L.Callback] = []
    if e.online_probe:
        callbacks.append(OnlineLinearProbe(e.num_classes, lr=e.online_lr))
    if e.knn_every_n_epochs:
        view = eval_view(_img_size(cfg), interpolation=d.interpolation, mean=tuple(d.mean), std=tuple(d.std))
        callbacks.append(
            KNNMonitor(
                resolve_shards(e.knn_train_shards, "eval.knn_train_shards"),
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
            enable_version_counter=False,  # last.ckpt is always the newest state, never last-v1.ckpt
        ),
        LastCheckpoint(ckpt_dir / "last.ckpt"),
        PictureCallback(out / "pictures", cfg.data.mean, cfg.data.std, every_n_steps=t.picture_every_n_steps),
        RankReport(out),
        SaveParts(out / cfg.objective),  # objectives with a save_parts hook (llava) write loadable parts
        *eval_callbacks(cfg),
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
