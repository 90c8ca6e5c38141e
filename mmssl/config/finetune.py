"""The fine-tuning config (``tools/finetune.py``): an encoder + a new head trained end to end on labelled data.

Defaults are the MAE fine-tuning protocol (He et al. 2021, Appendix A.3 / Table 9; facebookresearch/mae
``main_finetune.py`` and FINETUNE.md); ``configs/finetune_*.yaml`` hold what a recipe changes. The optimizer,
data batch and trainer sections have the pretraining config's key names, so the schedule, lr scaling and the
Lightning trainer are derived by the same code (``C.learning_rate``, ``factory.plan``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from mmssl import config as C


@dataclass
class FinetuneOptimConfig(C.OptimConfig):
    base_lr: float = (
        1e-3  # main_finetune.py --blr (the ViT-B recipe: 5e-4); lr = base_lr x global batch / 256
    )
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999]
    )  # torch AdamW's default, as main_finetune
    warmup_epochs: float = 5.0  # --warmup_epochs 5
    min_lr: float = 1e-6  # --min_lr
    # ELECTRA / BEiT layer-wise lr decay, MAE util/lr_decay.py: block i gets lr x decay^(depth + 1 - (i + 1)),
    # patch embedding, CLS token and position embedding decay^(depth + 1), the head and fc_norm 1. main_finetune
    # default 0.75 (ViT-L/H); ViT-B uses 0.65. null: none
    layer_decay: float | None = 0.75


@dataclass
class FinetuneModelConfig:
    global_pool: str = "avg"  # avg: mean of the patch tokens then fc_norm (MAE --global_pool) | token: CLS
    drop_path_rate: float = 0.1  # --drop_path (ViT-B 0.1, ViT-L 0.2, ViT-H 0.3)
    head_init_std: float = 2e-5  # main_finetune.py: trunc_normal_(head.weight, std=2e-5), bias 0


@dataclass
class AugmentConfig:
    """Training augmentation (timm ``create_transform``, ``Mixup``), MAE util/datasets.py build_transform."""

    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop, timm's default
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment, magnitude 9, magnitude std 0.5 (--aa)
    color_jitter: float | None = None  # --color_jitter; timm ignores it while RandAugment is on
    re_prob: float = 0.25  # random erasing (--reprob, after DeiT)
    re_mode: str = "pixel"
    re_count: int = 1
    mixup: float = 0.8  # mixup alpha (FINETUNE.md recipes; main_finetune's default is 0: off)
    cutmix: float = 1.0  # cutmix alpha
    cutmix_minmax: list[float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"  # batch | pair | elem
    smoothing: float = 0.1  # label smoothing (applied inside Mixup's soft targets when mixing)


@dataclass
class FinetuneDataConfig:
    train_shards: str | None = (
        None  # labelled: shards with .cls members, demo:NAME/SPLIT, or a class-folder tree
    )
    val_shards: str | None = None  # held-out split for top-1/top-5 each epoch
    label_key: str = "cls"
    samples_per_epoch: int | None = None  # None: the shards' manifest.json (or the folder's image count)
    batch_size: int = 32  # per device (FINETUNE.md ViT-B: 32 x 32 GPUs = 1024)
    num_workers: int = 10
    img_size: int | None = None  # None: the encoder's own
    crop_pct: float = 0.875  # eval view: resize to img_size / crop_pct, centre crop (224 / 256)
    interpolation: str | None = "bicubic"  # None: the encoder's
    mean: list[float] | None = None  # None: the encoder's normalisation (from its checkpoint or sidecar)
    std: list[float] | None = None
    shuffle_buffer: int = 2000
    max_image_pixels: int = 89_478_485


@dataclass
class FinetuneTrainerConfig(C.TrainerConfig):
    max_epochs: int = 50  # main_finetune default (ViT-B recipe: 100)
    ckpt_every_n_steps: int = 5000
    keep_checkpoints: int = 1


@dataclass
class FinetuneConfig:
    name: str = "finetune"  # run directory: out_dir/name
    out_dir: str = "runs"
    seed: int = 0
    # the encoder: a pretraining checkpoint (.ckpt), an exported .safetensors (+ .json) or exported folder
    encoder: str | None = None
    random_init: bool = False  # the encoder's architecture at its objective's own initialisation (a baseline)
    arch: str | None = None  # expected timm architecture (e.g. vit_base_patch16_224); null accepts any
    num_classes: int | None = None  # required: the head's size; labels must lie in 0..num_classes-1
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    trainer: FinetuneTrainerConfig = field(default_factory=FinetuneTrainerConfig)


def load(cfg: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Defaults <- YAML <- ``key=value`` overrides, validated (keys and types by OmegaConf, values here)."""
    merged = C.load(cfg, overrides, schema=FinetuneConfig)
    validate(merged)
    return merged


