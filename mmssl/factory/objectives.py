"""The objective table: one :class:`ObjectiveSpec` per objective (its builder, views, text handling, encoder,
checkpoint fix-ups). ``loading.py`` rebuilds the objectives and encoders inside checkpoints through it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmssl import config as C
from mmssl.checkpoints import (
    load_backbone_weights,
)
from mmssl.data.transforms import (
    View,
    clip_view,
    eval_view,
    igpt_view,
    llava_view,
    mae_view,
    simclr_view,
)
from mmssl.factory.compose import compose_objective, compose_spec, compose_views
from mmssl.factory.encoders import (
    build_backbone,
    img_size,
)
from mmssl.factory.exports import IMAGE_GPT, LLAVA, VIT_MAE, open_clip_format
from mmssl.factory.spec import ObjectiveSpec
from mmssl.heads import ProjectionHead
from mmssl.interop.openclip import tower_configs
from mmssl.objectives.clip import (
    CLIP,
    clip_tokenizer,
    open_clip_model,
    open_clip_text_tower,
)
from mmssl.objectives.igpt import ImageGPT
from mmssl.objectives.masked import MaskedModeling, mae
from mmssl.objectives.siglip import siglip
from mmssl.objectives.simclr import SimCLR
from mmssl.sequence import SequenceTransformer
from mmssl.targets.hog import HOGTarget
from mmssl.targets.multi import MultiTarget
from mmssl.targets.palette import Palette
from mmssl.targets.pixels import PixelTarget
from mmssl.vlm.decoders import load_decoder
from mmssl.vlm.llava import LLaVA
from mmssl.vlm.parts import MANIFEST, load_parts, load_vision_tower, save_parts
from mmssl.vlm.projector import Projector, load_projector
from mmssl.vlm.prompt import PromptEncoder
from mmssl.vlm.vision import VisionTower, create_encoder


def _mask_key(key: str, make):
    """``make()``, with MaskedModeling's mask-ratio refusal (a ValueError) as a ConfigError naming ``key``."""
    try:
        return make()
    except ValueError as e:
        if not str(e).startswith("mask_ratio="):
            raise
        raise C.ConfigError(f"config key '{key}': {e} (backbone.img_size / patch size)") from None


def _mae(cfg: DictConfig) -> nn.Module:
    m = cfg.mae
    backbone = build_backbone(cfg)
    return _mask_key("mae.mask_ratio", lambda: mae(
        backbone,
        mask_ratio=m.mask_ratio,
        norm_pix_loss=m.norm_pix_loss,
        decoder_embed_dim=m.decoder_embed_dim,
        decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads,
    ))  # fmt: skip


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
        from mmssl.factory.loading import load_encoder  # here: loading.py reads this table

        backbone, info = load_encoder(o.vision)
        encoder, spec = backbone.model, _timm_spec(OmegaConf.create(info["config"]))
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
        "image_aspect_ratio": o.image_aspect_ratio,
    }
    return LLaVA(vision, projector, decoder, prompt, train_decoder=o.train_decoder, image_processing=image)


def _clip_towers(cfg: DictConfig) -> tuple[nn.Module, nn.Module, float]:
    """(image tower, text tower, initial logit scale) from the ``clip`` section (CLIP's, SigLIP's)."""
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
            load_backbone_weights(backbone, c.backbone_weights, "clip.backbone_weights")
        image_tower = backbone  # + a linear projection into the text tower's joint space, in CLIP
    return image_tower, text_tower, scale


def _clip(cfg: DictConfig) -> nn.Module:
    c = cfg.clip
    image_tower, text_tower, scale = _clip_towers(cfg)
    return CLIP(
        image_tower,
        text_tower,
        logit_scale=scale,
        max_logit_scale=c.max_logit_scale,
        image_mask_ratio=c.image_mask_ratio,
    )


def _siglip(cfg: DictConfig) -> nn.Module:
    c, s = cfg.clip, cfg.siglip
    image_tower, text_tower, _ = _clip_towers(cfg)  # a pretrained CLIP's softmax temperature is not SigLIP's
    return siglip(
        image_tower,
        text_tower,
        logit_scale=s.init_logit_scale,
        logit_bias=s.init_logit_bias,
        max_logit_scale=c.max_logit_scale,
        image_mask_ratio=c.image_mask_ratio,
    )


def _open_clip_config(cfg: DictConfig) -> dict:
    """The open_clip model config of a CLIP run (its export format, ``factory/exports.py``)."""
    c = cfg.clip
    return tower_configs(
        c.model, text_cfg=dict(c.text_cfg), vision_cfg=dict(c.vision_cfg), embed_dim=c.embed_dim,
        image_size=img_size(cfg),
    )  # fmt: skip


def _maskfeat(cfg: DictConfig) -> nn.Module:
    m = cfg.maskfeat
    backbone = build_backbone(cfg)  # learned position embedding, timm's trunc-normal init (as SlowFast's ViT)
    hog = HOGTarget(
        backbone.patch_size,
        cell_size=m.cell_size,
        nbins=m.nbins,
        gradient=m.gradient,
        gaussian_window=m.gaussian_window,
    )
    # pixel: the patch's colours as the network sees them (dataset-normalised, no per-patch normalisation), our
    # reading of MaskFeat's pixel-colour target (§4.1, Table 1)
    made = {"hog": hog, "pixel": PixelTarget(backbone.patch_size, normalize=False)}
    targets = {name: made[name] for name in m.targets}
    target = targets[m.targets[0]] if len(targets) == 1 else MultiTarget(targets)
    return _mask_key("maskfeat.mask_ratio", lambda: MaskedModeling(  # the default linear head on every patch token
        backbone,
        target,
        mask="block",
        mask_ratio=m.mask_ratio,
        min_block=m.min_block,
        min_aspect=m.min_aspect,
        decay_mask_token=m.mask_token_weight_decay,
    ))  # fmt: skip


