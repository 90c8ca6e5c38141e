"""A composition's spec from its parts' specs (DESIGN.md §9; the objective is ``objectives/compose.py``): the parts
are built from their own config sections and share the first one's encoder; the views are the union of the
parts' views (each makes its own batch keys); text handling, weight files and data buffers are the parts'.
Generic: the parts come in as ``{name: weight}`` and the objective table, never by name."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig
from PIL import Image
from torch import nn

from mmssl import config as C
from mmssl.data.transforms import UnionView, View
from mmssl.factory.encoders import img_size
from mmssl.factory.spec import ObjectiveSpec
from mmssl.objectives.compose import Compose


def _parts(
    weights: Mapping[str, float], table: Mapping[str, ObjectiveSpec], key: str
) -> dict[str, ObjectiveSpec]:
    specs = {}
    for name in weights:
        spec = table[name]
        shares = spec.encoder == "backbone" and spec.timm_encoder  # a timm image backbone the parts can share
        if spec.resolve is not None or not shares or spec.save_parts is not None:
            raise C.ConfigError(
                f"config key '{key}': {name!r} cannot be a part (a part trains the shared timm image encoder at "
                ".backbone and is no composition itself)"
            )
        specs[name] = spec
    return specs


def compose_objective(cfg: DictConfig, weights: Mapping[str, float], table, key: str) -> nn.Module:
    parts = {name: spec.build(cfg) for name, spec in _parts(weights, table, key).items()}
    return Compose(parts, {name: float(w) for name, w in weights.items()})


def compose_views(cfg: DictConfig, weights: Mapping[str, float], table, key: str) -> tuple[View, View]:
    """(train, validation) views: each the union of the parts' views of the same picture. Two parts whose views
    make the same batch key are refused here, before any data work."""
    pairs = [spec.views(cfg) for spec in _parts(weights, table, key).values()]
    train, val = UnionView([t for t, _ in pairs]), UnionView([v for _, v in pairs])
    try:
        train(Image.new("RGB", (img_size(cfg),) * 2))
    except ValueError as e:
        raise C.ConfigError(f"config key '{key}': {e}") from None
    return train, val


def compose_spec(weights: Mapping[str, float], table, key: str, build, views) -> ObjectiveSpec:
    """The spec of one composition: ``build``/``views`` the composition's own; text, weight files and data
    buffers (under ``parts.<name>.``) from the parts."""
    parts = _parts(weights, table, key)
    texts = {spec.text for spec in parts.values()} - {"none"}
    if len(texts) > 1:
        raise C.ConfigError(f"config key '{key}': parts read captions as both {sorted(texts)}")
    tokenizers = [spec.tokenizer for spec in parts.values() if spec.tokenizer is not None]
    return ObjectiveSpec(
        build,
        views,
        text=texts.pop() if texts else "none",
        tokenizer=tokenizers[0] if tokenizers else None,
        weight_files=tuple(dict.fromkeys(f for spec in parts.values() for f in spec.weight_files)),
        data_buffers=tuple(f"parts.{n}.{b}" for n, spec in parts.items() for b in spec.data_buffers),
    )
