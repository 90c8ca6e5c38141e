"""What shared code needs to know about one objective (DESIGN.md §9): one :class:`ObjectiveSpec` per entry of
the objective table (``objectives.py``). The data module, checkpoint loading, evaluation and the tools ask the
spec; none of them compares objective names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from mmssl.data.transforms import View
from mmssl.factory.exports import ExportFormat

# How an objective reads the captions of image-text shards (``.txt``), i.e. which batch key it needs
# (objectives/base.py, BATCH_KEYS): none; "tokens", (B, L) int64 ids made in the data workers by the spec's
# tokenizer (samples without a caption are skipped); "strings", the ``caption`` list[str] that the objective
# tokenises itself (LLaVA: the decoder owns its tokenizer).
TEXT_KINDS = ("none", "tokens", "strings")


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective, as the rest of mmssl sees it.

    * ``build(cfg) -> nn.Module``: the objective from its config section (and ``backbone``, ``data``...).
    * ``views(cfg) -> (train_view, val_view)``: per-image transforms producing the batch keys it reads.
    * ``text``, ``tokenizer(cfg) -> str | list[str] -> (L,) | (B, L) ids``: see ``TEXT_KINDS``; a tokenizer
      is given exactly when ``text == "tokens"``.
    * ``encoder``: the attribute holding the image encoder that evaluation and export use (a
      ``mmssl.backbones`` backbone, state-dict keys ``<encoder>.model.*``), or None when it trains none.
    * ``timm_encoder``: whether that encoder is a timm ViT/CNN backbone (``backbones.py``): loaded from a
      checkpoint without building the objective, exported to timm, fine-tuned, and a source or target of
      continued pretraining (``backbone.weights``). False: another module behind the same contract (iGPT's
      ``IGPTEncoder``), which evaluation reads from the rebuilt objective and which export refuses.
    * ``weight_files``: config keys naming files whose contents become part of the objective's state dict
      (an iGPT palette, pretrained CLIP weights). A checkpoint holds them already, so they are reset to null
      when an objective is rebuilt from one: the files need not exist where the checkpoint is loaded.
    * ``data_buffers``: state-dict key prefixes that are data rather than learned weights (the iGPT palette);
      a "random init" baseline of a checkpoint keeps them.
    * ``save_parts(objective, directory, state_dict)``: called at every checkpoint to write files that other
      tools load without Lightning (LLaVA's projector and manifest), or None. ``state_dict`` is the
      checkpoint's gathered tensors (keys as in the objective's own ``state_dict()``): under FSDP the live
      parameters are shards.
    * ``image_optional(cfg)``: whether this config trains on samples without a picture (LLaVA's chat stage: the
      665K mix holds text-only conversations, trained on without image tokens); None: every sample needs one.
    * ``exports``: format name -> :class:`ExportFormat` (``exports.py``), the whole-objective formats
      ``tools/export.py`` writes for it (into ``PREFIX_<name>/``), besides the encoder formats (timm, hf, vit)
      every objective with an ``encoder`` gets. A writer still refuses, naming the setting, a configuration its
      format cannot express (``interop.Unsupported``).
    * ``load_parts(folder) -> nn.Module``: the inverse of ``save_parts`` (the objective, without Lightning,
      from a folder it wrote), so that ``tools/export.py`` exports such a folder too; or None.
    * ``resolve(cfg) -> ObjectiveSpec``: for an entry whose text handling, weight files... depend on its config
      (a composition: its parts'); ``factory.spec_of(cfg)`` returns the resolved spec. None: this spec as it is.
    """

    build: Callable[[DictConfig], nn.Module]
    views: Callable[[DictConfig], tuple[View, View]]
    text: str = "none"
    tokenizer: Callable[[DictConfig], Callable] | None = None
    encoder: str | None = "backbone"
    timm_encoder: bool = True
    weight_files: tuple[str, ...] = ()
    data_buffers: tuple[str, ...] = ()
    save_parts: Callable[[nn.Module, Path, dict], object] | None = None
    image_optional: Callable[[DictConfig], bool] | None = None
    exports: Mapping[str, ExportFormat] = field(default_factory=dict)
    load_parts: Callable[[Path], nn.Module] | None = None
    resolve: Callable[[DictConfig], ObjectiveSpec] | None = None

    def __post_init__(self) -> None:
        if self.text not in TEXT_KINDS:
            raise ValueError(f"ObjectiveSpec.text must be one of {TEXT_KINDS}, got {self.text!r}")
        if (self.text == "tokens") != (self.tokenizer is not None):
            raise ValueError('ObjectiveSpec: give a tokenizer exactly when text == "tokens"')
