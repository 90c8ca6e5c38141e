"""Per-objective config sections: one dataclass each, fields = the constructor arguments they feed. Each
section checks itself: choice fields list their options (``choice``), and ``validate(c, cfg, check, active)``
holds the checks that need more than a type (``c`` the section, ``cfg`` the whole config, ``active`` whether
the run uses this objective); ``validate_training`` what only a training run needs. ``mmssl.config.validate``
calls them for every section and names no objective.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig

from mmssl.config.checks import Check, choice
from mmssl.config.paths import find_file

# LLaVA's builder.py: "linear" or mlp{N}x_gelu with N >= 1 (vlm/projector.py parses the same pattern)
PROJECTOR_PATTERN = r"linear|mlp[1-9]\d*x_gelu"
MASKFEAT_TARGETS = ("hog", "pixel")


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75  # MAE §4: 75% of patches removed
    norm_pix_loss: bool = True  # MAE §3: per-patch normalised pixel targets
    decoder_embed_dim: int = 512  # MAE §3 / Table 1: 512-d, 8 blocks for ViT-B/L/H
    decoder_depth: int = 8
    decoder_num_heads: int = 16

    @staticmethod
    def validate(c: DictConfig, cfg: DictConfig, check: Check, active: bool) -> None:
        # 0 masks nothing: the loss (a mean over masked patches, losses.masked_mse) is 0/0 = NaN at step 0
        check(
            0.0 < c.mask_ratio < 1.0, "mae.mask_ratio", "must be in (0, 1): the loss is over masked patches"
        )


@dataclass
class LlavaConfig:
    decoder: str | None = None  # required: a local transformers causal-LM folder with its tokenizer
    # backbone (that section, random init) | PATH.ckpt (an mmssl run) | open_clip:MODEL | a LLaVA parts folder
    # (<run dir>/llava: the exact frozen encoder of an earlier stage)
    vision: str = "backbone"
    # open_clip only: a local weights file (nothing is downloaded). OpenAI's CLIPs (LLaVA's tower) need the
    # -quickgelu model (open_clip:ViT-L-14-336-quickgelu): see objectives/clip.py create_open_clip, issue #771
    vision_weights: str | None = None
    vision_layer: int = -2  # LLaVA-1.5 mm_vision_select_layer: the penultimate layer's patch tokens
    projector: str = "mlp2x_gelu"  # LLaVA-1.5 §3.1 (two-layer MLP); "linear" is LLaVA's (v1)
    projector_weights: str | None = None  # stage 2: stage 1's <run dir>/llava/projector.safetensors
    train_decoder: bool = False  # stage 1 (feature alignment): projector only; stage 2: projector + decoder
    # plain: <image> caption\n (stage 1, .txt) | chat: Vicuna v1 turns (.json)
    conversation: str = choice("plain", ("plain", "chat"))
    system: str | None = (
        None  # chat system prompt; None: conv_vicuna_v1's ("A chat between a curious user ...")
    )
    # pad: mean-colour padding to a square, then resize (finetune.sh --image_aspect_ratio pad) | crop: shortest
    # side resized, centre crop (CLIPImageProcessor; the reference's default 'square', pretrain.sh)
    image_aspect_ratio: str = choice("crop", ("pad", "crop"))
    max_length: int = 2048  # LLaVA-1.5 model_max_length

    @staticmethod
    def validate(c: DictConfig, cfg: DictConfig, check: Check, active: bool) -> None:
        check(not active or bool(c.decoder), "llava.decoder", "required: a local model folder")
        check(
            re.fullmatch(PROJECTOR_PATTERN, c.projector) is not None,
            "llava.projector",
            "must be linear or mlpNx_gelu (e.g. mlp2x_gelu)",
        )
        check(
            bool(c.vision), "llava.vision", "must be backbone, PATH.ckpt, open_clip:MODEL or a parts folder"
        )
        check(c.max_length > 0, "llava.max_length", "must be > 0")


@dataclass
class CLIPConfig:
    """CLIP (Radford et al. 2021) on open_clip towers (objectives/clip.py). Weights only from local files."""

    model: str = "ViT-B-32"  # open_clip architecture: text tower (+ image tower if image_tower=open_clip)
    # open_clip: the model's own | backbone: backbone.* + linear projection
    image_tower: str = choice("open_clip", ("open_clip", "backbone"))
    # local open_clip checkpoint of the whole model (a hub tag is refused); OpenAI's weights need the -quickgelu
    # model (ViT-B-32-quickgelu): the activation is not in a state dict (objectives/clip.py create_open_clip)
    pretrained: str | None = None
    backbone_weights: str | None = None  # local timm state dict (.safetensors/.pt) for image_tower=backbone
    embed_dim: int | None = None  # joint embedding width; None: the open_clip model's (512 for ViT-B-32)
    text_cfg: dict[str, Any] = field(default_factory=dict)  # overrides of open_clip's CLIPTextCfg
    vision_cfg: dict[str, Any] = field(default_factory=dict)  # overrides of open_clip's CLIPVisionCfg
    init_temperature: float = 0.07  # CLIP §2.5: tau initialised to 0.07 (Wu et al. 2018), logit scale 1/tau
    max_logit_scale: float = 100.0  # CLIP §2.5: "clipped to prevent scaling the logits by more than 100"
    # FLIP (Li et al. 2023, §3): while training, the image tower (image_tower=backbone) sees a random
    # (1 - ratio) of the patches, the rest removed as in MAE; 0: plain CLIP. FLIP: 0.5 (default), 0.75.
    image_mask_ratio: float = 0.0

    @staticmethod
    def validate(c: DictConfig, cfg: DictConfig, check: Check, active: bool) -> None:
        check(0 < c.init_temperature, "clip.init_temperature", "must be > 0")
        check(0 <= c.image_mask_ratio < 1, "clip.image_mask_ratio", "must be in [0, 1)")
        check(1 <= c.max_logit_scale, "clip.max_logit_scale", "must be >= 1")
        check(1 / c.init_temperature <= c.max_logit_scale, "clip.init_temperature", "1/tau > max_logit_scale")
        if not active:
            return
        # Offline by design: open_clip would download a hub tag ("laion2b_s34b_b79k") or an hf-hub: model.
        hub = "mmssl never downloads weights: pass the path of a local file (download it beforehand)"
        check(
            not c.model.startswith("hf-hub:"),
            "clip.model",
            f"hf-hub: models need the Hugging Face hub; {hub}",
        )
        for key in ("pretrained", "backbone_weights"):
            local = c[key] is None or Path(c[key]).expanduser().is_file()
            check(local, f"clip.{key}", f"not an existing local file; {hub}")
        # Left and right are part of captions ("at the top left"); open_clip's train transform has no flip.
        check(
            cfg.data.hflip == 0, "data.hflip", "CLIP trains without flips (open_clip's transform has none): 0"
        )
        check(
            c.image_mask_ratio == 0 or c.image_tower == "backbone",
            "clip.image_mask_ratio",
            "FLIP's patch masking needs clip.image_tower=backbone (a timm ViT)",
        )


@dataclass
class MaskFeatConfig:
    mask_ratio: float = 0.4  # MaskFeat §4.1 / SlowFast in1k_VIT_B_MaskFeat_PT.yaml: 40% of patches, in blocks
    min_block: int | None = None  # patches per block at least; None: a fifth of the masked count (SlowFast)
    min_aspect: float = 0.3  # BEiT masking_generator.py: block aspect ratio in [0.3, 1/0.3]
    cell_size: int = 8  # HOG: 8x8-pixel cells (SlowFast masked.py), 2x2 cells per 16-px patch
    nbins: int = 9  # 9 unsigned orientation bins
    # sobel (SlowFast HOGLayerC) | central ([-1, 0, 1], skimage / Dalal-Triggs); targets/hog.py GRADIENTS
    gradient: str = choice("sobel", ("sobel", "central"))
    gaussian_window: int = 0  # 0: none (SlowFast); 16: MMPretrain's HOGGenerator (std 8, tiled)
    # SlowFast decays the mask token (no skip list under ZERO_DECAY_POS_CLS False); MMPretrain exempts it: false
    mask_token_weight_decay: bool = True
    # What masked patches predict, one linear head each, losses summed (MaskFeat Table 13: [hog, pixel]).
    # pixel: the patch's RGB values as the network sees them (dataset-normalised), not per-patch normalised.
    targets: list[str] = field(default_factory=lambda: ["hog"])

    @staticmethod
    def validate(c: DictConfig, cfg: DictConfig, check: Check, active: bool) -> None:
        check(0.0 < c.mask_ratio < 1.0, "maskfeat.mask_ratio", "must be in (0, 1)")
        check(
            len(c.targets) > 0
            and len(set(c.targets)) == len(c.targets)
            and set(c.targets) <= set(MASKFEAT_TARGETS),
            "maskfeat.targets",
            f"must be distinct names from {MASKFEAT_TARGETS}",
        )
        check(c.min_block is None or c.min_block >= 1, "maskfeat.min_block", "must be >= 1 or null")
        check(0.0 < c.min_aspect <= 1.0, "maskfeat.min_aspect", "must be in (0, 1]")
        check(c.cell_size >= 1 and c.nbins >= 1, "maskfeat.cell_size", "cell_size and nbins must be >= 1")
        check(c.gaussian_window >= 0, "maskfeat.gaussian_window", "must be >= 0 (0: none)")


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
    # crop area and flip: null takes data.crop_scale (SimCLR: [0.08, 1.0]) and data.hflip; set them when SimCLR
    # is composed with an objective whose views differ (SLIP: CLIP's crop is [0.5, 1], without flip)
    crop_scale: list[float] | None = None
    hflip: float | None = None
    # SimCLR's head ends in BN without shift (reference); SLIP's ends in a Linear with bias (models.py _build_mlp)
    proj_last_bn: bool = True

    @staticmethod
    def validate(c: DictConfig, cfg: DictConfig, check: Check, active: bool) -> None:
        check(c.temperature > 0, "simclr.temperature", "must be > 0")
        check(c.proj_num_layers >= 1, "simclr.proj_num_layers", "must be >= 1")
        check(0 <= c.blur_p <= 1, "simclr.blur_p", "must be in [0, 1]")
        # NT-Xent (SimCLR §2.1): each of the 2N views has 2N - 2 negatives in its rank's batch, plus the other
        # ranks' 2N(world - 1) when gathered. With N = 1 and no gathering the positive is the only other view:
        # the loss is exactly 0 and nothing trains. Asked of every rank, since the world size under
        # trainer.devices=auto is unknown here and BatchNorm in the head needs more than one image anyway.
        check(not active or cfg.data.batch_size >= 2, "data.batch_size",
              "SimCLR needs >= 2 images per rank: with 1, a view's only partner is its positive, so there are no "
              "negatives, the loss is 0 and nothing trains")  # fmt: skip
        check(
            c.crop_scale is None or (len(c.crop_scale) == 2 and 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1),
            "simclr.crop_scale",
            "needs [min, max] with 0 < min <= max <= 1, or null",
        )
        check(c.hflip is None or 0 <= c.hflip <= 1, "simclr.hflip", "must be in [0, 1] or null")


@dataclass
class IGPTConfig:
    """iGPT (Chen et al. 2020); defaults are iGPT-S at 32x32 with the 9-bit palette (configs/igpt_s32.yaml)."""

    # ar: next-pixel prediction | bert: masked-pixel prediction (§"Pre-training"); objectives/igpt.py MODES
    mode: str = choice("ar", ("ar", "bert"))
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
    # the reference's norm (no centring, no bias) | layernorm (GPT-2's); sequence.py NORMS
    norm: str = choice("rmsnorm", ("rmsnorm", "layernorm"))
    mask_prob: float = 0.15  # BERT: 15% of tokens masked (run.py --bert_mask_prob)
    feature_layer: int | None = None  # probe features from this block's output; None: depth // 2
    temperature: float = 1.0  # completions in pictures: sampling temperature (0 = argmax) and top-k
    top_k: int | None = None
    num_completions: int = 2

    @staticmethod
    def validate(c: DictConfig, cfg: DictConfig, check: Check, active: bool) -> None:
        check(0.0 < c.mask_prob < 1.0, "igpt.mask_prob", "must be in (0, 1)")
        check(c.num_colors >= 2, "igpt.num_colors", "must be >= 2")
        check(c.resolution >= 2, "igpt.resolution", "must be >= 2")
        check(len(c.resize_range) == 2 and 1.0 <= c.resize_range[0] <= c.resize_range[1], "igpt.resize_range",
              "needs [min, max] with 1 <= min <= max (the crop must fit)")  # fmt: skip
        check(c.embed_dim % c.num_heads == 0, "igpt.embed_dim", "must be divisible by igpt.num_heads")
        check(
            c.feature_layer is None or 0 <= c.feature_layer <= c.depth,
            "igpt.feature_layer",
            "must be in 0..depth",
        )
        check(c.temperature >= 0, "igpt.temperature", "must be >= 0")
        check(c.top_k is None or c.top_k >= 1, "igpt.top_k", "must be >= 1")
        if active:
            check(
                cfg.data.img_size in (None, c.resolution),
                "data.img_size",
                "iGPT uses igpt.resolution; leave unset",
            )

    @staticmethod
    def validate_training(c: DictConfig, cfg: DictConfig, check: Check) -> None:
        # Only here: --print-config and checkpoint loading need no palette file, but a training run does.
        check(bool(c.palette), "igpt.palette",
              "required for training; fit one with tools/fit_palette.py (e.g. --shards <train shards> --k 512, "
              "which writes runs/palettes/k512_32px.safetensors) and pass igpt.palette=<file>")  # fmt: skip
        check(
            find_file(c.palette) is not None,
            "igpt.palette",
            "no such file; fit one with tools/fit_palette.py",
        )


@dataclass
class SigLIPConfig:
    """SigLIP (Zhai et al. 2023, *Sigmoid Loss for Language Image Pre-Training*): CLIP's towers (the ``clip``
    section: model, image_tower, text_cfg, image_mask_ratio, ...) with the pairwise sigmoid loss."""

    init_logit_scale: float = 10.0  # §3 / Algorithm 1: t' = log 10, the scale t = exp(t') starts at 10
    init_logit_bias: float = -10.0  # §3: b = -10, so training starts near the prior of many negatives
    TOWERS: ClassVar[str] = "clip"  # the section whose towers, views and tokenizer SigLIP uses

    @staticmethod
    def uses(c: DictConfig) -> list[str]:
        return [SigLIPConfig.TOWERS]

    @staticmethod
    def validate(c: DictConfig, cfg: DictConfig, check: Check, active: bool) -> None:
        check(c.init_logit_scale > 0, "siglip.init_logit_scale", "must be > 0")
        towers = SigLIPConfig.TOWERS
        check(
            c.init_logit_scale <= cfg[towers].max_logit_scale,
            "siglip.init_logit_scale",
            f"must be <= {towers}.max_logit_scale (the clamp after every step)",
        )


@dataclass
class ComposeConfig:
    """Several objectives on one shared encoder (objectives/compose.py), e.g. SLIP: ``{clip: 1.0, simclr: 0.5}``.
    Each part reads its own section; the data views are the union of the parts' views."""

    # objective name -> loss weight. The first part's backbone (its initialisation, its loaded weights such as
    # clip.backbone_weights, its frozen parameters) is the one all parts share: name that part first.
    objectives: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def uses(c: DictConfig) -> list[str]:
        return list(c.objectives)

    @staticmethod
    def validate(c: DictConfig, cfg: DictConfig, check: Check, active: bool) -> None:
        if not active:
            return
        check(len(c.objectives) >= 1, "compose.objectives", "name one or more objectives with weights")
        check(all(w > 0 for w in c.objectives.values()), "compose.objectives", "weights must be > 0")
