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
the network. A weights file whose activation (QuickGELU or GELU) can be read from it must match the model
config's (``create_open_clip``; OpenAI's weights need a ``-quickgelu`` config).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower
from open_clip.transformer import TextTransformer, text_global_pool
from torch import Tensor, nn

from mmssl.backbones import Backbone, CNNBackbone, ViTBackbone
from mmssl.losses import clip_loss
from mmssl.ops import random_masking

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


def _check_offline(name: str, model_cfg: dict | None, text_cfg: dict | None = None) -> None:
    """``text_cfg``: the clip.text_cfg overrides, which may name a Hugging Face tower the model does not."""
    if name.startswith("hf-hub:"):
        raise ValueError(f"clip.model={name!r}: hf-hub: models need the Hugging Face hub; {OFFLINE}")
    if model_cfg is None:
        raise ValueError(f"clip.model={name!r}: not an open_clip architecture; see open_clip.list_models()")
    for field in ("hf_model_name", "hf_tokenizer_name"):
        if (text_cfg or {}).get(field):
            raise ValueError(
                f"clip.text_cfg.{field}={text_cfg[field]!r}: a Hugging Face text tower or tokenizer needs the "
                f"hub ({OFFLINE}); leave it unset to keep open_clip's own text transformer"
            )
        if model_cfg.get("text_cfg", {}).get(field):
            raise ValueError(
                f"clip.model={name!r}: its text tower or tokenizer comes from the Hugging Face hub "
                f"({field}={model_cfg['text_cfg'][field]!r}); choose a model with open_clip's own text transformer"
            )


# QuickGELU or GELU: the activation is not a weight. OpenAI trained its CLIPs with QuickGELU, x * sigmoid(1.702 x)
# (so is LLaVA-1.5's vision tower, openai/clip-vit-large-patch14-336: hidden_act "quick_gelu"); open_clip's plain
# configs (ViT-B-32, ViT-L-14-336) build nn.GELU, and only its "openai" hub tag switches them to QuickGELU. A local
# file loads into either tower without a complaint and every feature comes out wrong (open_clip issue #771; its
# fix, PR #970, warns for hub tags only). What a weights file can tell:
# - OpenAI's own release (ViT-B-32.pt, ViT-L-14-336px.pt, ...) is a TorchScript archive, which records the class
#   of every submodule: the activation is read from it, and a config with the other one is refused.
# - A plain state dict (.pt/.bin/.safetensors, e.g. open_clip's copies of OpenAI's weights on the HF hub) has the
#   same keys and shapes for both (activations have no parameters; OpenAI's ViT-L-14 and LAION's share the
#   layout): nothing in it tells, so the model name decides; recipes name the -quickgelu config explicitly.
#   A file name that mentions "openai" next to a GELU config only gets a warning (a hint, not evidence).
_ACTIVATIONS = {"QuickGELU": True, "GELU": False}  # class name -> quick_gelu


def _is_torchscript(path: Path) -> bool:
    # torch.load's own test before it dispatches to torch.jit.load (serialization._is_torchscript_zip)
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rpartition("/")[2] == "constants.pkl" for name in archive.namelist())


def recorded_quick_gelu(path: str | Path) -> bool | None:
    """Whether the CLIP in weights file ``path`` was built with QuickGELU (True) or GELU (False), where the file
    records it (a TorchScript archive, OpenAI's release format); None where it cannot tell (a state dict)."""
    path = Path(path).expanduser()
    if not _is_torchscript(path):
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
        archive = torch.jit.load(str(path), map_location="cpu")
    kinds = {module.original_name for module in archive.modules()} & _ACTIVATIONS.keys()
    return _ACTIVATIONS[kinds.pop()] if len(kinds) == 1 else None


