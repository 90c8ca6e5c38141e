"""CLIP: contrastive image-text pretraining (Radford et al. 2021, *Learning Transferable Visual Models From
Natural Language Supervision*, §2.3-2.5 and Fig. 3), on open_clip's towers, tokenizer and distributed loss.

An image tower and a text tower map a batch of pictures and their captions to L2-normalised embeddings in
one joint space; the symmetric cross-entropy over the (B, B) cosine-similarity matrix scaled by a learnable
logit scale ``1/tau`` pulls every picture towards its own caption and away from the other captions of the
(global) batch. ``tau`` starts at 0.07 and the scale is clamped to 100 after every optimizer step (§2.5; the
clamp is open_clip_train/train.py's ``logit_scale.clamp_(0, math.log(100))``).

The image tower is either the open_clip model's own (``open_clip_model(...).visual``) or any mmssl backbone
(a timm ViT or CNN, e.g. an MAE-pretrained one) followed by a linear projection.
Weights come only from local files: a hub tag or an ``hf-hub:`` name is refused before open_clip could try
the network.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower
from torch import Tensor, nn

from mmssl.backbones import Backbone, CNNBackbone, ViTBackbone
from mmssl.losses import clip_loss

OFFLINE = "mmssl never downloads weights: pass the path of a local file (download it beforehand)"


def _overrides(values: dict | None, cls: type, key: str) -> dict:
    """Check override names against open_clip's config dataclass so a typo names itself."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"{key}: unknown open_clip {cls.__name__} field(s) {unknown}; known: {sorted(known)}"
        )
    return values


def _check_offline(name: str, model_cfg: dict | None) -> None:
    if name.startswith("hf-hub:"):
        raise ValueError(f"clip.model={name!r}: hf-hub: models need the Hugging Face hub; {OFFLINE}")
    if model_cfg is None:
        raise ValueError(f"clip.model={name!r}: not an open_clip architecture; see open_clip.list_models()")
    text = model_cfg.get("text_cfg", {})
    for field in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(field):
            raise ValueError(
                f"clip.model={name!r}: its text tower or tokenizer comes from the Hugging Face hub "
                f"({field}={text[field]!r}); choose a model with open_clip's own text transformer"
            )


def open_clip_model(
    name: str,
    *,
    pretrained: str | None = None,
    image_size: int | None = None,
    embed_dim: int | None = None,
    text_cfg: dict | None = None,
    vision_cfg: dict | None = None,
) -> nn.Module:
    """An open_clip ``CustomTextCLIP`` (towers at ``.visual`` and ``.text``) by architecture name, randomly
    initialised or loaded from the local open_clip checkpoint ``pretrained`` (standard CLIP layouts are
    converted by open_clip). ``text_cfg``/``vision_cfg`` override fields of the named model's config."""
    base = open_clip.get_model_config(name.replace("/", "-"))
    _check_offline(name, base)
    if pretrained is not None and not Path(pretrained).expanduser().is_file():
        raise FileNotFoundError(f"clip.pretrained={pretrained!r}: not an existing local file; {OFFLINE}")
    # Whole tower configs replace the named model's (open_clip applies its force_* options before them).
    kwargs = {
        "text_cfg": {**base["text_cfg"], **_overrides(text_cfg, CLIPTextCfg, "clip.text_cfg")},
        "vision_cfg": {**base["vision_cfg"], **_overrides(vision_cfg, CLIPVisionCfg, "clip.vision_cfg")},
    }
    if image_size is not None:
        kwargs["vision_cfg"]["image_size"] = image_size
    if embed_dim is not None:
        kwargs["embed_dim"] = embed_dim
    return open_clip.create_model(
        name,
        pretrained=str(Path(pretrained).expanduser()) if pretrained else None,
        force_custom_text=True,  # towers as two submodules; open_clip converts standard CLIP checkpoints
        pretrained_image=False,  # no tower downloads (timm / HF towers)
        pretrained_text=False,
        **kwargs,
    )


