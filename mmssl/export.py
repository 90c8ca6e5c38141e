"""Checkpoints in and encoders out: the one place where mmssl reads weight files.

* :func:`read_checkpoint` opens a Lightning checkpoint with ``torch.load(weights_only=True)`` only, so a
  checkpoint carrying pickled code is refused with a message instead of being executed.
* :func:`export_backbone` writes an objective's encoder (``objective.backbone.model``, an untouched timm model)
  as ``NAME.safetensors`` in timm's own layout plus a ``NAME.json`` sidecar (architecture, timm arguments, image
  size, mean/std, objective), and a Hugging Face-style folder (``config.json`` + ``model.safetensors``, written
  by timm's ``save_for_hf``). Both load with plain timm, no mmssl needed::

      timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file="NAME.safetensors", num_classes=0),
                        **model_args)                      # model_args from NAME.json
      timm.create_model("local-dir:NAME_hf", pretrained=True)

  MAE's fixed sin-cos ``pos_embed`` is part of the state dict, so it travels with the weights.
* :func:`load_exported` reads either form back as a backbone (``mmssl.backbones`` contract).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from mmssl.backbones import Backbone, CNNBackbone, ViTBackbone
from mmssl.config import HUB_REFUSED, is_hub_name

FORMAT = "mmssl-backbone/1"
BACKBONE_PREFIX = "objective.backbone.model."  # Lightning state_dict key prefix of the timm encoder


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and the problem."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint written by ``tools/pretrain.py`` as a plain dict, loaded with ``weights_only=True``.

    It must hold ``state_dict`` and the resolved run config at ``hyper_parameters.config``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True refuses any pickled global outside torch's allow-list (os.system, custom classes...)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        blocked = next((ln for ln in lines if "GLOBAL" in ln), None)
        if blocked is None:
            detail = next(
                (ln for ln in lines if "Unsupported" in ln or "invalid" in ln.lower()), lines[-1:] or "?"
            )
            raise CheckpointError(f"checkpoint {path}: not a readable torch checkpoint ({detail})") from None
        raise CheckpointError(
            f"checkpoint {path} was refused: it is not a plain weights file and would run code from its "
            f"pickle to load ({blocked}). mmssl loads checkpoints with torch.load(weights_only=True) only; "
            "do not load this file from a source you do not trust."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: not a readable torch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"checkpoint {path}: no 'state_dict' (not a Lightning checkpoint from tools/pretrain.py)"
        )
    config = ckpt.get("hyper_parameters", {}).get("config")
    if not isinstance(config, dict):
        raise CheckpointError(
            f"checkpoint {path}: no run config at hyper_parameters.config (written by tools/pretrain.py)"
        )
    return ckpt


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def load_state_checked(module: nn.Module, state: Mapping[str, Tensor], source: str, what: str) -> None:
    """``module.load_state_dict(state)`` that explains a mismatch (another architecture, a bad prefix...)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise CheckpointError(
            f"{source}: the weights do not fit {what}; it looks like a checkpoint of another architecture or "
            f"size: {'; '.join(parts)}"
        )
    module.load_state_dict(state, strict=True)


def read_encoder_weights(path: str | Path, where: str | None = None) -> dict[str, Tensor]:
    """The timm state dict of an encoder file: a pretraining checkpoint's encoder (``objective.backbone.model.*``),
    an export of :func:`export_backbone` (``.safetensors`` with its ``.json``, or a ``save_for_hf`` folder), or a
    plain timm state dict (``.safetensors``, ``.pth``, ``.bin``; torch files read with ``weights_only=True``).
    Local files only: a model-hub name is refused before anything is looked up."""
    where = where or str(path)
    if is_hub_name(str(path)):
        raise CheckpointError(f"{where}: {HUB_REFUSED}")
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{where}: no such file or folder (local files only; nothing is downloaded)")
    if p.suffix == ".ckpt":
        state = strip_prefix(read_checkpoint(p)["state_dict"], BACKBONE_PREFIX)
        if not state:
            raise CheckpointError(
                f"{where}: no timm encoder weights in the checkpoint (no '{BACKBONE_PREFIX}*')"
            )
        return state
    if p.is_dir():
        p = p / "model.safetensors"  # save_for_hf's weights
    elif p.with_suffix(".json").is_file():
        read_sidecar(p)  # an export: its sidecar must be ours
    try:
        return timm.models.load_state_dict(str(p), weights_only=True)
    except Exception as e:  # safetensors and torch raise many types for a file that is not a state dict
        raise CheckpointError(f"{where}: not a readable state dict ({type(e).__name__}: {e})") from None


