"""The whole-objective export formats (``mmssl/interop/``) as :class:`ExportFormat` values that the objective table
hands to its entries (``ObjectiveSpec.exports``); ``tools/export.py`` writes, reports and checks them without
knowing which objective it holds. The interop modules import nothing the objective table has not imported
already (transformers and open_clip are loaded by the objectives and VLM decoders they convert)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from mmssl.interop import hf_igpt, hf_llava, hf_mae, hf_vit, openclip


@dataclass(frozen=True)
class ExportFormat:
    """``save(cfg, objective, folder) -> folder`` writes it (``cfg``: the run config, or None for a model
    rebuilt from saved parts); ``round_trip(objective, folder) -> max |output difference|`` loads it back with
    its own library; ``usage`` is the line that loads it, with ``{folder}`` and ``{name}`` (the folder's name)."""

    save: Callable[[DictConfig | None, nn.Module, Path], Path]
    round_trip: Callable[[nn.Module, Path], float]
    usage: str


def _image(cfg: DictConfig) -> dict:
    """The run's image settings, which the exported image processor / preprocess config carries."""
    d = cfg.data
    return {"mean": list(d.mean), "std": list(d.std), "interpolation": d.interpolation}


def _save_vitmae(cfg: DictConfig, objective: nn.Module, folder: Path) -> Path:
    return hf_vit.save_with_processor(
        hf_mae.to_vit_mae(objective), folder, **_image(cfg)
    )  # + ViTImageProcessor


VIT_MAE = ExportFormat(
    _save_vitmae, hf_mae.round_trip, "transformers.ViTMAEForPreTraining.from_pretrained('{folder}')"
)


def open_clip_format(model_cfg: Callable[[DictConfig], dict]) -> ExportFormat:
    """open_clip's checkpoint + model config; ``model_cfg(cfg)`` is the open_clip model config the run built
    (``interop.openclip.tower_configs``)."""

    def save(cfg: DictConfig, objective: nn.Module, folder: Path) -> Path:
        return openclip.save_open_clip(objective, folder, model_cfg(cfg), name=folder.name, **_image(cfg))

    usage = (
        "open_clip.create_model_and_transforms('local-dir:{folder}'), or open_clip.add_model_config("
        "'{folder}/{name}.json') and create_model_and_transforms('{name}', "
        "pretrained='{folder}/open_clip_model.safetensors')"
    )
    return ExportFormat(save, openclip.round_trip, usage)


def _save_imagegpt(cfg: DictConfig, objective: nn.Module, folder: Path) -> Path:
    return hf_igpt.save_imagegpt(objective, folder, interpolation=cfg.data.interpolation)


IMAGE_GPT = ExportFormat(
    _save_imagegpt,
    hf_igpt.round_trip,
    "transformers.ImageGPTForCausalImageModeling.from_pretrained('{folder}'), "
    "AutoImageProcessor.from_pretrained('{folder}')",
)


def _save_llava(cfg: DictConfig | None, objective: nn.Module, folder: Path) -> Path:
    return hf_llava.save_llava(
        objective, folder
    )  # everything it needs is in the model (prompt, image settings)


LLAVA = ExportFormat(
    _save_llava,
    hf_llava.round_trip,
    "transformers.LlavaForConditionalGeneration.from_pretrained('{folder}'), "
    "AutoProcessor.from_pretrained('{folder}')",
)
