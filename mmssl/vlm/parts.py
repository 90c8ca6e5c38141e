"""Saved parts of a LLaVA model: everything ``tools/chat.py`` needs to answer offline, without Lightning.

A parts folder holds ``llava.json`` (how to rebuild each part), ``projector.safetensors`` (trained in both
stages; stage 2 starts from stage 1's file), ``vision.safetensors`` (the frozen encoder, pruned after the
chosen layer; written once, since it never changes) and, when the decoder was trained, ``decoder/`` (a
transformers ``save_pretrained`` folder with the tokenizer). A frozen decoder is referenced by its source
folder instead of being copied. Every file is replaced atomically or written once, so a reader (or a run
killed mid-save) never leaves a half-written projector or manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from mmssl.vlm.decoders import load_decoder, save_decoder
from mmssl.vlm.llava import LLaVA
from mmssl.vlm.projector import load_projector, save_projector
from mmssl.vlm.prompt import PromptEncoder
from mmssl.vlm.vision import VisionTower, create_encoder

MANIFEST = "llava.json"
FORMAT = 1


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _part(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def save_parts(model: LLaVA, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write ``model``'s parts into ``directory``. The tensors come from ``state_dict`` (keys as in
    ``model.state_dict()``) when given: a checkpoint's gathered weights, where under FSDP ``model`` itself holds
    only this rank's shards; otherwise from ``model``."""
    state = model.state_dict() if state_dict is None else state_dict
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_projector(model.projector, out / "projector.safetensors", _part(state, "projector."))
    vision = out / "vision.safetensors"
    if not vision.is_file():
        tmp = vision.with_name(f".{vision.name}.tmp")
        weights = _part(state, "vision.encoder.")
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp))
        tmp.replace(vision)
    source = str(getattr(model.decoder, "name_or_path", "") or "")
    if model.train_decoder or not source or not Path(source, "config.json").is_file():
        save_decoder(model.decoder, model.prompt.tokenizer, out / "decoder", _part(state, "decoder."))
        decoder = "decoder"
    else:
        decoder = str(Path(source).resolve())
    p = model.prompt
    manifest = {
        "format": FORMAT,
        "vision": {"spec": model.vision.spec, "layer": model.vision.layer, "weights": vision.name},
        "projector": "projector.safetensors",
        "decoder": decoder,
        "prompt": {"conversation": p.conversation, "system": p.system, "max_length": p.max_length},
        "image": model.image_processing,
    }
    _atomic_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return out


def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; expected the llava/ folder of a run directory")
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}: format {m.get('format')!r}, this mmssl reads format {FORMAT}")
    return m


def _vision_tower(folder: Path, manifest: dict) -> VisionTower:
    spec = manifest["vision"]["spec"]
    vision = VisionTower(create_encoder(spec), spec, layer=manifest["vision"]["layer"])
    vision.encoder.load_state_dict(load_file(str(folder / manifest["vision"]["weights"])))
    return vision


def load_vision_tower(directory: str | Path) -> VisionTower:
    """The frozen encoder of a parts folder (stage 2 must see the very encoder stage 1 aligned to)."""
    folder = Path(directory)
    return _vision_tower(folder, _manifest(folder))


def load_parts(directory: str | Path) -> LLaVA:
    """Rebuild a LLaVA model (eval mode, CPU) from a parts folder; reads local files only."""
    folder = Path(directory)
    m = _manifest(folder)
    vision = _vision_tower(folder, m)
    decoder_dir = folder / m["decoder"]  # an absolute path stays absolute
    decoder, tokenizer = load_decoder(decoder_dir)
    prompt = PromptEncoder(tokenizer, vision.num_tokens, **m["prompt"])
    projector = load_projector(
        folder / m["projector"], vision.dim, decoder.get_input_embeddings().embedding_dim
    )
    model = LLaVA(vision, projector, decoder, prompt, train_decoder=False, image_processing=m["image"])
    return model.eval()
