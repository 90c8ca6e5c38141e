"""Typed configuration: dataclass defaults, YAML deltas, dotted command-line overrides (DESIGN.md §4).

``load("mae_vitb", ["optim.base_lr=3e-4"])`` returns a validated OmegaConf ``DictConfig``. Unknown keys and
wrong types fail here, before any model or data work, with the full key path in the message. Key names equal
the constructor argument names they feed (see ``mmssl/build/``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")


class ConfigError(ValueError):
    """A config value that cannot be used; the message starts with the key path."""


def objective_section(cls: type) -> Any:
    """A per-objective section: validated always, used and printed only when ``objective`` names it."""
    return field(default_factory=cls, metadata={"objective": True})


@dataclass
class BackboneConfig:
    name: str = "vit_base_patch16_224"  # any timm ViT or CNN (resnet*, convnext*, ...)
    img_size: int = 224
    # ViT size overrides; None keeps the named model's value
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.0


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75  # MAE §4: 75% of patches removed
    norm_pix_loss: bool = True  # MAE §3: per-patch normalised pixel targets
    decoder_embed_dim: int = 512  # MAE §3 / Table 1: 512-d, 8 blocks for ViT-B/L/H
    decoder_depth: int = 8
    decoder_num_heads: int = 16


@dataclass
class LlavaConfig:
    decoder: str | None = None  # required: a local transformers causal-LM folder with its tokenizer
    # backbone (that section, random init) | PATH.ckpt (an mmssl run) | open_clip:MODEL | a LLaVA parts folder
    # (<run dir>/llava: the exact frozen encoder of an earlier stage)
    vision: str = "backbone"
    vision_weights: str | None = None  # open_clip only: a local weights file (nothing is downloaded)
    vision_layer: int = -2  # LLaVA-1.5 mm_vision_select_layer: the penultimate layer's patch tokens
    projector: str = "mlp2x_gelu"  # LLaVA-1.5 §3.1 (two-layer MLP); "linear" is LLaVA's (v1)
    projector_weights: str | None = None  # stage 2: stage 1's <run dir>/llava/projector.safetensors
    train_decoder: bool = False  # stage 1 (feature alignment): projector only; stage 2: projector + decoder
    conversation: str = "plain"  # plain: <image> caption (stage 1, .txt) | chat: Vicuna v1 turns (.json)
    system: str | None = None  # chat system prompt; None: Vicuna v1's ("A chat between a curious human ...")
    max_length: int = 2048  # LLaVA-1.5 model_max_length


@dataclass
class CLIPConfig:
    """CLIP (Radford et al. 2021) on open_clip towers (objectives/clip.py). Weights only from local files."""

    model: str = "ViT-B-32"  # open_clip architecture: text tower (+ image tower if image_tower=open_clip)
    image_tower: str = "open_clip"  # open_clip: the model's own | backbone: backbone.* + linear projection
    pretrained: str | None = None  # local open_clip checkpoint of the whole model (a hub tag is refused)
    backbone_weights: str | None = None  # local timm state dict (.safetensors/.pt) for image_tower=backbone
    embed_dim: int | None = None  # joint embedding width; None: the open_clip model's (512 for ViT-B-32)
    text_cfg: dict[str, Any] = field(default_factory=dict)  # overrides of open_clip's CLIPTextCfg
    vision_cfg: dict[str, Any] = field(default_factory=dict)  # overrides of open_clip's CLIPVisionCfg
    init_temperature: float = 0.07  # CLIP §2.5: tau initialised to 0.07 (Wu et al. 2018), logit scale 1/tau
    max_logit_scale: float = 100.0  # CLIP §2.5: "clipped to prevent scaling the logits by more than 100"


@dataclass
class MaskFeatConfig:
    mask_ratio: float = 0.4  # MaskFeat §4.1 / SlowFast in1k_VIT_B_MaskFeat_PT.yaml: 40% of patches, in blocks
    min_block: int | None = None  # patches per block at least; None: a fifth of the masked count (SlowFast)
    min_aspect: float = 0.3  # BEiT masking_generator.py: block aspect ratio in [0.3, 1/0.3]
    cell_size: int = 8  # HOG: 8x8-pixel cells (SlowFast masked.py), 2x2 cells per 16-px patch
    nbins: int = 9  # 9 unsigned orientation bins
    gradient: str = "sobel"  # sobel (SlowFast HOGLayerC) | central ([-1, 0, 1], skimage / Dalal-Triggs)
    gaussian_window: int = 0  # 0: none (SlowFast); 16: MMPretrain's HOGGenerator (std 8, tiled)


@dataclass
class SimCLRConfig:
    temperature: float = 0.1  # SimCLR Table 5: tau = 0.1 is best (4096 negatives)
    proj_hidden_dim: int | None = None  # None: the backbone width (ResNet-50: 2048 -> 2048 -> 128, §2.1)
    proj_out_dim: int = 128  # §4.2 / Fig. 8: the output size barely matters; 128
    proj_num_layers: int = 2  # v1: one hidden layer; SimCLR v2 and MoCo v3 use 3
    gather_distributed: bool = True  # negatives from every rank's batch, with gradient (the paper's setup)
    channels_last: bool = True  # NHWC memory format for CNN backbones (ignored for ViTs)
    color_jitter: float = 1.0  # strength s (Appendix A: 1.0 on ImageNet, 0.5 on CIFAR-10)
    blur_p: float = 0.5  # Appendix A: Gaussian blur with p=0.5 on ImageNet, none on CIFAR-10
    # crop area and flip come from data.crop_scale (SimCLR: [0.08, 1.0]), data.interpolation and data.hflip


@dataclass
class IGPTConfig:
    """iGPT (Chen et al. 2020); defaults are iGPT-S at 32x32 with the 9-bit palette (configs/igpt_s32.yaml)."""

    mode: str = "ar"  # ar: next-pixel prediction | bert: masked-pixel prediction (§"Pre-training")
    palette: str | None = None  # safetensors file from tools/fit_palette.py (path, or relative to the repo)
    num_colors: int = 512  # §"Context Reduction": 9-bit palette, k-means with k = 512
    resolution: int = 32  # images downsampled to resolution x resolution; context = resolution^2 = 1024
    resize_range: list[float] = field(
        default_factory=lambda: [256 / 224, 384 / 224]
    )  # shorter side [256, 384]
    embed_dim: int = 512  # iGPT-S: d = 512, L = 24, 8 heads, 76M parameters
    depth: int = 24
    num_heads: int = 8
    mlp_ratio: float = 4.0
    norm: str = "rmsnorm"  # the reference's norm (no centring, no bias) | layernorm (GPT-2's)
    mask_prob: float = 0.15  # BERT: 15% of tokens masked (run.py --bert_mask_prob)
    feature_layer: int | None = None  # probe features from this block's output; None: depth // 2
    temperature: float = 1.0  # completions in pictures: sampling temperature (0 = argmax) and top-k
    top_k: int | None = None
    num_completions: int = 2


@dataclass
class OptimConfig:
    name: str = "adamw"  # any timm.optim.create_optimizer_v2 name (adamw, sgd, lars, lamb, ...)
    base_lr: float = 1.5e-4  # MAE Table 8: lr = base_lr x global_batch / 256
    lr: float | None = None  # absolute lr; when set, base_lr and lr_scaling are ignored
    lr_scaling: str = "linear"  # linear: x global_batch/256 | sqrt: x sqrt(global_batch) | none
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # MAE Table 8
    eps: float = 1e-8
    momentum: float = 0.9  # sgd / lars only
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    min_lr: float = 0.0


@dataclass
class DataConfig:
    train_shards: str | None = None  # webdataset spec: brace/glob patterns, "::"-joined, or demo:NAME/SPLIT
    val_shards: str | None = None  # held-out images for the validation loss and pictures
    samples_per_epoch: int | None = None  # None: read from the shards' manifest.json
    batch_size: int = 64  # per device
    num_workers: int = 8
    img_size: int | None = None  # None: backbone.img_size
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # MAE: RandomResizedCrop(0.2, 1)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    shuffle_buffer: int = 2000
    max_image_pixels: int = 89_478_485  # PIL's own decompression-bomb limit


@dataclass
class TrainerConfig:
    max_epochs: int = 800
    max_steps: int | None = None  # None: max_epochs x steps per epoch
    accelerator: str = "auto"
    devices: Any = "auto"  # int or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp
    precision: str = "bf16-mixed"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 50
    ckpt_every_n_steps: int = 1000
    keep_checkpoints: int = 3  # step checkpoints kept besides last.ckpt
    picture_every_n_steps: int = 1000
    val_every_n_epochs: int = 1
    ddp_timeout_s: int = 1800
    sync_batchnorm: bool = False


@dataclass
class EvalConfig:
    """Evaluation during pretraining (``eval/online.py``); both monitors are off by default."""

    online_probe: bool = False  # linear head on detached features of every training batch (needs labels)
    num_classes: int | None = None  # required by online_probe
    online_lr: float = 1e-3  # AdamW on BatchNorm(affine=False) + Linear, like the offline MAE head
    knn_every_n_epochs: int = 0  # 0: off; else weighted kNN top-1 on a small labelled split
    knn_train_shards: str | None = None  # the memory bank, e.g. demo:digits/train
    knn_val_shards: str | None = None  # the queries, e.g. demo:digits/val
    knn_k: int = 20  # DINO's kNN: k=20, T=0.07
    knn_t: float = 0.07
    label_key: str = "cls"  # tar member holding the class index


@dataclass
class Config:
    name: str = "run"  # run directory: out_dir/name
    out_dir: str = "runs"
    seed: int = 0
    objective: str = "mae"  # the name of one objective section below
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mae: MAEConfig = objective_section(MAEConfig)
    llava: LlavaConfig = objective_section(LlavaConfig)
    clip: CLIPConfig = objective_section(CLIPConfig)
    maskfeat: MaskFeatConfig = objective_section(MaskFeatConfig)
    simclr: SimCLRConfig = objective_section(SimCLRConfig)
    igpt: IGPTConfig = objective_section(IGPTConfig)


@dataclass
class ProbeDataConfig:
    train_shards: str | None = None  # labelled: shards with .cls, a folder of class folders, demo:X
    val_shards: str | None = None
    label_key: str = "cls"
    img_size: int | None = None  # None: the encoder's own (from the checkpoint)
    crop_pct: float = 0.875  # eval view: resize to img_size / crop_pct, centre crop (MAE: 256 -> 224)
    batch_size: int = 256  # images per forward pass while extracting features
    num_workers: int = 4
    augment_copies: int = 0  # 0: train features of the eval view; K: K augmented passes, epoch e uses e mod K
    cache_dir: str | None = None  # features cached here (safetensors) and reused when nothing changed


@dataclass
class LinearProbeConfig:
    """A linear-probe protocol (``tools/linear_probe.py``); ``configs/linprobe_*.yaml`` hold published ones."""

    name: str = "mae"
    pool: str = "default"  # default (the model's own) | cls | avg
    layers: list[int] = field(default_factory=lambda: [-1])  # blocks (ViT) / stages (CNN); -1 = last
    optimizer: str = "lars"  # lars | sgd
    nesterov: bool = False
    momentum: float = 0.9
    base_lrs: list[float] = field(default_factory=lambda: [0.1])  # the grid; lr = base_lr x batch / 256
    lr_scaling: str = "linear"  # linear | none
    weight_decay: float = 0.0
    batch_size: int = 16384
    epochs: int = 90
    warmup_epochs: float = 10.0
    batchnorm: bool = True  # BatchNorm1d(affine=False, eps=1e-6) before the linear layer (MAE)
    head_init: str = "trunc_normal"  # trunc_normal (std 0.01, MoCo v3 / MAE) | zeros (SimCLR)
    seed: int = 0
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)


def objective_names() -> list[str]:
    return [f.name for f in fields(Config) if f.metadata.get("objective")]


def find_file(path: str) -> Path | None:
    """A data file named in a config (e.g. ``igpt.palette``): as given, else relative to the repository."""
    for candidate in (Path(path), CONFIG_DIR.parent / path):
        if candidate.is_file():
            return candidate
    return None


def resolve_path(name: str) -> Path:
    """``--cfg`` value -> file: an existing path, else ``configs/NAME`` (``.yaml`` optional)."""
    candidates = [
        Path(name),
        CONFIG_DIR / name,
        CONFIG_DIR / f"{name}.yaml",
        Path("configs") / f"{name}.yaml",
    ]
    for path in candidates:
        if path.is_file():
            return path
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(
        f"--cfg {name!r}: no such file, and not in {CONFIG_DIR} (known: {', '.join(known)})"
    )


def load(
    cfg: str | None = None, overrides: list[str] | tuple[str, ...] = (), schema: type = Config
) -> DictConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, then :func:`validate` (or :func:`validate_probe`)."""
    merged = OmegaConf.structured(schema)
    if cfg:
        path = resolve_path(cfg)
        merged = _merge(merged, OmegaConf.load(path), f"config file {path}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.base_lr=3e-4")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override {item!r}")
    if schema is Config:
        validate(merged)
    elif schema is LinearProbeConfig:
        validate_probe(merged)
    return merged


