"""Objectives and encoders from files, rebuilt through the objective table (``objectives.py``): a pretraining
checkpoint's run and objective (:func:`read_run`, :func:`objective_from_checkpoint`, and
:func:`objective_from_config` for ``PretrainModule.load_from_checkpoint``), any trained encoder
(:func:`load_encoder`), and continued pretraining's starting weights (:func:`load_pretrained_backbone`).
The files themselves are read by ``mmssl.checkpoints`` (the only ``torch.load``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from mmssl import config as C
from mmssl.backbones import Backbone
from mmssl.checkpoints import (
    CheckpointError,
    load_exported,
    load_matching,
    load_state_checked,
    read_checkpoint,
    read_encoder_weights,
    strip_prefix,
)
from mmssl.factory.encoders import checkpoint_config, encoder_info, trained_encoder
from mmssl.factory.objectives import OBJECTIVES, spec_of
from mmssl.factory.spec import ObjectiveSpec


def encoder_weights(path: str | Path, where: str) -> dict[str, torch.Tensor]:
    """The timm state dict of any local encoder file: a pretraining ``.ckpt`` (its spec's encoder), an export
    or a plain timm state dict (``checkpoints.read_encoder_weights``)."""
    if not str(path).endswith(".ckpt") or C.is_hub_name(str(path)):
        return read_encoder_weights(path, where)
    ckpt, cfg, spec = read_run(path)
    state = strip_prefix(ckpt["state_dict"], f"objective.{spec.encoder}.model.") if spec.timm_encoder else {}
    if spec.encoder is None or not state:
        raise CheckpointError(
            f"{where}: the {cfg.objective!r} objective of this checkpoint has no timm encoder weights "
            f"(no 'objective.{spec.encoder}.model.*')"
        )
    return state


def load_pretrained_backbone(objective: nn.Module, cfg: DictConfig) -> dict[str, list[str]]:
    """Continued pretraining (``backbone.weights``): a freshly built objective (after its own initialisation)
    takes the encoder weights of that file (:func:`encoder_weights`); missing and unexpected keys are reported,
    a shape mismatch is an error naming the key. A ``.ckpt`` of the same objective whose other weights fit
    (MAE's decoder, SimCLR's projection head, CLIP's text tower) brings those too: the run continues that
    pretraining, with a new optimizer and schedule from step 0."""
    path, spec = cfg.backbone.weights, spec_of(cfg)
    where = f"config key 'backbone.weights': {path}"
    backbone = getattr(objective, spec.encoder, None) if spec.encoder and spec.timm_encoder else None
    if not hasattr(backbone, "model"):
        raise C.ConfigError(
            f"{where}: the {cfg.objective!r} objective as configured has no timm backbone to start from (only "
            "objectives that train an mmssl ViT/CNN backbone do; CLIP needs clip.image_tower=backbone)"
        )
    report = load_matching(backbone.model, encoder_weights(path, where), where)
    rest, why = {}, "only a pretraining .ckpt of the same objective has them"
    if str(path).endswith(".ckpt"):
        ckpt = read_checkpoint(path)
        prefix = f"{spec.encoder}.model."
        rest = {k.removeprefix("objective."): v for k, v in ckpt["state_dict"].items()}
        rest = {k: v for k, v in rest.items() if not k.startswith(prefix)}
        own = {k: v for k, v in objective.state_dict().items() if not k.startswith(prefix)}
        source = ckpt["hyper_parameters"]["config"].get("objective", C.Config.objective)
        if source != cfg.objective:
            rest, why = {}, f"the checkpoint is of another objective ({source})"
        elif rest.keys() != own.keys() or any(v.shape != own[k].shape for k, v in rest.items()):
            rest, why = {}, "they do not fit this config"
        objective.load_state_dict(rest, strict=False)
    print(f"mmssl: backbone.weights={path}: {report['loaded']} of {len(backbone.model.state_dict())} backbone "
          f"tensors loaded; missing (kept at init): {report['missing'] or 'none'}; unexpected (ignored): "
          f"{report['unexpected'] or 'none'}; the objective's other weights: "
          f"{f'{len(rest)} tensors loaded too' if rest else f'at init ({why})'}")  # fmt: skip
    return report | {"other_weights": sorted(rest)}


def read_run(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict, DictConfig, ObjectiveSpec]:
    """(checkpoint, its run config, its objective's spec); the config's ``weight_files`` keys are reset to
    null: the checkpoint's weights hold what those files provided, and they need not exist here."""
    ckpt = read_checkpoint(path)
    # backbone.weights: the run's starting point, already inside the checkpoint's weights
    try:  # the spec of the config as saved, not yet validated (a composition's weight files are its parts')
        raw = OmegaConf.merge(OmegaConf.structured(C.Config), ckpt["hyper_parameters"]["config"])
        reset = ("backbone.weights", *spec_of(raw).weight_files)
    except (OmegaConfBaseException, C.ConfigError, KeyError):
        reset = ("backbone.weights",)  # the config check below names what is wrong
    cfg = checkpoint_config(path, ckpt, overrides, reset)
    return ckpt, cfg, spec_of(cfg)


def objective_from_config(config: dict, source: str = "given to PretrainModule") -> nn.Module:
    """A freshly built objective from a checkpoint's saved run config (``hyper_parameters.config``), before its
    weights are loaded; its spec's ``weight_files`` are reset as for :func:`objective_from_checkpoint`.
    ``PretrainModule.load_from_checkpoint(path)``'s factory (installed by ``mmssl.factory``: lit.py may not
    import the factory)."""
    spec = OBJECTIVES.get(config.get("objective", C.Config.objective))
    ckpt = {"hyper_parameters": {"config": config}}
    cfg = checkpoint_config(source, ckpt, (), spec.weight_files if spec is not None else ())
    return spec_of(cfg).build(cfg)


def objective_from_checkpoint(
    path: str | Path, overrides: Sequence[str] = (), random_init: bool = False, seed: int = 0
) -> tuple[nn.Module, DictConfig]:
    """(the objective of a pretraining checkpoint in eval mode, its run config): config and weights from the
    file, ``key=value`` ``overrides`` on top. ``random_init``: the same architecture at its own (seeded)
    initialisation, keeping only the checkpoint's ``data_buffers`` (an iGPT palette): the baseline of a probe."""
    ckpt, cfg, spec = read_run(path, overrides)
    return _rebuild(path, ckpt, cfg, spec, random_init, seed), cfg


def _rebuild(
    path, ckpt: dict, cfg: DictConfig, spec: ObjectiveSpec, random_init: bool, seed: int
) -> nn.Module:
    torch.manual_seed(seed)
    objective = spec.build(cfg)
    state = {k.removeprefix("objective."): v for k, v in ckpt["state_dict"].items()}
    if random_init:
        kept = {k: v for k, v in state.items() if k.startswith(spec.data_buffers)}
        state = {**objective.state_dict(), **kept}
    load_state_checked(
        objective, state, f"checkpoint {path}", f"the {cfg.objective!r} objective of its config"
    )
    return objective.eval()


def load_encoder(path: str | Path, random_init: bool = False, seed: int = 0) -> tuple[Backbone, dict]:
    """Any trained encoder -> (backbone in eval mode, info): a Lightning ``.ckpt`` (info: image size, mean/std,
    interpolation, objective, plus the run ``config`` and ``global_step``), an exported ``.safetensors`` (with
    its ``.json``), or a Hugging Face-style folder. ``random_init`` keeps a Lightning checkpoint's architecture
    and the objective's own initialisation (seeded) but not its weights."""
    path = Path(path)
    if path.suffix != ".ckpt":
        if random_init:
            raise CheckpointError(
                f"{path}: random_init needs a Lightning checkpoint (.ckpt), which holds the config"
            )
        return load_exported(path)
    ckpt, cfg, spec = read_run(path)
    if spec.encoder is None:
        raise CheckpointError(
            f"checkpoint {path}: the {cfg.objective!r} objective trains no image encoder to evaluate or export"
        )
    if not random_init and spec.timm_encoder:
        return trained_encoder(path, ckpt, cfg, spec.encoder)
    # the objective's own initialisation, or an encoder that is not a timm model: the objective is rebuilt
    objective = _rebuild(path, ckpt, cfg, spec, random_init=random_init, seed=seed)
    encoder = getattr(objective, spec.encoder).eval()
    step = 0 if random_init else int(ckpt.get("global_step", -1))
    info = {**encoder_info(cfg), "config": C.to_dict(cfg), "global_step": step}
    for key, attribute in (("img_size", "input_size"), ("architecture", "architecture")):  # an encoder's own
        info[key] = getattr(encoder, attribute, info[key])
    return encoder, info