def _check_activation(name: str, path: Path, model_key: str, weights_key: str, prefix: str) -> None:
    quick = bool((open_clip.get_model_config(name.replace("/", "-")) or {}).get("quick_gelu", False))
    recorded = recorded_quick_gelu(path)
    act = {True: "QuickGELU", False: "GELU"}
    if recorded is not None and recorded != quick:
        other = f"{name}-quickgelu" if recorded else name.removesuffix("-quickgelu")
        fix = (
            f"use {model_key}={prefix}{other}"
            if other != name and open_clip.get_model_config(other) is not None
            else f"use an open_clip model config with quick_gelu={recorded}"
        )
        raise ValueError(
            f"{model_key}={prefix}{name} builds a {act[quick]} tower, but {weights_key}={str(path)!r} records "
            f"{act[recorded]} (a TorchScript archive, as OpenAI releases its CLIPs): {fix}. An activation has no "
            "weights, so the file would load into the wrong tower silently (open_clip issue #771)"
        )
    if recorded is None and not quick and "openai" in path.name.lower():
        warnings.warn(
            f"{weights_key}={str(path)!r}: the file name says OpenAI, whose CLIPs use QuickGELU, but "
            f"{model_key}={prefix}{name} builds GELU and a state dict cannot tell which is right; for OpenAI's "
            f"weights use {model_key}={prefix}{name}-quickgelu (open_clip issue #771)",
            UserWarning,
            stacklevel=4,
        )


