"""Frozen features of any encoder in the backbone contract: pooled, from one or several layers, cached.

Layers are counted as timm counts them for ``forward_intermediates``: transformer blocks for a ViT, the
``feature_info`` stages for a CNN (stem = 0); negative indices count from the end, ``-1`` is the last. Encoders
that are not timm models (iGPT's, ``objectives/igpt.py``) give ``num_layers`` and their own pooled features per
layer (``forward_pooled_layers``).
Pooling (``pool``):

* ``default``: what the model itself feeds its classifier. For the last layer this is exactly
  ``backbone.forward_pooled`` (a ViT's CLS token after the final norm, or timm's average + ``fc_norm``; a
  CNN's global average with its head norm). For an earlier ViT block it is the same pooling applied to that
  block's tokens after the final norm; for an earlier CNN stage the spatial average.
* ``cls``: the first prefix token after the final norm (ViTs with a CLS token only).
* ``avg``: the mean of the patch tokens after the final norm (ViT), the spatial mean (CNN).

Feature sets are written to ``cache_dir`` as safetensors keyed by everything that determines them (encoder
file, shards, view, layers, pooling), so a grid of probes or a second run re-uses one extraction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from mmssl.backbones import Backbone, CNNBackbone, ViTBackbone
from mmssl.data.folder import folder_collate, open_rgb
from mmssl.data.module import resolve_shards
from mmssl.data.shards import SampleDecoder, count_samples, eval_pipeline
from mmssl.data.transforms import View, eval_view, mae_view

POOLS = ("default", "cls", "avg")


@dataclass
class Features:
    """``features[layer_name]`` (N, D) float32 and ``labels`` (N,) int64, in the same sample order."""

    features: dict[str, Tensor]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


def num_layers(backbone: Backbone) -> int:
    if isinstance(backbone, ViTBackbone):
        return len(backbone.model.blocks)
    if isinstance(backbone, CNNBackbone):
        return len(backbone.model.feature_info)
    return backbone.num_layers  # another encoder behind the contract (iGPT's) says how many it has


def resolve_layers(backbone: Backbone, layers: list[int]) -> list[int]:
    """Layer indices (negative from the end) -> sorted absolute indices, checked against the model."""
    n = num_layers(backbone)
    out = []
    for i in layers:
        if not -n <= i < n:
            kind = {ViTBackbone: "blocks", CNNBackbone: "feature stages"}.get(type(backbone), "layers")
            raise ValueError(
                f"layer {i} out of range: the encoder has {n} {kind} (use 0..{n - 1} or -1..-{n})"
            )
        out.append(i % n)
    return sorted(set(out))


def layer_name(index: int) -> str:
    return f"layer{index}"


@torch.no_grad()
def encode(backbone: Backbone, images: Tensor, layers: list[int], pool: str = "default") -> dict[str, Tensor]:
    """(B, 3, H, W) -> ``{layer_name(i): (B, D_i)}`` for absolute indices from :func:`resolve_layers`."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if not isinstance(backbone, (ViTBackbone, CNNBackbone)):  # its own pooling: default and avg agree
        if pool == "cls":
            raise ValueError(f"pool=cls: {type(backbone).__name__} has no CLS token (use avg or default)")
        return {
            layer_name(i): f
            for i, f in zip(layers, backbone.forward_pooled_layers(images, layers), strict=True)
        }
    model = backbone.model
    last = num_layers(backbone) - 1
    if layers == [last] and pool == "default":
        return {layer_name(last): backbone.forward_pooled(images)}  # (B, D)
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"{type(model).__name__} has no forward_intermediates: only layers=[-1], pool=default"
        )
    if isinstance(backbone, ViTBackbone):
        return _vit_layers(backbone, images, layers, pool, last)
    if pool == "cls":
        raise ValueError("pool=cls needs a ViT with a CLS token; a CNN has none (use avg or default)")
    final, maps = model.forward_intermediates(images, indices=layers, norm=True)  # maps: (B, C, h, w) each
    out = {layer_name(i): m.mean(dim=(2, 3)) for i, m in zip(layers, maps, strict=True)}
    if pool == "default" and last in layers:
        out[layer_name(last)] = model.forward_head(final, pre_logits=True)  # the model's own head pooling
    return out


