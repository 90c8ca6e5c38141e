"""Encoders out: an objective's encoder as weights that plain timm loads (reading them back is
``checkpoints.py``'s job).

* :func:`export_backbone` writes an objective's encoder (``objective.backbone.model``, an untouched timm model)
  as ``NAME.safetensors`` in timm's own layout plus a ``NAME.json`` sidecar (architecture, timm arguments, image
  size, mean/std, objective), and a Hugging Face-style folder (``config.json`` + ``model.safetensors``, written
  by timm's ``save_for_hf``). Both load with plain timm, no mmssl needed, and the folder with transformers
  (``AutoModel``, ``AutoImageProcessor``, ``pipeline("image-feature-extraction")``; ``interop/hf_timm.py``)::

      timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file="NAME.safetensors", num_classes=0),
                        **model_args)                      # model_args from NAME.json
      timm.create_model("local-dir:NAME_hf", pretrained=True)

  MAE's fixed sin-cos ``pos_embed`` is part of the state dict, so it travels with the weights.
* :func:`round_trip_diff` reloads an export through plain timm and compares features with the source.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from mmssl import linear
from mmssl.backbones import Backbone
from mmssl.checkpoints import FORMAT, read_sidecar


def timm_args(model: nn.Module, keep_head: bool = False) -> dict[str, Any]:
    """The keyword arguments timm needs to rebuild ``model``'s architecture (drop rates left out), without its
    classifier (``num_classes=0``) unless ``keep_head`` (a fine-tuned classifier).

    timm records them on the model at ``create_model`` (``_model_args``); :func:`export_backbone` reloads the
    export through timm and compares features, so a drift here fails at export time, never silently.
    """
    args = dict(getattr(model, "_model_args", {}))
    args = {k: v for k, v in args.items() if not ("drop" in k and k.endswith("_rate"))}  # training only
    args["num_classes"] = model.num_classes if keep_head else 0
    return args


def export_backbone(
    backbone: Backbone,
    out: str | Path,
    *,
    img_size: int,
    mean: list[float],
    std: list[float],
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    objective: str = "",
    extra: dict[str, Any] | None = None,
    hf_folder: bool = True,
    keep_head: bool = False,
) -> dict[str, Any]:
    """Write ``out.safetensors`` + ``out.json`` (+ ``out_hf/``); return the sidecar dict. ``keep_head``: the
    timm model's classifier is part of the export (a fine-tuned model; ``model_args.num_classes`` says so)."""
    model = getattr(backbone, "model", None)
    if not hasattr(model, "default_cfg"):  # e.g. iGPT's encoder over palette ids (ObjectiveSpec.timm_encoder)
        raise ValueError(
            f"a {type(backbone).__name__} is not a timm model: only timm encoders (ViTs, CNNs) export to timm"
        )
    out = Path(out).with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = out.with_suffix(".safetensors")
    save_file(state, weights, metadata={"format": FORMAT, "architecture": model.default_cfg["architecture"]})
    sidecar = {
        "format": FORMAT,
        "architecture": model.default_cfg["architecture"],
        "model_args": timm_args(model, keep_head),
        "img_size": img_size,
        "mean": list(mean),
        "std": list(std),
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "objective": objective,
        "num_features": backbone.embed_dim,
        "weights": weights.name,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        **(extra or {}),
    }
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")
    if hf_folder:
        _save_hf_folder(model, Path(f"{out}_hf"), sidecar)
    return sidecar


def _save_hf_folder(model: nn.Module, folder: Path, sidecar: dict[str, Any]) -> None:
    """timm's ``save_for_hf`` (config.json + model.safetensors), loadable as ``local-dir:FOLDER``."""
    from timm.models import save_for_hf

    size = sidecar["img_size"]
    data = {
        "input_size": (3, size, size),
        "mean": tuple(sidecar["mean"]),
        "std": tuple(sidecar["std"]),
        "interpolation": sidecar["interpolation"],
        "crop_pct": sidecar["crop_pct"],
    }
    mmssl_info = {k: sidecar[k] for k in ("objective", "format") if k in sidecar}
    save_for_hf(
        model, str(folder), model_config={"mmssl": mmssl_info}, safe_serialization=True, data_config=data
    )
    # The template pretrained_cfg describes timm's own weights for this architecture (tag, licence, paper);
    # none of that is true of ours.
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("tag", "license", "paper_ids", "paper_name", "origin_url", "notes", "hf_hub_id"):
        config["pretrained_cfg"].pop(key, None)
    config["pretrained_cfg"]["tag"] = f"mmssl_{sidecar['objective'] or 'export'}"
    # transformers' TimmWrapperModel passes num_classes itself: one in model_args too is a TypeError there
    # (interop/hf_timm.py); timm's local-dir loader reads the top-level num_classes (0) instead.
    config.get("model_args", {}).pop("num_classes", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def round_trip_diff(backbone: Backbone, out: str | Path, batch: int = 2) -> dict[str, float]:
    """Reload an export through plain timm (both forms) and compare pooled features with ``backbone``'s on
    the same random images: max absolute difference per form (0.0 when the export is exact)."""
    out = Path(out).with_suffix("")
    sidecar = read_sidecar(out.with_suffix(".safetensors"))
    num_classes = sidecar["model_args"].get("num_classes", 0)  # a classifier compares logits
    overlay = {"file": str(out.with_suffix(".safetensors")), "num_classes": num_classes}
    loaded = {
        "safetensors": timm.create_model(
            sidecar["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **sidecar["model_args"]
        )
    }
    hf = Path(f"{out}_hf")
    if hf.is_dir():
        loaded["hf_folder"] = timm.create_model(f"local-dir:{hf}", pretrained=True)
    size = sidecar["img_size"]
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    x = images.to(device)
    with linear.library(
        "blas"
    ):  # plain timm's kernels (mmssl/linear.py), so an exact export is bit-identical
        expected = (backbone.model(x) if num_classes else backbone.forward_pooled(x)).cpu()
    backbone.train(was_training)
    diffs = {}
    for name, model in loaded.items():
        got = model.eval().to(device)(x).cpu()  # num_classes=0: forward() = pooled features
        diffs[name] = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    return diffs
