"""Typed configuration: dataclass defaults, YAML deltas, dotted command-line overrides (DESIGN.md §4).

``load("mae_vitb", ["optim.base_lr=3e-4"])`` returns a validated OmegaConf ``DictConfig``. Unknown keys and
wrong types fail here, before any model or data work, with the full key path in the message. Key names equal
the constructor argument names they feed (see ``mmssl/factory/``).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmssl.config.checks import Check
from mmssl.config.objectives import (  # per-objective sections, each with its own checks
    CLIPConfig,
    ComposeConfig,
    IGPTConfig,
    LlavaConfig,
    MAEConfig,
    MaskFeatConfig,
    SigLIPConfig,
    SimCLRConfig,
)
from mmssl.config.paths import CONFIG_DIR, HUB_REFUSED, is_hub_name
from mmssl.config.paths import find_file as find_file  # re-exported: C.find_file

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed")  # auto: factory/precision.py
# trainer.loggers: name -> (packages, any one of which the logger needs; the pip extra installing it)
LOGGERS: dict[str, tuple[tuple[str, ...], str]] = {
    "csv": ((), ""),
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
}
# torch.distributed.fsdp.ShardingStrategy names (what Lightning's FSDPStrategy(sharding_strategy=) takes)
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
# Optimizers whose update uses each whole tensor's norm (LARS/LAMB trust ratio): FSDP hands them shards
TRUST_RATIO_OPTIMIZERS = ("lars", "larc", "nlars", "nlarc", "lamb", "lambc")


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
    # continued pretraining: a new run (new optimizer and schedule, step 0) from these encoder weights: a
    # pretraining .ckpt, an exported .safetensors (+ .json) or folder, or a plain timm state dict; local only
    weights: str | None = None
    # timm's set_grad_checkpointing: recompute each block's activations in the backward pass (memory for
    # compute; ViT-L/H at large batches). Under trainer.strategy=fsdp use trainer.fsdp.activation_checkpointing.
    grad_checkpointing: bool = False


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
    # absolute lr at step 0 of the warmup: 0 as MAE's util/lr_sched.py; SlowFast's MaskFeat: WARMUP_START_LR 1e-6
    warmup_start_lr: float = 0.0


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
class FSDPConfig:
    """Used with ``trainer.strategy=fsdp`` only, ignored otherwise (Lightning's FSDPStrategy, wired in
    ``factory/fsdp.py``). Every transformer block of the objective is one FSDP unit; checkpoints always hold full
    (gathered) state dicts."""

    sharding_strategy: str = "FULL_SHARD"  # FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD | NO_SHARD
    activation_checkpointing: bool = False  # recompute the blocks' activations in the backward pass
    cpu_offload: bool = False  # parameters and gradients wait in CPU memory between uses


@dataclass
class TrainerConfig:
    max_epochs: int = 800
    # optimizer steps of the whole run (the lr schedule ends there); None: max_epochs x steps per epoch. Not
    # Lightning's max_steps: its -1 ("unlimited") has no meaning here, since warmup-cosine needs an end
    max_steps: int | None = None
    accelerator: str = "auto"
    devices: Any = "auto"  # int or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp
    precision: str = "auto"  # bf16-mixed where the GPU / CPU has native bf16, else 32-true
    accumulate_grad_batches: int = 1
    # Samples per optimizer step that a recipe keeps wherever it runs: accumulate_grad_batches is then derived
    # as global_batch / (data.batch_size x processes) (facebookresearch/mae's accum_iter). None: not kept.
    global_batch: int | None = None
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 50
    ckpt_every_n_steps: int = 1000
    keep_checkpoints: int = 3  # step checkpoints kept besides last.ckpt
    picture_every_n_steps: int = 1000
    val_every_n_epochs: int = 1
    ddp_timeout_s: int = 1800
    sync_batchnorm: bool = False
    compile: bool = False  # torch.compile the objective's forward (Module.compile: state-dict keys unchanged)
    # experiment loggers, any of csv | tensorboard | wandb | mlflow (mmssl/loggers.py; the last three need extras)
    loggers: list[str] = field(default_factory=lambda: ["csv"])
    progress_bar: bool = True  # Lightning's progress bar (off for batch jobs whose logs are files)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


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
    siglip: SigLIPConfig = objective_section(SigLIPConfig)
    compose: ComposeConfig = objective_section(ComposeConfig)


@dataclass
class ProbeDataConfig:
    train_shards: str | None = None  # labelled: shards with .cls, a folder of class folders, demo:X
    val_shards: str | None = None
    label_key: str = "cls"
    img_size: int | None = None  # None: the encoder's own (from the checkpoint)
    crop_pct: float = 0.875  # eval view: resize to img_size / crop_pct, centre crop (MAE: 256 -> 224)
    batch_size: int = 256  # images per forward pass while extracting features
    num_workers: int = 4
    # augment: every epoch trains on the frozen encoder's features of freshly augmented training images
    # (RandomResizedCrop + flip drawn anew each epoch, facebookresearch/mae main_linprobe.py; one encoder pass
    # per epoch). cached: one pass of fixed views, features cached and reused (fast, not the protocol)
    mode: str = "augment"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # main_linprobe: RandomResizedCrop
    hflip: float = 0.5
    augment_copies: int = 0  # cached mode: 0: the eval view; K: K augmented passes, epoch e uses e mod K
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


def active_objectives(cfg: DictConfig) -> list[str]:
    """The objective sections a run uses (their checks apply in full; --print-config shows only these): the
    ``objective`` and, through each section's optional ``uses(section) -> names``, the sections it builds on
    (a composition's parts, the CLIP towers of SigLIP), recursively."""
    classes = {f.name: f.default_factory for f in fields(Config) if f.metadata.get("objective")}
    used: list[str] = []
    todo = [("objective", cfg.objective)]
    while todo:
        key, name = todo.pop(0)
        if name not in classes:
            raise ConfigError(f"config key '{key}': {name!r} is not an objective; known: {sorted(classes)}")
        if name in used:
            continue
        used.append(name)
        uses = getattr(classes[name], "uses", None)
        for part in uses(cfg[name]) if uses is not None else ():
            if part == name:
                raise ConfigError(f"config key '{name}': an objective cannot use itself ({name!r})")
            todo.append((name, part))
    return used


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
        delta = OmegaConf.load(path)
        _check_tool(delta, schema, path)
        merged = _merge(merged, delta, f"config file {path}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.base_lr=3e-4")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override {item!r}")
    if schema is Config:
        validate(merged)
    elif schema is LinearProbeConfig:
        validate_probe(merged)
    return merged


def _tools() -> dict[type, str]:
    """Each config schema and the tool that reads its recipes (``configs/`` holds all three kinds)."""
    from mmssl.config.finetune import FinetuneConfig  # it builds on this module

    return {
        Config: "tools/pretrain.py",
        LinearProbeConfig: "tools/linear_probe.py",
        FinetuneConfig: "tools/finetune.py",
    }


def _check_tool(delta: Any, schema: type, path: Path) -> None:
    """A recipe of another tool (``linprobe_*.yaml`` given to pretrain.py, say) is refused, naming its tool."""
    if not isinstance(delta, DictConfig):
        return
    keys = set(delta.keys())
    if keys <= {f.name for f in fields(schema)}:
        return
    for other, tool in _tools().items():
        if other is not schema and keys <= {f.name for f in fields(other)}:
            raise ConfigError(
                f"config file {path}: a recipe for {tool}, not for {_tools()[schema]} (keys "
                f"{', '.join(sorted(keys - {f.name for f in fields(schema)}))}); use "
                f"python {tool} --cfg {path.stem} (add --print-config to print it)"
            )


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


def _check_core(cfg: DictConfig, check: Check) -> None:
    """The checks of the run-wide sections (trainer, optim, data, eval); objective sections check themselves."""
    check(not is_hub_name(cfg.backbone.weights), "backbone.weights", HUB_REFUSED)
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
    check(cfg.optim.warmup_start_lr >= 0, "optim.warmup_start_lr", "must be >= 0")
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
    check(
        cfg.trainer.max_steps is None or cfg.trainer.max_steps > 0,
        "trainer.max_steps",
        "must be > 0, or null for trainer.max_epochs x steps per epoch (Lightning's -1, 'unlimited', has no "
        "meaning here: the lr schedule needs an end)",
    )
    spe = cfg.data.samples_per_epoch
    check(spe is None or spe >= 1, "data.samples_per_epoch", "must be >= 1, or null to read the manifest")
    check(cfg.trainer.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", "must be >= 1")
    check(cfg.trainer.ckpt_every_n_steps > 0, "trainer.ckpt_every_n_steps", "must be > 0")
    check_loggers(cfg.trainer.loggers)
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
    validate_fsdp(cfg, check)


def validate_fsdp(cfg: DictConfig, check) -> None:
    """``trainer.fsdp.*`` and what FSDP cannot run with (machine-independent: see :func:`validate_machine`)."""
    t, f = cfg.trainer, cfg.trainer.fsdp
    check(
        f.sharding_strategy.upper() in SHARDING_STRATEGIES,
        "trainer.fsdp.sharding_strategy",
        f"must be one of {', '.join(SHARDING_STRATEGIES)}",
    )
    if t.strategy != "fsdp":  # a recipe's fsdp section stays valid when the command line picks ddp
        return
    check(
        not cfg.backbone.grad_checkpointing,
        "backbone.grad_checkpointing",
        "with trainer.strategy=fsdp use trainer.fsdp.activation_checkpointing=true (it checkpoints inside the "
        "FSDP units)",
    )
    check(
        cfg.optim.name.lower() not in TRUST_RATIO_OPTIMIZERS,
        "optim.name",
        "LARS/LAMB scale each update by whole-tensor norms, but under trainer.strategy=fsdp every rank holds "
        "shards; use adamw or sgd, or trainer.strategy=ddp",
    )
    for key in ("online_probe", "knn_every_n_epochs"):
        check(
            not cfg.eval[key],
            f"eval.{key}",
            "online evaluation calls the encoder outside the training step, where trainer.strategy=fsdp holds "
            "only shards of its weights; evaluate the checkpoints instead (tools/linear_probe.py, tools/knn.py)",
        )


def validate_machine(cfg: DictConfig) -> None:
    """Checks that depend on this machine rather than on the config, run before any model or data work of a
    training run; not part of :func:`validate`, so that a checkpoint's config loads on any machine."""
    t = cfg.trainer
    import torch

    gpu = t.accelerator in ("auto", "gpu", "cuda")
    if t.sync_batchnorm and not (gpu and torch.cuda.is_available()):
        why = "this machine has no CUDA GPU" if gpu else f"trainer.accelerator={t.accelerator}"
        raise ConfigError(
            f"config key 'trainer.sync_batchnorm': PyTorch's SyncBatchNorm runs on CUDA GPUs only, but {why}; "
            "set trainer.sync_batchnorm=false here (each process then normalises over its own batch)"
        )
    if t.strategy != "fsdp":
        return

    if t.accelerator not in ("auto", "gpu", "cuda"):
        why = f"trainer.accelerator={t.accelerator}"
    elif not torch.cuda.is_available():
        why = "this machine has no CUDA GPU"
    else:
        return
    raise ConfigError(
        f"config key 'trainer.strategy': fsdp needs CUDA GPUs (Lightning's FSDPStrategy runs on CUDA only), but "
        f"{why}; use trainer.strategy=ddp (or auto) here"
    )


def _checker(cfg: DictConfig) -> Check:
    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {msg} (got {OmegaConf.select(cfg, key)!r})")

    return check


def _sections(cfg: DictConfig):
    """(name, section config, section class, whether the run uses it) for every section of ``Config``."""
    used = set(active_objectives(cfg))
    for f in fields(Config):
        if is_dataclass(f.default_factory):
            yield f.name, cfg[f.name], f.default_factory, not f.metadata.get("objective") or f.name in used


def validate(cfg: DictConfig) -> None:
    """Value checks that types alone cannot express; each error names its key. Every section checks itself:
    its choice fields, then its own ``validate`` (config/objectives.py); the run-wide ones in ``_check_core``."""
    check = _checker(cfg)
    check(cfg.objective in objective_names(), "objective", f"must be one of {objective_names()}")
    _check_core(cfg, check)
    for name, section, cls, active in _sections(cfg):
        for f in fields(cls):
            options = f.metadata.get("choices")
            if options is not None:
                check(section[f.name] in options, f"{name}.{f.name}", f"must be one of {', '.join(options)}")
        if hasattr(cls, "validate"):
            cls.validate(section, cfg, check, active)


def validate_training(cfg: DictConfig) -> None:
    """What only a training run needs, beyond :func:`validate` (e.g. an iGPT palette file): each section in use
    checks it with its ``validate_training``. Called before the data module is built."""
    check = _checker(cfg)
    for _, section, cls, active in _sections(cfg):
        if active and hasattr(cls, "validate_training"):
            cls.validate_training(section, cfg, check)


def check_loggers(names, key: str = "trainer.loggers") -> None:
    """Unknown logger names and loggers whose package is missing fail before any model or data work."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"config key '{key}': unknown logger {name!r}; choose from {sorted(LOGGERS)}")
        packages, extra = LOGGERS[name]
        if packages and not any(importlib.util.find_spec(p) is not None for p in packages):
            raise ConfigError(
                f"config key '{key}': the {name} logger needs the {packages[0]} package, which is not "
                f"installed: pip install 'mmssl[{extra}]' (or pip install {packages[0]})"
            )


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
    check(cfg.data.mode in ("augment", "cached"), "data.mode", "must be augment or cached")
    check(cfg.data.mode == "cached" or cfg.data.augment_copies == 0, "data.augment_copies",
          "K cached augmented copies belong to data.mode=cached; augment draws new views every epoch")  # fmt: skip
    crop = cfg.data.crop_scale
    check(len(crop) == 2 and 0 < crop[0] <= crop[1] <= 1, "data.crop_scale", "needs 0 < min <= max <= 1")


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
    """Samples per optimizer step: per-device batch x devices x nodes x accumulation, or the recipe's
    ``trainer.global_batch``, which :func:`keep_global_batch` makes true by setting the accumulation."""
    if cfg.trainer.global_batch is not None:
        return cfg.trainer.global_batch
    return cfg.data.batch_size * world_size(cfg) * cfg.trainer.accumulate_grad_batches


def keep_global_batch(cfg: DictConfig) -> tuple[DictConfig, str | None]:
    """``cfg`` with ``trainer.accumulate_grad_batches`` derived from ``trainer.global_batch`` for the processes
    this run has (``world_size``: devices found here or given by the launcher), and a line saying what was
    done; (cfg, None) when ``trainer.global_batch`` is not set."""
    t = cfg.trainer
    if t.global_batch is None:
        return cfg, None
    world, per_device = world_size(cfg), cfg.data.batch_size
    per_step = per_device * world
    if t.global_batch < per_step or t.global_batch % per_step:
        raise ConfigError(
            f"config key 'trainer.global_batch': {t.global_batch} is not a multiple of data.batch_size x processes "
            f"= {per_device} x {world} = {per_step}; change data.batch_size (or trainer.global_batch=null to "
            "set trainer.accumulate_grad_batches yourself)"
        )
    accumulate = t.global_batch // per_step
    if t.accumulate_grad_batches not in (1, accumulate):
        raise ConfigError(
            f"config key 'trainer.accumulate_grad_batches': {t.accumulate_grad_batches}, but trainer.global_batch="
            f"{t.global_batch} with {per_device} per device x {world} processes needs {accumulate}; set one of them"
        )
    cfg = OmegaConf.merge(cfg, {"trainer": {"accumulate_grad_batches": accumulate}})
    note = (
        f"trainer.global_batch={t.global_batch} kept on {world} process(es) (trainer.devices={t.devices} x "
        f"trainer.num_nodes={t.num_nodes}): {per_device} per device x {world} x {accumulate} accumulation "
        f"step(s) (trainer.accumulate_grad_batches={accumulate})"
    )
    return cfg, note


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
        if name not in active_objectives(cfg):
            out.pop(name)
    return OmegaConf.create(out)


def to_dict(cfg: DictConfig) -> dict:
    """Plain, pickle-free container (safe inside a checkpoint loaded with weights_only=True)."""
    return OmegaConf.to_container(cfg, resolve=True)