def _vit_layers(backbone: ViTBackbone, images: Tensor, layers: list[int], pool: str, last: int):
    model = backbone.model
    prefix = backbone.num_prefix_tokens
    if pool == "cls" and (model.cls_token is None or prefix == 0):
        raise ValueError("pool=cls: this ViT has no CLS token (use avg or default)")
    # norm=True: every block's tokens go through the final LayerNorm, so the last block equals forward_features
    final, tokens = model.forward_intermediates(
        images, indices=layers, norm=True, output_fmt="NLC", return_prefix_tokens=True
    )
    out = {}
    for i, (patches, prefix_tokens) in zip(layers, tokens, strict=True):  # (B, L, D), (B, prefix, D)
        if pool == "cls" or (pool == "default" and model.global_pool == "token"):
            out[layer_name(i)] = prefix_tokens[:, 0]
        else:
            out[layer_name(i)] = patches.mean(dim=1)
    if pool == "default" and last in layers:
        out[layer_name(last)] = model.forward_head(final, pre_logits=True)  # exactly forward_pooled
    return out


def labelled_loader(
    spec: str, view: View, batch_size: int = 256, num_workers: int = 2, label_key: str = "cls"
) -> tuple[DataLoader, int | None]:
    """Every sample of ``spec`` once, in a fixed order, as ``{"image", "label"}`` batches; and the count if known.

    ``spec`` is an image folder with one subfolder per class (torchvision ``ImageFolder``) or a shard spec
    (patterns, ``::``-joined lists, ``demo:NAME/SPLIT``) whose samples carry the label as ``.{label_key}``.
    """
    if os.path.isdir(spec) and not any(Path(spec).glob("*.tar")):
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(spec, transform=view, loader=open_rgb)
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=folder_collate, shuffle=False
        )
        return loader, len(dataset)
    urls = resolve_shards(spec, "data shards")
    pipeline = eval_pipeline(
        urls, view, batch_size, rank=0, world_size=1, decoder=SampleDecoder(label_key=label_key)
    )
    workers = min(num_workers, len(urls))
    return DataLoader(pipeline, batch_size=None, num_workers=workers), count_samples(urls)


def extract(
    backbone: Backbone,
    loader: DataLoader,
    layers: list[int] = (-1,),
    pool: str = "default",
    *,
    device: str | torch.device = "cpu",
    total: int | None = None,
    desc: str = "features",
    source: str = "data",
    label_key: str = "cls",
) -> Features:
    """Run the frozen encoder (eval mode, no grad) over ``loader``; features are kept in float32 on the CPU."""
    absolute = resolve_layers(backbone, list(layers))
    was_training = backbone.training
    backbone.eval().to(device)
    feats: dict[str, list[Tensor]] = {layer_name(i): [] for i in absolute}
    labels: list[Tensor] = []
    try:
        with tqdm(total=total, desc=desc, unit="img", disable=None, leave=False) as bar:
            for batch in loader:
                if "label" not in batch:
                    raise ValueError(
                        f"{source}: samples carry no label under the key '.{label_key}' (a batch had only "
                        f"{sorted(k for k in batch if not k.startswith('__'))}); linear probes and kNN need "
                        "labelled data: shards with .cls members, or an image folder with class subfolders"
                    )
                out = encode(backbone, batch["image"].to(device, non_blocking=True), absolute, pool)
                for name, value in out.items():
                    feats[name].append(value.float().cpu())
                labels.append(batch["label"].long())
                bar.update(len(batch["label"]))
    finally:
        backbone.train(was_training)
    if not labels:
        raise ValueError(f"{source}: no samples were read (empty shards, or every sample was skipped)")
    return Features({k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels))