def load_matching(module: nn.Module, state: Mapping[str, Tensor], where: str) -> dict[str, Any]:
    """Load the keys of ``state`` that ``module`` has; ``{"loaded", "missing", "unexpected"}``. A shared key of
    another shape (another size or architecture) is an error naming it, as is a file sharing no key at all."""
    own = module.state_dict()
    shapes = [f"{k} {tuple(v.shape)} in the file vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]  # fmt: skip
    if shapes:
        more = f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""
        raise CheckpointError(
            f"{where}: shape mismatch: {'; '.join(shapes[:3])}{more} (another size or architecture)"
        )
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if len(missing) == len(own):
        raise CheckpointError(
            f"{where}: none of its {len(state)} tensors is a weight of {type(module).__name__}"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return {"loaded": len(own) - len(missing), "missing": missing, "unexpected": unexpected}


def wrap(model: nn.Module, img_size: int) -> Backbone:
    """A timm model -> the backbone contract (as ``create_backbone`` does for a fresh one)."""
    return ViTBackbone(model) if isinstance(model, VisionTransformer) else CNNBackbone(model, img_size)


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
    out = Path(out).with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = backbone.model
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
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def read_sidecar(weights: str | Path) -> dict[str, Any]:
    weights = Path(weights)
    path = weights.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"{weights}: no sidecar {path.name} beside it (written by tools/export.py)")
    sidecar = json.loads(path.read_text())
    if sidecar.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {sidecar.get('format')!r}, expected {FORMAT!r}")
    return sidecar


def load_exported(path: str | Path) -> tuple[Backbone, dict[str, Any]]:
    """``NAME.safetensors`` (with ``NAME.json``) or a ``save_for_hf`` folder -> (backbone in eval mode, info).

    ``info`` has ``architecture``, ``img_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``,
    ``objective``. The weights are checked against the architecture with a readable message.
    """
    path = Path(path)
    if path.is_dir():
        return _load_hf_folder(path)
    if not path.is_file():
        raise CheckpointError(f"exported weights {path}: no such file")
    sidecar = read_sidecar(path)
    model = timm.create_model(sidecar["architecture"], pretrained=False, **sidecar["model_args"])
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    what = f"timm model {sidecar['architecture']!r} (from {path.with_suffix('.json').name})"
    load_state_checked(model, state, str(path), what)
    return wrap(model, sidecar["img_size"]).eval(), sidecar


def _load_hf_folder(folder: Path) -> tuple[Backbone, dict[str, Any]]:
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: no config.json (not a folder written by tools/export.py / save_for_hf)"
        )
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except RuntimeError as e:  # timm's strict load: missing / unexpected keys, size mismatches
        first = str(e).splitlines()[0][:300]
        raise CheckpointError(
            f"{folder}: the weights do not fit its config.json architecture ({first})"
        ) from None
    cfg = model.pretrained_cfg
    config = json.loads((folder / "config.json").read_text())
    info = {
        "architecture": config["architecture"],
        "img_size": cfg["input_size"][-1],
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": cfg.get("crop_pct", 0.875),
        "objective": config.get("mmssl", {}).get("objective", ""),
    }
    return wrap(model, info["img_size"]).eval(), info


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
    expected = (backbone.model(x) if num_classes else backbone.forward_pooled(x)).cpu()
    backbone.train(was_training)
    diffs = {}
    for name, model in loaded.items():
        got = model.eval().to(device)(x).cpu()  # num_classes=0: forward() = pooled features
        diffs[name] = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    return diffs
