"""Zero-shot classification and image-text retrieval for CLIP-style models (Radford et al. 2021, §3.1.2 and
§3.1.4: class names in prompt templates, the mean of the templates' normalised text embeddings as the class
vector; retrieval recall@k as in open_clip_train/zero_shot.py and clip_benchmark).

A model here is anything with ``encode_image(images, normalize=True)`` and ``encode_text(tokens,
normalize=True)`` returning (B, E): mmssl's ``objectives.clip.CLIP`` or an open_clip model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import Tensor
from tqdm import tqdm


@torch.no_grad()
def embed(
    model, batches: Iterable[dict], device: str | torch.device = "cpu", total: int | None = None
) -> dict:
    """Normalised ``image`` (N, E) and ``text`` (N, E) embeddings, ``tokens`` (N, L) and ``label`` (N,) where the
    batches have them, for every sample of ``batches`` (dicts with ``image``, caption ``tokens``, ``label``)."""
    parts: dict[str, list[Tensor]] = {}
    for batch in tqdm(batches, desc="embedding", unit="batch", total=total, disable=None):
        images = batch["image"].to(device)
        parts.setdefault("image", []).append(model.encode_image(images, normalize=True).float().cpu())
        if isinstance(batch.get("tokens"), Tensor):
            tokens = batch["tokens"].to(device)
            parts.setdefault("text", []).append(model.encode_text(tokens, normalize=True).float().cpu())
            parts.setdefault("tokens", []).append(tokens.cpu())
        if "label" in batch:
            parts.setdefault("label", []).append(batch["label"].cpu())
    if not parts:
        raise ValueError("no batch to embed: the evaluation shards are empty")
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def zero_shot_classifier(
    model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str | Callable]
) -> Tensor:
    """(C, E) class vectors: each template filled with the class name, encoded and L2-normed, averaged over
    templates and normed again (CLIP §3.1.4 prompt ensembling), by open_clip's ``build_zero_shot_classifier``."""
    device = next(model.parameters()).device
    weights = build_zero_shot_classifier(model, tokenizer, list(classnames), list(templates), device=device)
    return weights.T.float().cpu()  # open_clip returns (E, C)


def zero_shot_accuracy(
    image_features: Tensor,
    classifier: Tensor,
    labels: Tensor,
    classes: Sequence[int] | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy of ``argmax(image . class)``; ``classes`` restricts the candidates to those indices
    (e.g. only the classes present in a held-out split). Labels outside ``classes`` raise."""
    logits = image_features @ classifier.T  # (N, C)
    if classes is not None:
        classes = torch.as_tensor(list(classes))
        position = {int(c): i for i, c in enumerate(classes)}
        if any(int(y) not in position for y in labels):
            raise ValueError("zero_shot_accuracy: a label is not among the candidate classes")
        logits = logits[:, classes]
        labels = torch.tensor([position[int(y)] for y in labels])
    out = {}
    for k in ks:
        if k > logits.shape[1]:
            continue
        top = logits.topk(k, dim=1).indices  # (N, k)
        out[f"top{k}"] = (top == labels[:, None]).any(dim=1).float().mean().item()
    return out


def retrieval_recall(
    image_features: Tensor,
    text_features: Tensor,
    positives: Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways: the share of images with a matching text among their k most similar texts
    (``image_to_text@k``) and of texts with a matching image among their k nearest (``text_to_image@k``).

    ``positives`` (N_img, N_txt) bool says which texts match which image; None: text i belongs to image i.
    """
    sim = image_features @ text_features.T  # (N_img, N_txt)
    if positives is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError("retrieval_recall: give positives when images and texts are not paired 1:1")
        positives = torch.eye(sim.shape[0], dtype=torch.bool)
    out = {}
    for direction, scores, match in (
        ("image_to_text", sim, positives),
        ("text_to_image", sim.T, positives.T),
    ):
        for k in ks:
            top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (N, k)
            out[f"{direction}@{k}"] = match.gather(1, top).any(dim=1).float().mean().item()
    return out