def mixup_active(cfg: DictConfig) -> bool:
    a = cfg.augment
    return a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None


def validate(cfg: DictConfig) -> None:
    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise C.ConfigError(f"config key '{key}': {msg} (got {OmegaConf.select(cfg, key)!r})")

    check(cfg.num_classes is None or cfg.num_classes >= 2, "num_classes", "must be >= 2")
    m, a, o, d, t = cfg.model, cfg.augment, cfg.optim, cfg.data, cfg.trainer
    check(m.global_pool in ("avg", "token"), "model.global_pool", "must be avg or token")
    check(0 <= m.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)")
    check(m.head_init_std > 0, "model.head_init_std", "must be > 0")
    check(o.layer_decay is None or 0 < o.layer_decay <= 1, "optim.layer_decay", "must be in (0, 1] or null")
    check(o.lr_scaling in ("linear", "sqrt", "none"), "optim.lr_scaling", "must be linear, sqrt or none")
    check(o.base_lr > 0 and (o.lr is None or o.lr > 0), "optim.base_lr", "base_lr and lr must be > 0")
    check(len(o.betas) == 2, "optim.betas", "must be two numbers")
    check(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    check(len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1, "augment.crop_scale",
          "needs [min, max] with 0 < min <= max <= 1")  # fmt: skip
    check(0 <= a.hflip <= 1 and 0 <= a.re_prob <= 1, "augment.hflip", "hflip and re_prob must be in [0, 1]")
    check(a.re_mode in ("const", "rand", "pixel"), "augment.re_mode", "must be const, rand or pixel")
    check(a.mixup >= 0 and a.cutmix >= 0, "augment.mixup", "mixup and cutmix alphas must be >= 0")
    check(a.cutmix_minmax is None or len(a.cutmix_minmax) == 2, "augment.cutmix_minmax", "must be [min, max]")
    check(a.mixup_mode in ("batch", "pair", "elem"), "augment.mixup_mode", "must be batch, pair or elem")
    check(0 <= a.smoothing < 1, "augment.smoothing", "must be in [0, 1)")
    # timm's Mixup pairs each image with its mirror in the batch (x.flip(0)) and asserts an even batch
    check(not mixup_active(cfg) or d.batch_size % 2 == 0, "data.batch_size", "must be even when mixing")
    check(d.batch_size > 0 and d.num_workers >= 0, "data.batch_size", "must be > 0 (num_workers >= 0)")
    check(0 < d.crop_pct <= 1, "data.crop_pct", "must be in (0, 1]")
    for key in ("mean", "std"):
        check(d[key] is None or len(d[key]) == 3, f"data.{key}", "needs 3 values or null (the encoder's)")
    check(t.precision in C.PRECISIONS, "trainer.precision", f"must be one of {C.PRECISIONS}")
    check(t.max_epochs > 0 and t.accumulate_grad_batches >= 1, "trainer.max_epochs", "must be > 0")
    check(t.ckpt_every_n_steps > 0, "trainer.ckpt_every_n_steps", "must be > 0")
    check(t.strategy != "fsdp", "trainer.strategy", "fine-tuning runs with auto, ddp or ddp_spawn (not fsdp)")
    check(t.devices == "auto" or (isinstance(t.devices, int) and t.devices > 0), "trainer.devices",
          "must be 'auto' or > 0")  # fmt: skip


def require_run_inputs(cfg: DictConfig) -> None:
    """What a training run needs beyond --print-config: checked before anything is built."""
    for key, what in (
        ("encoder", "a pretraining .ckpt, an exported .safetensors or an exported folder"),
        ("num_classes", "the number of classes of the labelled data"),
        ("data.train_shards", "labelled shards (.cls), demo:NAME/SPLIT, or a folder of class folders"),
        ("data.val_shards", "the held-out labelled split (top-1/top-5 every epoch, best checkpoint)"),
    ):
        if OmegaConf.select(cfg, key) is None:
            raise C.ConfigError(f"config key '{key}': required: {what}")
