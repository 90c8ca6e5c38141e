"""iGPT: generative pretraining on colour-quantised pixels (Chen et al., "Generative Pretraining from Pixels",
ICML 2020; reference: openai/image-gpt ``src/model.py``, ``src/run.py``).

Images (already downsampled by the data view to ``resolution`` x ``resolution``) are quantised on the batch
to palette ids in raster order (``targets/palette.py``) and a sequence transformer (``sequence.py``) learns
them with one of the paper's two objectives (§"Pre-training"):

* ``mode="ar"``: next-pixel prediction, mean cross-entropy over all positions (model.py ``gen_loss``).
* ``mode="bert"``: each token is masked independently with probability ``mask_prob`` = 0.15 (model.py:
  ``M = uniform > bert_mask_prob`` keeps a token), its embedding is zeroed, attention is bidirectional, and
  the loss is the cross-entropy on masked positions, averaged per image then over the batch (as model.py).

Probing (paper, §"Linear Probing"): ``features(images, layer)`` is f^l = mean_i layer_norm(h^l)_i, the
average over the sequence of the parameter-free layer-normed output of block ``layer`` (0 = embeddings).
The best layer sits near the middle of the network, so the default is ``depth // 2``;
``features_per_layer`` returns every layer from one forward pass. Inputs are the batch's normalised images,
exactly what ``forward`` takes. AR features come from the same forward as training (start token, last pixel
unseen), as the reference's classifier head; BERT features see every token (no mask at evaluation).

Evaluation: ``objective.backbone`` is an :class:`IGPTEncoder`, the transformer up to ``feature_layer`` behind the
backbone contract of ``backbones.py``, so the linear probe, kNN, the online monitors and the digits table treat
iGPT like any encoder. It is not a timm model: export to timm is refused.

Pictures: ``visualize`` completes the bottom half of each image from its top half (paper Figure 1) by
sampling pixel after pixel (temperature / top-k); a BERT model fills the bottom half in one pass instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.flops import TRAIN_PER_FORWARD
from mmssl.sequence import SequenceTransformer, sample_logits
from mmssl.targets.palette import Palette

MODES = ("ar", "bert")


class ImageGPT(nn.Module):
    def __init__(
        self,
        transformer: SequenceTransformer,
        palette: Palette,
        mode: str = "ar",
        mask_prob: float = 0.15,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        feature_layer: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        num_completions: int = 2,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if transformer.causal != (mode == "ar"):
            raise ValueError(f"mode={mode!r} needs a transformer with causal={mode == 'ar'}")
        if palette.num_colors != transformer.vocab_size:
            raise ValueError(
                f"palette has {palette.num_colors} colours, transformer {transformer.vocab_size}"
            )
        self.transformer, self.palette, self.mode, self.mask_prob = transformer, palette, mode, mask_prob
        # The data's normalisation, undone before quantising (the palette lives in [0, 1] RGB).
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), False)
        self.feature_layer = transformer.depth // 2 if feature_layer is None else feature_layer
        self.temperature, self.top_k, self.num_completions = temperature, top_k, num_completions

    def tokens(self, images: Tensor) -> Tensor:
        """Normalised (B, 3, R, R) -> palette ids (B, R*R) in raster order."""
        side = int(self.transformer.seq_len**0.5)
        if tuple(images.shape[-2:]) != (side, side):
            raise ValueError(
                f"iGPT expects {side}x{side} images (igpt.resolution), got {tuple(images.shape[-2:])}; "
                "use the igpt data view"
            )
        return self.palette.quantize((images.float() * self.std + self.mean).clamp(0, 1))

    def forward(self, batch: dict[str, Tensor], keep: Tensor | None = None) -> dict[str, Tensor]:
        """``keep`` (B, L) bool fixes the BERT mask (True = visible); drawn at random when None."""
        ids = self.tokens(batch["image"])  # (B, L)
        count = ids.new_full((), ids.numel(), dtype=torch.float32)  # palette tokens (a fill: no host copy)
        if self.mode == "ar":
            logits = self.transformer(ids)  # (B, L, V): position t predicts token t from tokens < t
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
            return {"loss": loss, "logits": logits, "tokens": count}
        if keep is None:
            keep = torch.rand(ids.shape, device=ids.device) >= self.mask_prob
        logits = self.transformer(ids, keep=keep)
        masked = (~keep).float()  # (B, L), 1 = masked
        per_token = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")  # (B, L)
        # per image then over the batch (model.py); an image with no masked token adds 0 instead of NaN
        loss = ((per_token * masked).sum(1) / masked.sum(1).clamp(min=1)).mean()
        return {"loss": loss, "logits": logits, "mask": masked, "tokens": count}

    def flops_per_sample(self) -> int:
        """Training FLOPs per image (``mmssl/flops.py``): the transformer on its palette-token sequence (the
        palette look-up is not counted)."""
        return TRAIN_PER_FORWARD * self.transformer.forward_flops()

    def no_weight_decay(self) -> set[str]:
        # embeddings, like norms and biases, are not decayed (the recipe uses no weight decay at all)
        names = {"transformer.pos_embed", "transformer.sos", "transformer.tok_embed.weight"}
        return names & {n for n, _ in self.named_parameters()}  # BERT mode has no sos

    @property
    def backbone(self) -> IGPTEncoder:
        """The encoder for evaluation (objectives/base.py): the transformer up to ``feature_layer``. A view made
        on each access (no parameters of its own), so the state dict keeps its keys."""
        return IGPTEncoder(self, self.feature_layer)

    # ---- probing -------------------------------------------------------------------------------------
    @staticmethod
    def pool(hidden: Tensor) -> Tensor:
        """(B, L, D) -> (B, D): parameter-free layer norm, then the average over the sequence."""
        return F.layer_norm(hidden.float(), hidden.shape[-1:]).mean(1)

    def features(self, images: Tensor, layer: int | None = None) -> Tensor:
        """Normalised (B, 3, R, R) -> (B, D) probe features of block ``layer`` (default ``feature_layer``)."""
        layer = self.feature_layer if layer is None else layer
        return self.pool(self.transformer.hidden_states(self.tokens(images), upto=layer)[-1])

    def features_per_layer(self, images: Tensor) -> Tensor:
        """Normalised (B, 3, R, R) -> (B, depth + 1, D): ``features`` of every layer from one pass."""
        states = self.transformer.hidden_states(self.tokens(images))
        return torch.stack([self.pool(h) for h in states], dim=1)

    # ---- sampling ------------------------------------------------------------------------------------
    @torch.no_grad()
    def complete(
        self,
        ids: Tensor,
        given: int,
        temperature: float | None = None,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cache: bool = True,
    ) -> Tensor:
        """Keep the first ``given`` ids of each (B, L) row and sample the rest pixel by pixel (AR) or all at
        once from one bidirectional pass (BERT). Deterministic for a seeded ``generator``."""
        temperature = self.temperature if temperature is None else temperature
        top_k = self.top_k if top_k is None else top_k
        out = ids.clone()
        out[:, given:] = 0
        if self.mode == "bert":
            keep = torch.zeros_like(out, dtype=torch.bool)
            keep[:, :given] = True
            logits = self.transformer(out, keep=keep)[:, given:]  # (B, L - given, V)
            flat = sample_logits(logits.flatten(0, 1), temperature, top_k, generator)
            out[:, given:] = flat.view(len(out), -1)
            return out
        if not cache:  # the reference's way: rerun the prefix for every token (kept to test the cache)
            for t in range(given, out.shape[1]):
                logits = self.transformer(out[:, : t + 1])[:, t]  # (B, V): depends on out[:, :t] only
                out[:, t] = sample_logits(logits, temperature, top_k, generator)
            return out
        logits, kv = self.transformer.decode(out[:, : given + 1], 0)  # positions 0..given
        for t in range(given, out.shape[1]):
            out[:, t] = sample_logits(logits[:, -1], temperature, top_k, generator)
            if t + 1 < out.shape[1]:
                logits, kv = self.transformer.decode(out[:, : t + 2], t + 1, kv)  # position t + 1
        return out

    @torch.no_grad()
    def visualize(
        self, batch: dict[str, Tensor], denormalize: Callable, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """original | quantised | given half | completions, each (B, 3, R, R) in [0, 1]; the completions are
        sampled from ``generator`` (on the batch's device)."""
        images = batch["image"]
        ids = self.tokens(images)
        size = tuple(images.shape[-2:])
        given = (size[0] // 2) * size[1]  # the top half, in raster order
        n = self.num_completions
        done = self.complete(ids.repeat(n, 1), given, generator=generator).view(n, *ids.shape)
        half = self.palette.dequantize(ids, size)
        half[..., size[0] // 2 :, :] = 0.5  # the hidden half drawn grey
        name = "completion" if self.mode == "ar" else "one-pass infill"
        return {
            "original": denormalize(images),
            "quantised": self.palette.dequantize(ids, size),
            "given half": half,
            **{f"{name} {i + 1}": self.palette.dequantize(done[i], size) for i in range(n)},
        }


class IGPTEncoder(nn.Module):
    """iGPT's transformer up to block ``layer`` behind the backbone contract (``backbones.py``): normalised
    (B, 3, R, R) images in, features of their palette-id sequences out. Layers are counted as the paper counts
    them, 0 = the embeddings, ``layer`` = the last (``num_layers = layer + 1``); pooling is the paper's
    f^l = mean_i layer_norm(h^l)_i, the model's own, so ``default`` and ``avg`` agree and there is no CLS token.
    One pixel is one token: ``patch_size`` 1, ``grid_size`` (R, R), no prefix tokens."""

    def __init__(self, gpt: ImageGPT, layer: int):
        super().__init__()
        if not 0 <= layer <= gpt.transformer.depth:
            raise ValueError(f"layer {layer} out of range 0..{gpt.transformer.depth}")
        self.gpt, self.layer = gpt, layer
        self.training = gpt.training  # train()/eval() pass through to the objective
        side = int(gpt.transformer.seq_len**0.5)
        t = gpt.transformer
        self.architecture = f"igpt_{gpt.mode}_d{t.depth}_w{t.embed_dim}_k{t.vocab_size}_to_layer{layer}"
        self.input_size: int = side  # evaluation views must produce R x R images (igpt.resolution)
        self.embed_dim: int = gpt.transformer.embed_dim
        self.patch_size: int = 1
        self.grid_size: tuple[int, int] = (side, side)
        self.num_patches: int = side * side
        self.num_prefix_tokens: int = 0
        self.num_layers: int = layer + 1

    def forward_tokens(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """(B, 3, R, R) -> (B, R*R, D): block ``layer``'s output, parameter-free layer-normed."""
        if keep is not None:
            raise ValueError("iGPT's encoder reads every pixel; it cannot drop tokens")
        h = self.gpt.transformer.hidden_states(self.gpt.tokens(images), upto=self.layer)[-1]
        return F.layer_norm(h.float(), h.shape[-1:])

    def forward_pooled(self, images: Tensor) -> Tensor:
        """(B, 3, R, R) -> (B, D): f^layer, the probe features of the paper."""
        return self.gpt.features(images, self.layer)

    def forward_pooled_layers(self, images: Tensor, layers: Sequence[int]) -> list[Tensor]:
        """(B, 3, R, R) -> [(B, D)] for absolute layer indices in 0..``layer``, from one forward pass."""
        states = self.gpt.transformer.hidden_states(self.gpt.tokens(images), upto=max(layers))
        return [self.gpt.pool(states[i]) for i in layers]
