"""Reading weight files: the one module that opens checkpoints and loads state dicts into modules.

* :func:`read_checkpoint` opens a Lightning checkpoint with ``torch.load(weights_only=True)`` only (the only
  ``torch.load`` in mmssl), so a checkpoint carrying pickled code is refused with a message instead of being
  executed.
* :func:`load_state_checked` loads a state dict and explains a mismatch (another architecture, a bad prefix);
  :func:`check_state_fits` does the same check on shapes alone (``--resume``, before Lightning loads the file).
* :func:`newest_readable`: the newest of several checkpoints that reads (resume falls back past a truncated one).
* :func:`load_exported` reads what ``export.py`` writes (``NAME.safetensors`` + ``NAME.json``, or a Hugging
  Face-style folder) back as a backbone (``mmssl.backbones`` contract).
* :func:`load_backbone_weights` loads a plain timm state dict file into a backbone (``clip.backbone_weights``).
* :func:`read_encoder_weights` and :func:`load_matching`: an encoder weight file of any local form, loaded
  leniently with a report (continued pretraining, ``backbone.weights``; a ``.ckpt`` is the objective table's).

Which objective a checkpoint holds, and where its encoder sits, is the objective table's business
(``factory.load_encoder``, ``factory.objective_from_checkpoint``); nothing here knows an objective.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import timm.models
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from mmssl.backbones import Backbone, as_backbone
from mmssl.config.paths import HUB_REFUSED, is_hub_name

FORMAT = "mmssl-backbone/1"  # the sidecar format written by export.py
OFFLINE = "mmssl never downloads weights: pass the path of a local file (download it beforehand)"


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
        refused = unsafe_refusal(path, e)
        if refused is not None:
            raise refused from None
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next(
            (ln for ln in lines if "Unsupported" in ln or "invalid" in ln.lower()), lines[-1:] or "?"
        )
        raise CheckpointError(f"checkpoint {path}: not a readable torch checkpoint ({detail})") from None
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


def unsafe_refusal(path: str | Path, exn: BaseException) -> CheckpointError | None:
    """mmssl's refusal when ``exn`` (or an exception it was raised from, e.g. inside transformers or timm) is
    ``torch.load(weights_only=True)`` refusing a pickled global (os.system, a custom class...); None otherwise.
    torch's own message advises ``weights_only=False``, which would run the file's code: never shown."""
    chain, seen = [], exn
    while seen is not None and len(chain) < 10:
        chain.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    blocked = None
    for text in chain:  # torch's own line: "Trying to load unsupported GLOBAL posix.system whose module ..."
        blocked = blocked or next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), None)
    for text in chain:  # timm's wording: "... Unsupported globals: posix.system. ..."
        found = re.search(r"[Uu]nsupported globals?: ([\w.]+(?:, [\w.]+)*)", text)
        blocked = blocked or (found and f"unsupported global {found.group(1).rstrip('.')}")
    if blocked is None:
        return None
    return CheckpointError(
        f"checkpoint {path} was refused: it is not a plain weights file and would run code from its pickle to "
        f"load ({blocked}). mmssl loads checkpoints with torch.load(weights_only=True) only; do not load this "
        "file from a source you do not trust."
    )


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def state_shapes(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def check_state_fits(
    own: Mapping[str, tuple[int, ...]], theirs: Mapping[str, tuple[int, ...]], source: str, what: str
) -> None:
    """Raises CheckpointError naming ``source`` and the first mismatching keys when the state dict shapes
    ``theirs`` (a file's) do not fit ``own`` (a module's): another architecture, size or prefix."""
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [f"{k} {theirs[k]} vs {own[k]}" for k in own if k in theirs and theirs[k] != own[k]]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise CheckpointError(
            f"{source}: the weights do not fit {what}; it looks like a checkpoint of another architecture or "
            f"size: {'; '.join(parts)}"
        )


def load_state_checked(module: nn.Module, state: Mapping[str, Tensor], source: str, what: str) -> None:
    """``module.load_state_dict(state)`` that explains a mismatch (another architecture, a bad prefix...)."""
    check_state_fits(state_shapes(module.state_dict()), state_shapes(state), source, what)
    module.load_state_dict(state, strict=True)


def newest_readable(paths: list[Path]) -> tuple[Path, dict[str, Any], list[str]]:
    """The first of ``paths`` (newest first) that :func:`read_checkpoint` accepts, with its contents and the
    reasons the ones before it were passed over; CheckpointError listing every reason when none is readable."""
    skipped = []
    for path in paths:
        try:
            return path, read_checkpoint(path), skipped
        except CheckpointError as e:
            skipped.append(str(e))
    raise CheckpointError("no readable checkpoint: " + "; ".join(skipped or ["none given"]))


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
    return as_backbone(model, sidecar["img_size"]).eval(), sidecar


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
    return as_backbone(model, info["img_size"]).eval(), info


def load_backbone_weights(backbone: Backbone, path: str | Path, key: str = "backbone weights") -> None:
    """A local timm state dict (``.safetensors`` as written by tools/export.py, or a ``.pt``/``.pth`` read with
    ``weights_only=True``) into ``backbone.model``; every backbone weight must be present. ``key``: the config
    key that named the file, for messages."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: not an existing local file; {OFFLINE}")
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:  # timm re-raises torch's refusal as a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        refused = unsafe_refusal(f"{key}={str(path)!r}", e)
        raise (
            refused or CheckpointError(f"{key}={str(path)!r}: not a readable weights file ({first})")
        ) from None
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))}
    try:
        backbone.model.load_state_dict(state, strict=True)
    except RuntimeError as exn:
        detail = str(exn).splitlines()
        raise ValueError(
            f"{key}={str(path)!r} does not fit backbone.* ({type(backbone.model).__name__}): "
            + " ".join(line.strip() for line in detail[1:4])
        ) from None


def read_encoder_weights(path: str | Path, where: str | None = None) -> dict[str, Tensor]:
    """The timm state dict of an encoder file other than a Lightning checkpoint: an export of ``export.py``
    (``.safetensors`` with its ``.json``, or a ``save_for_hf`` folder) or a plain timm state dict
    (``.safetensors``, ``.pth``, ``.bin``; torch files read with ``weights_only=True``). Local files only: a
    model-hub name is refused before anything is looked up."""
    where = where or str(path)
    if is_hub_name(str(path)):
        raise CheckpointError(f"{where}: {HUB_REFUSED}")
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{where}: no such file or folder (local files only; nothing is downloaded)")
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