def _simclr(cfg: DictConfig) -> nn.Module:
    s, backbone = cfg.simclr, build_backbone(cfg)
    head = ProjectionHead(
        backbone.embed_dim,
        s.proj_hidden_dim or backbone.embed_dim,  # SimCLR §2.1: the hidden layer as wide as h
        s.proj_out_dim,
        num_layers=s.proj_num_layers,
        last_bn=s.proj_last_bn,
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
    view = llava_view(
        img_size(cfg), d.interpolation, tuple(d.mean), tuple(d.std), cfg.llava.image_aspect_ratio
    )
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
    scale = tuple(s.crop_scale if s.crop_scale is not None else d.crop_scale)
    hflip = s.hflip if s.hflip is not None else d.hflip
    view = simclr_view(
        img_size(cfg), scale, d.interpolation, hflip, color_jitter=s.color_jitter,
        blur_p=s.blur_p, mean=tuple(d.mean), std=tuple(d.std),
    )  # fmt: skip
    return view, view


def _igpt_views(cfg: DictConfig):
    d, g = cfg.data, cfg.igpt
    norm = {"interpolation": d.interpolation, "mean": tuple(d.mean), "std": tuple(d.std)}
    return igpt_view(g.resolution, tuple(g.resize_range), **norm), eval_view(
        g.resolution, crop_pct=1.0, **norm
    )


def _clip_tokenizer(cfg: DictConfig):
    """open_clip's tokenizer at the text tower's context length (``clip.text_cfg.context_length`` or the model's)."""
    return clip_tokenizer(cfg.clip.model, cfg.clip.text_cfg.get("context_length"))


def _compose(cfg: DictConfig) -> nn.Module:
    return compose_objective(cfg, cfg.compose.objectives, OBJECTIVES, "compose.objectives")


def _compose_views(cfg: DictConfig):
    return compose_views(cfg, cfg.compose.objectives, OBJECTIVES, "compose.objectives")


def _compose_spec(cfg: DictConfig) -> ObjectiveSpec:
    return compose_spec(cfg.compose.objectives, OBJECTIVES, "compose.objectives", _compose, _compose_views)


# The objective table: one spec per objective (spec.py says what each field means). Adding an objective adds its
# builder and views above and one entry here, its config section (config/objectives.py) and its recipe.
OBJECTIVES: dict[str, ObjectiveSpec] = {
    "mae": ObjectiveSpec(_mae, _mae_views, exports={"vitmae": VIT_MAE}),
    "llava": ObjectiveSpec(
        _llava,
        _llava_views,
        text="strings",
        encoder=None,
        save_parts=save_parts,
        # LLaVA's chat stage trains on text-only conversations too (part of the 665K mix); a caption needs its picture
        image_optional=lambda cfg: cfg.llava.conversation == "chat",
        exports={"llava": LLAVA},
        load_parts=load_parts,
    ),
    "clip": ObjectiveSpec(
        _clip,
        _clip_views,
        text="tokens",
        tokenizer=_clip_tokenizer,
        weight_files=("clip.pretrained", "clip.backbone_weights"),
        exports={"open_clip": open_clip_format(_open_clip_config)},
    ),
    # RandomResizedCrop(data.crop_scale: 0.5-1 for MaskFeat) + flip, as MAE's
    "maskfeat": ObjectiveSpec(_maskfeat, _mae_views),
    "simclr": ObjectiveSpec(_simclr, _simclr_views),
    # the palette is a buffer in the checkpoint (data, kept by a random-init baseline); its file need not exist.
    # Its encoder (.backbone, an IGPTEncoder over palette-id sequences) is read from the rebuilt objective.
    "igpt": ObjectiveSpec(
        _igpt,
        _igpt_views,
        timm_encoder=False,
        weight_files=("igpt.palette",),
        data_buffers=("palette.",),
        exports={"imagegpt": IMAGE_GPT},
    ),
    # CLIP's towers, views and tokenizer (the clip section) with the sigmoid loss
    "siglip": ObjectiveSpec(
        _siglip,
        _clip_views,
        text="tokens",
        tokenizer=_clip_tokenizer,
        weight_files=("clip.pretrained", "clip.backbone_weights"),
    ),
    # several objectives on one encoder (SLIP: clip + simclr); text, weight files... are the parts'
    "compose": ObjectiveSpec(_compose, _compose_views, resolve=_compose_spec),
}


def spec_of(cfg: DictConfig) -> ObjectiveSpec:
    spec = OBJECTIVES[cfg.objective]
    return spec if spec.resolve is None else spec.resolve(cfg)


def build_views(cfg: DictConfig) -> tuple[View, View]:
    """(train view, validation view) of the config's objective."""
    return spec_of(cfg).views(cfg)


def build_tokenizer(cfg: DictConfig):
    """The caption tokenizer of an objective that reads token ids (``text="tokens"``, e.g. CLIP)."""
    spec = spec_of(cfg)
    if spec.tokenizer is None:
        raise C.ConfigError(f"config key 'objective': {cfg.objective!r} reads no caption tokens")
    return spec.tokenizer(cfg)