def open_clip_text_tower(
    name: str, *, embed_dim: int | None = None, text_cfg: dict | None = None
) -> nn.Module:
    """The text tower of open_clip model ``name`` alone (a ``TextTransformer``), randomly initialised exactly as
    ``open_clip_model(name).text``, without building an image tower that an mmssl backbone replaces.

    open_clip has no public text-tower factory; ``_build_text_tower`` is what its ``CustomTextCLIP`` calls
    (tests/test_clip.py checks the two agree, so a change in open_clip fails there)."""
    base = open_clip.get_model_config(name.replace("/", "-"))
    _check_offline(name, base)
    cfg = {**base["text_cfg"], **_overrides(text_cfg, CLIPTextCfg, "clip.text_cfg")}
    return _build_text_tower(embed_dim or base["embed_dim"], cfg, quick_gelu=base.get("quick_gelu", False))


def clip_tokenizer(name: str, context_length: int | None = None):
    """open_clip's tokenizer for ``name``: the bundled BPE vocabulary (49,408 tokens), offline. Captions are
    lower-cased, cleaned, wrapped in start/end tokens, zero-padded, and truncated keeping the end token last.
    ``context_length`` None: the model's (77 for CLIP)."""
    _check_offline(name, open_clip.get_model_config(name.replace("/", "-")))
    return open_clip.get_tokenizer(name, context_length=context_length)


class CLIP(nn.Module):
    """The CLIP objective. Batch: ``image`` (B, 3, H, W) and ``tokens`` (B, L) int64 caption token ids
    (tokenised in the data workers). Returns ``loss``, ``logit_scale`` (1/tau) and the normalised features (B, E).

    ``image_tower`` is either a module mapping images to (B, E) (open_clip's ``model.visual``), kept as
    ``.image_tower``, or an mmssl backbone, kept as ``.backbone`` (the objective contract, so that online
    evaluation and tools/export.py find it) followed by ``.image_proj``: its pooled features (CLS token or
    average) -> a linear projection without bias into the joint space of width ``text_tower.output_dim``,
    initialised N(0, width^-1/2) like open_clip's ViT ``proj``.
    """

    def __init__(
        self,
        image_tower: nn.Module | Backbone,
        text_tower: nn.Module,
        logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
    ):
        super().__init__()
        if isinstance(image_tower, (ViTBackbone, CNNBackbone)):
            self.backbone = image_tower
            width = image_tower.embed_dim
            self.image_proj = nn.Linear(width, text_tower.output_dim, bias=False)
            nn.init.normal_(self.image_proj.weight, std=width**-0.5)
        else:
            self.image_tower = image_tower
        self.text_tower = text_tower
        # Learned in log space, as in the paper's pseudo-code (Fig. 3: "np.exp(t)") and open_clip.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))
        self.max_logit_scale = max_logit_scale

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        if hasattr(self, "backbone"):
            pooled = self.backbone.forward_pooled(images)  # (B, 3, H, W) -> (B, D)
            features = self.image_proj(pooled)  # (B, E)
        else:
            features = self.image_tower(images)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        features = self.text_tower(tokens)  # (B, L) -> (B, E), pooled at the end token
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        tokens = batch["tokens"]
        if not isinstance(tokens, Tensor) or tokens.ndim != 2:
            raise TypeError(
                "CLIP needs batch['tokens'] as (B, L) token ids: tokenise captions in the data workers "
                "(ShardDataModule(text_fn=CaptionTokens(tokenizer)))"
            )
        image_features = self.encode_image(batch["image"])
        text_features = self.encode_text(tokens)
        scale = self.logit_scale.exp()
        # Gather negatives from every rank only for a training step: validation batches differ in number and
        # size between ranks (every held-out sample once), so there each rank scores its own batch.
        gather = self.training and torch.is_grad_enabled()
        loss = clip_loss(image_features, text_features, scale, gather=gather)
        return {
            "loss": loss,
            "logit_scale": scale.detach(),
            "image_features": image_features,
            "text_features": text_features,
        }

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.max_logit_scale))

    def no_weight_decay(self) -> set[str]:
        # With timm's rule (every 1-D parameter: norms' gains, biases) this is open_clip_train/main.py's
        # exclusion "p.ndim < 2 or 'bn' or 'ln' or 'bias' in n or 'logit_scale' in n".
        return {"logit_scale"}