def from_dict(values: dict, source: str = "checkpoint config") -> DictConfig:
    """A plain dict (``ckpt["hyper_parameters"]["config"]``) -> validated config; missing keys get defaults."""
    merged = _merge(OmegaConf.structured(Config), OmegaConf.create(values), source)
    validate(merged)
    return merged


def _merge(base: DictConfig, delta: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, delta)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(e).splitlines()[0]
        raise ConfigError(f"config key '{key}' ({source}): {reason}") from None


def validate(cfg: DictConfig) -> None:
    """Value checks that types alone cannot express; each error names its key."""

    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {msg} (got {OmegaConf.select(cfg, key)!r})")

    check(cfg.objective in objective_names(), "objective", f"must be one of {objective_names()}")
    check(0.0 <= cfg.mae.mask_ratio < 1.0, "mae.mask_ratio", "must be in [0, 1)")
    llava = cfg.llava
    check(cfg.objective != "llava" or bool(llava.decoder), "llava.decoder", "required: a local model folder")
    check(llava.conversation in ("plain", "chat"), "llava.conversation", "must be plain or chat")
    check(
        llava.projector == "linear" or re.fullmatch(r"mlp[1-9]\d*x_gelu", llava.projector) is not None,
        "llava.projector",
        "must be linear or mlpNx_gelu (e.g. mlp2x_gelu)",
    )
    check(
        bool(llava.vision), "llava.vision", "must be backbone, PATH.ckpt, open_clip:MODEL or a parts folder"
    )
    check(llava.max_length > 0, "llava.max_length", "must be > 0")
    mf = cfg.maskfeat
    check(0.0 < mf.mask_ratio < 1.0, "maskfeat.mask_ratio", "must be in (0, 1)")
    check(mf.min_block is None or mf.min_block >= 1, "maskfeat.min_block", "must be >= 1 or null")
    check(0.0 < mf.min_aspect <= 1.0, "maskfeat.min_aspect", "must be in (0, 1]")
    check(mf.cell_size >= 1 and mf.nbins >= 1, "maskfeat.cell_size", "cell_size and nbins must be >= 1")
    check(mf.gradient in ("sobel", "central"), "maskfeat.gradient", "must be sobel or central")
    check(mf.gaussian_window >= 0, "maskfeat.gaussian_window", "must be >= 0 (0: none)")
    check(cfg.simclr.temperature > 0, "simclr.temperature", "must be > 0")
    check(cfg.simclr.proj_num_layers >= 1, "simclr.proj_num_layers", "must be >= 1")
    check(0 <= cfg.simclr.blur_p <= 1, "simclr.blur_p", "must be in [0, 1]")
    check(
        not (cfg.trainer.sync_batchnorm and cfg.trainer.accelerator == "cpu"),
        "trainer.sync_batchnorm",
        "PyTorch's SyncBatchNorm runs on GPUs only; set it false with trainer.accelerator=cpu",
    )
    check(
        cfg.optim.lr_scaling in ("linear", "sqrt", "none"), "optim.lr_scaling", "must be linear, sqrt or none"
    )
    check(cfg.optim.base_lr > 0, "optim.base_lr", "must be > 0")
    check(cfg.optim.lr is None or cfg.optim.lr > 0, "optim.lr", "must be > 0")
    check(len(cfg.optim.betas) == 2, "optim.betas", "must be two numbers")
    check(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    check(cfg.data.batch_size > 0, "data.batch_size", "must be > 0")
    check(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    check(len(cfg.data.crop_scale) == 2, "data.crop_scale", "must be [min, max]")
    check(
        0 < cfg.data.crop_scale[0] <= cfg.data.crop_scale[1] <= 1,
        "data.crop_scale",
        "needs 0 < min <= max <= 1",
    )
    check(len(cfg.data.mean) == 3 and len(cfg.data.std) == 3, "data.mean", "mean and std need 3 values")
    check(cfg.trainer.precision in PRECISIONS, "trainer.precision", f"must be one of {PRECISIONS}")
    check(cfg.trainer.max_epochs > 0, "trainer.max_epochs", "must be > 0")
    check(cfg.trainer.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", "must be >= 1")
    check(cfg.trainer.ckpt_every_n_steps > 0, "trainer.ckpt_every_n_steps", "must be > 0")
    _validate_igpt(cfg, check)
    devices = cfg.trainer.devices
    check(
        devices == "auto" or (isinstance(devices, int) and devices > 0),
        "trainer.devices",
        "must be 'auto' or > 0",
    )
    e = cfg.eval
    check(not e.online_probe or (e.num_classes or 0) >= 2, "eval.num_classes", "online_probe needs >= 2")
    check(e.knn_every_n_epochs >= 0, "eval.knn_every_n_epochs", "must be >= 0 (0: off)")
    for key in ("knn_train_shards", "knn_val_shards"):
        check(not e.knn_every_n_epochs or bool(e[key]), f"eval.{key}", "required when knn_every_n_epochs > 0")
    check(e.knn_k >= 1 and e.knn_t > 0, "eval.knn_k", "needs knn_k >= 1 and knn_t > 0")
    _validate_clip(cfg, check)


def validate_probe(cfg: DictConfig) -> None:
    """Value checks for a :class:`LinearProbeConfig`; each error names its key."""

    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {msg} (got {OmegaConf.select(cfg, key)!r})")

    check(cfg.pool in ("default", "cls", "avg"), "pool", "must be default, cls or avg")
    check(len(cfg.layers) > 0, "layers", "needs at least one layer index")
    check(cfg.optimizer in ("lars", "sgd"), "optimizer", "must be lars or sgd")
    check(len(cfg.base_lrs) > 0 and min(cfg.base_lrs) > 0, "base_lrs", "needs one or more values > 0")
    check(cfg.lr_scaling in ("linear", "none"), "lr_scaling", "must be linear or none")
    check(cfg.batch_size > 0 and cfg.epochs > 0, "batch_size", "batch_size and epochs must be > 0")
    check(0 <= cfg.warmup_epochs <= cfg.epochs, "warmup_epochs", "must be in [0, epochs]")
    check(cfg.head_init in ("trunc_normal", "zeros"), "head_init", "must be trunc_normal or zeros")
    check(0 < cfg.data.crop_pct <= 1, "data.crop_pct", "must be in (0, 1]")
    check(cfg.data.augment_copies >= 0, "data.augment_copies", "must be >= 0")


def _validate_clip(cfg: DictConfig, check) -> None:
    c = cfg.clip
    check(c.image_tower in ("open_clip", "backbone"), "clip.image_tower", "must be open_clip or backbone")
    check(0 < c.init_temperature, "clip.init_temperature", "must be > 0")
    check(1 <= c.max_logit_scale, "clip.max_logit_scale", "must be >= 1")
    check(1 / c.init_temperature <= c.max_logit_scale, "clip.init_temperature", "1/tau > max_logit_scale")
    if cfg.objective != "clip":
        return
    # Offline by design: open_clip would download a hub tag ("laion2b_s34b_b79k") or an hf-hub: model, retrying.
    hub = "mmssl never downloads weights: pass the path of a local file (download it beforehand)"
    check(not c.model.startswith("hf-hub:"), "clip.model", f"hf-hub: models need the Hugging Face hub; {hub}")
    for key in ("pretrained", "backbone_weights"):
        local = c[key] is None or Path(c[key]).expanduser().is_file()
        check(local, f"clip.{key}", f"not an existing local file; {hub}")
    # Left and right are part of captions ("at the top left"); open_clip's train transform has no flip.
    check(cfg.data.hflip == 0, "data.hflip", "CLIP trains without flips (open_clip's transform has none): 0")


def _validate_igpt(cfg: DictConfig, check) -> None:
    g = cfg.igpt
    check(g.mode in ("ar", "bert"), "igpt.mode", "must be ar or bert")
    check(0.0 < g.mask_prob < 1.0, "igpt.mask_prob", "must be in (0, 1)")
    check(g.num_colors >= 2, "igpt.num_colors", "must be >= 2")
    check(g.resolution >= 2, "igpt.resolution", "must be >= 2")
    check(len(g.resize_range) == 2 and 1.0 <= g.resize_range[0] <= g.resize_range[1], "igpt.resize_range",
          "needs [min, max] with 1 <= min <= max (the crop must fit)")  # fmt: skip
    check(g.embed_dim % g.num_heads == 0, "igpt.embed_dim", "must be divisible by igpt.num_heads")
    check(g.norm in ("rmsnorm", "layernorm"), "igpt.norm", "must be rmsnorm or layernorm")
    check(
        g.feature_layer is None or 0 <= g.feature_layer <= g.depth,
        "igpt.feature_layer",
        "must be in 0..depth",
    )
    check(g.temperature >= 0, "igpt.temperature", "must be >= 0")
    check(g.top_k is None or g.top_k >= 1, "igpt.top_k", "must be >= 1")
    if cfg.objective == "igpt":
        check(g.palette is None or find_file(g.palette) is not None, "igpt.palette",
              "no such file; fit one with tools/fit_palette.py")  # fmt: skip
        check(
            cfg.data.img_size in (None, g.resolution),
            "data.img_size",
            "iGPT uses igpt.resolution; leave unset",
        )


def world_size(cfg: DictConfig) -> int:
    """Processes taking part in training; 'auto' devices count as 1 on a CPU-only or single-GPU machine."""
    devices = cfg.trainer.devices
    if devices == "auto":
        import torch

        devices = (
            max(torch.cuda.device_count(), 1) if cfg.trainer.accelerator in ("auto", "gpu", "cuda") else 1
        )
    return int(devices) * cfg.trainer.num_nodes


def global_batch(cfg: DictConfig) -> int:
    """Samples per optimizer step: per-device batch x devices x nodes x accumulation."""
    return cfg.data.batch_size * world_size(cfg) * cfg.trainer.accumulate_grad_batches


def learning_rate(cfg: DictConfig) -> float:
    """MAE/SimCLR rule: lr = base_lr x global_batch / 256 (linear) or base_lr x sqrt(global_batch)."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    scale = {"linear": global_batch(cfg) / 256, "sqrt": math.sqrt(global_batch(cfg)), "none": 1.0}
    return cfg.optim.base_lr * scale[cfg.optim.lr_scaling]


def active(cfg: DictConfig) -> DictConfig:
    """The config without the sections of objectives that are not in use (what --print-config shows)."""
    out = OmegaConf.to_container(cfg)
    for name in objective_names():
        if name != cfg.objective:
            out.pop(name)
    return OmegaConf.create(out)


def to_dict(cfg: DictConfig) -> dict:
    """Plain, pickle-free container (safe inside a checkpoint loaded with weights_only=True)."""
    return OmegaConf.to_container(cfg, resolve=True)
