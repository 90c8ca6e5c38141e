"""Name -> constructor tables for the objectives and their data views, and objectives from checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmssl import config as C
from mmssl.backbones import Backbone
from mmssl.build.encoders import (
    build_backbone,
    checkpoint_config,
    encoder_info,
    encoder_of,
    img_size,
    load_backbone,
    load_pretrained_backbone,
)
from mmssl.data.transforms import (
    CaptionTokens,
    clip_view,
    eval_view,
    igpt_view,
    llava_view,
    mae_view,
    simclr_view,
)
from mmssl.export import (
    BACKBONE_PREFIX,
    CheckpointError,
    load_exported,
    load_state_checked,
    read_checkpoint,
)
from mmssl.heads import MAEDecoder, ProjectionHead, mae_init_
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
from mmssl.vlm.decoders import load_decoder
from mmssl.vlm.llava import LLaVA
from mmssl.vlm.parts import MANIFEST, load_vision_tower
from mmssl.vlm.projector import Projector, load_projector
from mmssl.vlm.prompt import PromptEncoder
from mmssl.vlm.vision import VisionTower, create_encoder


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
        "img_size": img_size(cfg),
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
            image_size=img_size(cfg),
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


def _mae_views(cfg: DictConfig):
    d = cfg.data
    train = mae_view(
        img_size(cfg), tuple(d.crop_scale), d.interpolation, d.hflip, tuple(d.mean), tuple(d.std)
    )
    return train, eval_view(
        img_size(cfg), interpolation=d.interpolation, mean=tuple(d.mean), std=tuple(d.std)
    )


def _llava_views(cfg: DictConfig):
    d = cfg.data
    view = llava_view(img_size(cfg), d.interpolation, tuple(d.mean), tuple(d.std))
    return view, view


def _clip_views(cfg: DictConfig):
    d = cfg.data
    train = clip_view(img_size(cfg), tuple(d.crop_scale), d.interpolation, tuple(d.mean), tuple(d.std))
    # open_clip's eval transform: resize the shorter side to the input size, centre crop (crop_pct 1)
    val = eval_view(img_size(cfg), 1.0, d.interpolation, tuple(d.mean), tuple(d.std))
    return train, val


def _simclr_views(cfg: DictConfig):
    # Validation draws the same two random views of held-out images, so val/loss is the same quantity.
    d, s = cfg.data, cfg.simclr
    view = simclr_view(
        img_size(cfg), tuple(d.crop_scale), d.interpolation, d.hflip, color_jitter=s.color_jitter,
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
    objective = OBJECTIVES[cfg.objective](cfg)
    if (
        cfg.backbone.weights
    ):  # continued pretraining: after the objective's own init (MAE re-inits everything)
        load_pretrained_backbone(objective, cfg.backbone.weights, cfg.objective)
    return objective


def objective_from_checkpoint(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), random_init: bool = False, seed: int = 0
) -> nn.Module:
    """The objective of a pretraining checkpoint (config and weights from the file), in eval mode.
    ``random_init``: the same architecture at its own (seeded) initialisation, keeping only the checkpoint's
    buffers that are data rather than learned weights (an iGPT palette): the baseline of a probe."""
    ckpt = read_checkpoint(path)
    cfg = checkpoint_config(path, ckpt, overrides)
    torch.manual_seed(seed)
    objective = build_objective(cfg)
    state = {k.removeprefix("objective."): v for k, v in ckpt["state_dict"].items()}
    if random_init:
        state = {**objective.state_dict(), **{k: v for k, v in state.items() if k.startswith("palette.")}}
    load_state_checked(
        objective, state, f"checkpoint {path}", f"the {cfg.objective!r} objective of its config"
    )
    return objective.eval()


def load_encoder(path: str | Path, random_init: bool = False, seed: int = 0) -> tuple[Backbone, dict]:
    """Any trained encoder -> (backbone in eval mode, info): a Lightning ``.ckpt``, an exported
    ``.safetensors`` (with its ``.json``), or a Hugging Face-style folder. ``random_init`` keeps a Lightning
    checkpoint's architecture and the objective's own initialisation (seeded) but not its weights."""
    path = Path(path)
    if path.suffix == ".ckpt":
        ckpt = read_checkpoint(path)
        if not random_init and any(k.startswith(BACKBONE_PREFIX) for k in ckpt["state_dict"]):
            cfg, backbone, _ = load_backbone(path)  # a timm encoder: nothing else of the objective is built
            return backbone, encoder_info(cfg)
        # another encoder (iGPT's), or the objective's own initialisation: the objective is built and asked
        encoder = encoder_of(objective_from_checkpoint(path, random_init=random_init, seed=seed), str(path))
        info = encoder_info(checkpoint_config(path, ckpt))
        for key, attribute in (("img_size", "input_size"), ("architecture", "architecture")):  # iGPT's own
            info[key] = getattr(encoder, attribute, info[key])
        return encoder.eval(), info
    if random_init:
        raise CheckpointError(
            f"{path}: random_init needs a Lightning checkpoint (.ckpt), which holds the config"
        )
    return load_exported(path)