def create_open_clip(
    name: str,
    weights: str | Path | None = None,
    *,
    model_key: str = "model",
    weights_key: str = "weights",
    prefix: str = "",
    **kwargs,
) -> nn.Module:
    """``open_clip.create_model(name, **kwargs)``, loading the local file ``weights`` (if any) after refusing one
    that records the other activation (see the note above). ``model_key``/``weights_key`` name the config keys
    in messages; ``prefix`` is what the model key's value holds before the name (``open_clip:``)."""
    if weights is None:
        return open_clip.create_model(name, **kwargs)
    path = Path(weights).expanduser()
    _check_activation(name, path, model_key, weights_key, prefix)
    if not _is_torchscript(path):
        return open_clip.create_model(name, pretrained=str(path), **kwargs)
    # open_clip reads with torch.load(weights_only=True), which refuses TorchScript archives; an archive only is
    # read with torch.jit.load (as OpenAI's clip.load and open_clip's load_openai_model do), whose C++ unpickler
    # restores TorchScript types, never arbitrary Python objects as a pickle can. open_clip then drops the
    # archive's input_resolution/context_length/vocab_size entries (factory.load_state_dict).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'torch.load' received a zip file that looks like a TorchScript")
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
        return open_clip.create_model(name, pretrained=str(path), weights_only=False, **kwargs)


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
    converted by open_clip; OpenAI's weights need a ``-quickgelu`` name, e.g. ViT-B-32-quickgelu, and an OpenAI
    TorchScript archive with a GELU name is refused). ``text_cfg``/``vision_cfg`` override fields of the named
    model's config."""
    base = open_clip.get_model_config(name.replace("/", "-"))
    _check_offline(name, base, text_cfg)
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
    return create_open_clip(
        name,
        pretrained,
        model_key="clip.model",
        weights_key="clip.pretrained",
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
    (tests/objectives/test_clip.py checks the two agree, so a change in open_clip fails there)."""
    base = open_clip.get_model_config(name.replace("/", "-"))
    _check_offline(name, base, text_cfg)
    cfg = {**base["text_cfg"], **_overrides(text_cfg, CLIPTextCfg, "clip.text_cfg")}
    return _build_text_tower(embed_dim or base["embed_dim"], cfg, quick_gelu=base.get("quick_gelu", False))


def _trimmable(tower: nn.Module) -> bool:
    """A causal open_clip text tower pooled at the end token (argmax), without CoCa's appended class token or a
    padding mask: the CLIP towers of open_clip's configs."""
    return (
        type(tower) is TextTransformer
        and tower.attn_mask is not None
        and tower.cls_emb is None
        and not getattr(tower, "use_pad_mask", False)
        and tower.pool_type == "argmax"
        and not tower.output_tokens
    )


def text_features(tower: nn.Module, tokens: Tensor) -> Tensor:
    """``tower(tokens)``, (B, L) -> (B, E), computed on the first n positions only, n = 1 + the batch's last
    end-token position, for a tower where that changes nothing (:func:`_trimmable`).

    Why nothing changes: in a causal tower the output at position t depends on tokens <= t only, and the
    features are taken at each caption's end token (the largest id, so ``argmax``; open_clip's
    ``text_global_pool``), so the padding after the batch's last end token never reaches them, forward or
    backward (its gradients are exactly zero). Captions are mostly far shorter than CLIP's 77-token context,
    so the text tower's cost falls by about L / n; a batch holding one caption of full length gains nothing.
    The body is open_clip 3.x's ``TextTransformer.forward`` for such a tower, with the causal mask cut to n
    (tests/objectives/test_clip.py compares it with the tower's own forward, features and gradients). Reading n
    waits for the tokens on a GPU (one host sync per step).
    """
    if not _trimmable(tower):
        return tower(tokens)
    n = int(tokens.argmax(dim=-1).max()) + 1
    if n >= tokens.shape[1]:
        return tower(tokens)
    tokens = tokens[:, :n]  # (B, n)
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast) + tower.positional_embedding[:n].to(cast)  # (B, n, W)
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask[:n, :n]))
    pooled = text_global_pool(x, tokens, pool_type="argmax")  # (B, W)
    proj = tower.text_projection
    if proj is None:
        return pooled
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj  # (B, E)


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

    ``image_mask_ratio`` r > 0 (a ViT backbone only) is FLIP (Li et al. 2023): in training the backbone encodes a
    random (1 - r) of the patch tokens (``ops.random_masking``, MAE's), pooled as the model pools (CLS or average).
    ``logit_bias`` and ``loss(image, text, scale, bias, gather=)`` replace the softmax loss (SigLIP:
    ``objectives/siglip.py``).
    """

    def __init__(
        self,
        image_tower: nn.Module | Backbone,
        text_tower: nn.Module,
        logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        *,
        image_mask_ratio: float = 0.0,
        logit_bias: float | None = None,
        loss: Callable[..., Tensor] | None = None,
    ):
        super().__init__()
        if image_mask_ratio and not isinstance(image_tower, ViTBackbone):
            raise ValueError("CLIP: image_mask_ratio (FLIP) needs an mmssl ViT backbone as the image tower")
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
        self.image_mask_ratio = image_mask_ratio
        # A learned logit bias and another pair loss: SigLIP (objectives/siglip.py builds it); None: CLIP's.
        self.logit_bias = None if logit_bias is None else nn.Parameter(torch.tensor(float(logit_bias)))
        self.loss = loss

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        if hasattr(self, "backbone") and self.image_mask_ratio and self.training:
            # FLIP §3: encode a random (1 - ratio) of the patches only (MAE's per-sample masking), no
            # reconstruction; evaluation sees every patch.
            noise = torch.rand(images.shape[0], self.backbone.num_patches, device=images.device)
            keep = random_masking(noise, self.image_mask_ratio)[0]  # (B, K)
            tokens = self.backbone.forward_tokens(images, keep=keep)  # (B, prefix + K, D)
            features = self.image_proj(self.backbone.model.forward_head(tokens, pre_logits=True))
        elif hasattr(self, "backbone"):
            pooled = self.backbone.forward_pooled(images)  # (B, 3, H, W) -> (B, D)
            features = self.image_proj(pooled)  # (B, E)
        else:
            features = self.image_tower(images)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        features = text_features(self.text_tower, tokens)  # (B, L) -> (B, E), pooled at the end token
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
        if self.loss is None:
            loss = clip_loss(image_features, text_features, scale, gather=gather)
        else:
            loss = self.loss(image_features, text_features, scale, self.logit_bias, gather=gather)
        extra = {} if self.logit_bias is None else {"logit_bias": self.logit_bias.detach()}
        return {
            "loss": loss,
            "logit_scale": scale.detach(),
            **extra,
            "image_features": image_features,
            "text_features": text_features,
        }

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.max_logit_scale))

    def no_weight_decay(self) -> set[str]:
        # With timm's rule (every 1-D parameter: norms' gains, biases) this is open_clip_train/main.py's
        # exclusion "p.ndim < 2 or 'bn' or 'ln' or 'bias' in n or 'logit_scale' in n".
        return {"logit_scale"} | ({"logit_bias"} if self.logit_bias is not None else set())
