"""An autoregressive iGPT as ``transformers.ImageGPTForCausalImageModeling`` + ``ImageGPTImageProcessor``.

transformers' ImageGPT is the port of openai/image-gpt ``src/model.py``, which ``sequence.py`` follows too:
pre-norm blocks whose "layer norm" divides by the root mean square without centring and has no bias
(``ImageGPTLayerNorm`` = mmssl's ``norm="rmsnorm"``), QuickGELU MLPs 4x wide, learned ``wte``/``wpe``, an untied
``lm_head`` over the K palette colours. Differences the mapping absorbs:

* the start token: mmssl keeps a learned vector ``sos``; transformers gives it the last id of a K + 1 word
  vocabulary (``wte`` row K), and callers prepend that id and drop the last pixel;
* transformers' Conv1D layers store (in, out) weights and always have biases: weights are transposed, biases 0
  (the reference has none).

The image processor carries the palette (``clusters``, in the processor's [-1, 1] pixel range: 2 c - 1 for
mmssl's [0, 1] centres; nearest-centre assignment is unchanged by that affine map) and resizes to the run's
``igpt.resolution``; ``processor(images)["input_ids"]`` are the palette ids mmssl's ``ImageGPT.tokens`` gives.
Only what transformers computes is exported: BERT mode (no ``sos``, bidirectional) and LayerNorm blocks are
refused with :class:`Unsupported`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.layers import QuickGELU
from torch import Tensor, nn

from mmssl.interop import Unsupported
from mmssl.interop.hf_vit import load_checked
from mmssl.objectives.igpt import ImageGPT


def check_igpt(objective: nn.Module) -> None:
    if not isinstance(objective, ImageGPT):
        raise Unsupported(f"{type(objective).__name__} is not an iGPT objective")
    t = objective.transformer
    if objective.mode != "ar" or not t.causal:
        raise Unsupported(
            f"igpt.mode={objective.mode!r}: ImageGPTForCausalImageModeling is the autoregressive model only "
            "(mode=ar); a BERT-mode iGPT has no start token and attends both ways"
        )
    if not all(isinstance(m, nn.RMSNorm) for b in t.blocks for m in (b.norm1, b.norm2)) or not isinstance(
        t.norm, nn.RMSNorm
    ):
        raise Unsupported(
            "igpt.norm=layernorm: transformers' ImageGPTLayerNorm is the reference's RMS norm (igpt.norm=rmsnorm)"
        )
    if not all(isinstance(b.mlp.act, QuickGELU) for b in t.blocks):
        raise Unsupported(
            "iGPT MLP activation: transformers' ImageGPT uses quick_gelu (the reference's gelu2)"
        )
    if not objective.palette.fitted:
        raise Unsupported("the iGPT palette is not fitted: there are no colours to export")


def to_imagegpt(objective: ImageGPT) -> nn.Module:
    """An autoregressive iGPT -> ``ImageGPTForCausalImageModeling`` with the same weights, eval mode."""
    import transformers

    check_igpt(objective)
    t = objective.transformer
    k, d = t.vocab_size, t.embed_dim
    config = transformers.ImageGPTConfig(
        vocab_size=k + 1,  # + the start-of-sequence id k
        n_positions=t.seq_len,
        n_embd=d,
        n_layer=t.depth,
        n_head=t.blocks[0].attn.num_heads,
        n_inner=t.blocks[0].mlp.fc1.out_features,
        activation_function="quick_gelu",
        layer_norm_epsilon=t.norm.eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    hf = transformers.ImageGPTForCausalImageModeling(config).eval()
    state: dict[str, Tensor] = {
        "transformer.wte.weight": torch.cat([t.tok_embed.weight, t.sos[None]]),  # sos = id k
        "transformer.wpe.weight": t.pos_embed[0],
        "transformer.ln_f.weight": t.norm.weight,
        "lm_head.weight": t.head.weight,
    }
    for i, blk in enumerate(t.blocks):
        p = f"transformer.h.{i}."
        state |= {
            p + "ln_1.weight": blk.norm1.weight,
            p + "ln_2.weight": blk.norm2.weight,
            p + "attn.c_attn.weight": blk.attn.qkv.weight.T,  # Conv1D: (in, out)
            p + "attn.c_proj.weight": blk.attn.proj.weight.T,
            p + "mlp.c_fc.weight": blk.mlp.fc1.weight.T,
            p + "mlp.c_proj.weight": blk.mlp.fc2.weight.T,
        }
        for name, width in (
            ("attn.c_attn", 3 * d),
            ("attn.c_proj", d),
            ("mlp.c_fc", blk.mlp.fc1.out_features),
        ):
            state[p + name + ".bias"] = torch.zeros(width)  # the reference has no biases
        state[p + "mlp.c_proj.bias"] = torch.zeros(d)
    load_checked(hf, state, "ImageGPT")
    return hf


def image_processor(objective: ImageGPT, interpolation: str = "bicubic"):
    """``ImageGPTImageProcessor`` with the palette: RGB images -> ``input_ids`` (B, R*R) palette ids."""
    import transformers
    from transformers.image_utils import PILImageResampling

    side = int(objective.transformer.seq_len**0.5)
    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}.get(
        interpolation, PILImageResampling.BICUBIC
    )
    clusters = (2 * objective.palette.centroids - 1).tolist()  # [0, 1] -> the processor's [-1, 1]
    return transformers.ImageGPTImageProcessor(
        clusters=clusters, size={"height": side, "width": side}, resample=resample
    )


def save_imagegpt(objective: ImageGPT, folder: str | Path, interpolation: str = "bicubic") -> Path:
    """Write an ``ImageGPTForCausalImageModeling`` / ``AutoImageProcessor`` folder."""
    folder = Path(folder)
    to_imagegpt(objective).save_pretrained(folder)
    image_processor(objective, interpolation).save_pretrained(folder)
    return folder


def hf_input(ids: Tensor, sos: int) -> Tensor:
    """Palette ids (B, L) -> transformers' input: the start id first, the last pixel dropped."""
    return torch.cat([torch.full_like(ids[:, :1], sos), ids[:, :-1]], dim=1)


@torch.no_grad()
def round_trip(objective: ImageGPT, folder: str | Path, batch: int = 2) -> float:
    """Load ``folder`` with ``ImageGPTForCausalImageModeling.from_pretrained`` and compare next-pixel logits on
    random palette ids: the max absolute difference."""
    import transformers

    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(folder).eval()
    t = objective.transformer
    ids = torch.randint(0, t.vocab_size, (batch, t.seq_len), generator=torch.Generator().manual_seed(0))
    was_training = objective.training
    expected = objective.eval().transformer(ids)
    objective.train(was_training)
    got = hf(hf_input(ids, t.vocab_size)).logits
    return (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