def fingerprint(path: str | Path) -> str:
    """Cheap identity of a file or folder for cache keys: resolved path, size and modification time."""
    p = Path(path).resolve()
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())[:10_000]
    parts = [f"{x}:{x.stat().st_size}:{x.stat().st_mtime_ns}" for x in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached(cache_dir: str | Path | None, key: str, compute) -> Features:
    """``compute()`` once per ``key``: stored as ``cache_dir/KEY.safetensors`` and read back afterwards."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        tensors = load_file(path)
        feats = {k.removeprefix("feat."): v for k, v in tensors.items() if k.startswith("feat.")}
        return Features(feats, tensors["labels"])
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tensors = {f"feat.{k}": v.contiguous() for k, v in result.features.items()}
    save_file({**tensors, "labels": result.labels.contiguous()}, tmp, metadata={"key": key})
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return result


def split_features(
    backbone: Backbone,
    info: dict,
    spec: str,
    *,
    encoder_id: str,
    layers: list[int] | tuple[int, ...] = (-1,),
    pool: str = "default",
    img_size: int | None = None,
    crop_pct: float = 0.875,
    batch_size: int = 256,
    num_workers: int = 2,
    label_key: str = "cls",
    cache_dir: str | Path | None = None,
    augment_copy: int | None = None,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Features:
    """Features of one labelled split for an encoder described by ``info`` (image size, mean/std,
    interpolation: what ``factory.load_encoder`` returns), cached under a key of everything that matters.

    ``augment_copy=None`` uses the evaluation view (resize + centre crop); an integer draws augmented copy
    number ``augment_copy`` with the linear-probe training augmentation of MAE and SimCLR
    (RandomResizedCrop(``crop_scale``, torchvision's default 0.08-1) + horizontal flip), reproducibly seeded by
    that number and ``seed``.
    """
    size = img_size or info["img_size"]
    norm = {"interpolation": info["interpolation"], "mean": tuple(info["mean"]), "std": tuple(info["std"])}
    if augment_copy is None:
        view = eval_view(size, crop_pct=crop_pct, **norm)
    else:
        view = mae_view(size, scale=tuple(crop_scale), hflip=hflip, **norm)
    local_dir = os.path.isdir(spec) and not any(Path(spec).glob("*.tar"))
    data_id = (
        fingerprint(spec) if local_dir else [fingerprint(u) for u in resolve_shards(spec, "data shards")]
    )
    absolute = resolve_layers(backbone, list(layers))
    key = cache_key(
        encoder=encoder_id, data=data_id, view=repr(view), layers=absolute, pool=pool, copy=augment_copy,
        label_key=label_key, seed=seed,
    )  # fmt: skip

    def compute() -> Features:
        loader, total = labelled_loader(spec, view, batch_size, num_workers, label_key)
        rng = torch.random.fork_rng() if augment_copy is not None else contextlib.nullcontext()
        with rng:
            if augment_copy is not None:
                torch.manual_seed(augment_copy + 1_000_003 * seed)  # DataLoader workers derive theirs from it
            desc = f"features {Path(spec).name or spec}" + (
                "" if augment_copy is None else f" aug{augment_copy}"
            )
            return extract(
                backbone, loader, absolute, pool, device=device, total=total, desc=desc, source=spec,
                label_key=label_key,
            )  # fmt: skip

    return cached(cache_dir, key, compute)


def probe_train_features(
    backbone: Backbone,
    info: dict,
    spec: str,
    *,
    mode: str = "augment",
    augment_copies: int = 0,
    cache_dir: str | Path | None = None,
    **common: Any,
) -> Features | list[Features] | Callable[[int], Features]:
    """The training side of a linear probe, as :func:`~mmssl.eval.linear_probe.train_probes` takes it.

    ``mode="augment"`` (the protocol of MAE's main_linprobe.py and SimCLR): a function of the epoch that runs the
    frozen encoder over freshly augmented training images (RandomResizedCrop + flip drawn anew, seeded by the
    epoch and ``seed``), nothing cached. ``mode="cached"``: features of the evaluation view (or, with
    ``augment_copies`` K, of K augmented copies, epoch e uses e mod K), extracted once and cached in
    ``cache_dir``. ``common``: :func:`split_features` keywords.
    """
    if mode == "augment":
        return partial(_augmented_epoch, backbone, info, spec, common)
    if mode != "cached":
        raise ValueError(f"data.mode must be augment or cached, got {mode!r}")
    if augment_copies:
        return [
            split_features(backbone, info, spec, augment_copy=i, cache_dir=cache_dir, **common)
            for i in range(augment_copies)
        ]
    return split_features(backbone, info, spec, cache_dir=cache_dir, **common)


def _augmented_epoch(backbone: Backbone, info: dict, spec: str, common: dict, epoch: int) -> Features:
    return split_features(backbone, info, spec, augment_copy=epoch, cache_dir=None, **common)
