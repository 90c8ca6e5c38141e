"""Projectors from vision features into a language decoder's embedding space (Liu et al. 2023, LLaVA / LLaVA-1.5).

``linear`` is LLaVA's (a single ``nn.Linear``, §4.1); ``mlp2x_gelu`` is LLaVA-1.5's two-layer MLP with a GELU
between (§3.1 of "Improved Baselines with Visual Instruction Tuning"); the reference builder
(llava/model/multimodal_projector/builder.py) accepts ``mlp{N}x_gelu`` for any depth N, and so do we.
Weights are saved as safetensors with the projector's kind and sizes in the file's metadata, so a stage-2
run (or the chat tool) rebuilds exactly the projector that stage 1 trained.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mmssl.config.objectives import PROJECTOR_PATTERN  # the one definition of the kinds (llava.projector)


def projector_kinds() -> str:
    return "linear, mlp2x_gelu (or mlpNx_gelu)"


class Projector(nn.Sequential):
    """(B, N, in_dim) -> (B, N, out_dim). Layer layout as in the reference: Linear (GELU Linear)*(N-1)."""

    def __init__(self, kind: str, in_dim: int, out_dim: int):
        if re.fullmatch(PROJECTOR_PATTERN, kind) is None:
            raise ValueError(
                f"llava.projector: unknown projector {kind!r}; choose one of {projector_kinds()}"
            )
        depth = 1 if kind == "linear" else int(kind.removeprefix("mlp").removesuffix("x_gelu"))
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        super().__init__(*layers)
        self.kind, self.in_dim, self.out_dim = kind, in_dim, out_dim


def save_projector(
    projector: Projector, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``path`` (safetensors) atomically: a reader never sees half a file. The tensors come from
    ``state_dict`` when given (e.g. gathered from FSDP shards), else from ``projector``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = projector.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    meta = {"kind": projector.kind, "in_dim": str(projector.in_dim), "out_dim": str(projector.out_dim)}
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_projector(path: str | Path, in_dim: int | None = None, out_dim: int | None = None) -> Projector:
    """Rebuild the saved projector; ``in_dim``/``out_dim`` (the encoder's and decoder's widths) are checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llava.projector_weights={str(path)!r}: no such file")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not {"kind", "in_dim", "out_dim"} <= set(meta):
        raise ValueError(f"{path}: not a projector file (metadata {meta} lacks kind/in_dim/out_dim)")
    saved_in, saved_out = int(meta["in_dim"]), int(meta["out_dim"])
    for name, want, got in (("vision", in_dim, saved_in), ("decoder", out_dim, saved_out)):
        if want is not None and want != got:
            raise ValueError(
                f"{path}: projector was trained for {name} width {got}, but this model's is {want}"
            )
    projector = Projector(meta["kind"], saved_in, saved_out)
    with torch.no_grad():
        projector.load_state_dict(tensors)
    return projector
