"""A LLaVA model as a ``transformers.LlavaForConditionalGeneration`` folder with its ``LlavaProcessor``.

What transformers' Llava computes (``modeling_llava.py``): ``hidden_states[vision_feature_layer]`` of a vision
tower, the CLS row dropped (``vision_feature_select_strategy="default"``), a two-layer projector
``linear_2(act(linear_1(x)))``, the result scattered into the positions of ``image_token_id`` in the decoder's
input embeddings. mmssl's LLaVA (``vlm/llava.py``) is the same model; the export changes representations only:

* **Vision tower**: the frozen, pruned encoder becomes a ``ViTModel`` (timm ViT, ``hf_vit.py``) or a
  ``CLIPVisionModel`` (open_clip ViT) with exactly the kept blocks, so ``vision_feature_layer=-1`` is mmssl's
  layer (LLaVA-1.5's penultimate one). Both apply their final norm to ``last_hidden_state`` only, never to
  ``hidden_states``, so its values (the pruned norm's) are unused and written as the identity.
* **Projector**: ``mlp2x_gelu`` maps to ``linear_1``/``linear_2`` with exact GELU. ``linear`` maps exactly to
  ``linear_1`` = the layer, ``projector_hidden_act="linear"`` (identity) and ``linear_2`` = the identity matrix
  with zero bias. Deeper ``mlpNx_gelu`` projectors have no transformers counterpart and are refused.
* **``<image>`` token**: mmssl marks image positions with id -200 (LLaVA's ``IMAGE_TOKEN_INDEX``), which no
  embedding table holds; transformers needs a real token. ``<image>`` is added to the tokenizer as a special
  token and the embedding and output tables grow by one zero row (the row is never read as an input: image
  features replace it). Generation suppresses it (``generation_config.suppress_tokens``), since a zero output
  row gives logit 0, which a model could otherwise pick.
* **Processor**: the tokenizer, a ``LlavaImageProcessor`` doing mmssl's LLaVA view (pad to a square with the
  mean colour, resize, normalise) and a chat template that renders a conversation as mmssl's ``PromptEncoder``
  lays it out (``vlm/prompt.py``), so ``processor.apply_chat_template(..., add_generation_prompt=True)`` gives
  the ids mmssl answers from.

Other vision towers (timm CNNs, ViTs with register tokens...) are refused with :class:`Unsupported`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from mmssl.interop import Unsupported
from mmssl.interop.hf_vit import check_vit, config_args, encoder_state, load_checked
from mmssl.vlm.llava import LLaVA
from mmssl.vlm.prompt import ASSISTANT, IMAGE_TOKEN, USER, PromptEncoder

# ---- vision tower ------------------------------------------------------------------------------------------


def _timm_vit_tower(encoder: VisionTransformer) -> tuple[Any, dict[str, Tensor], int]:
    import transformers

    check_vit(encoder, "LLaVA vision tower", pooled=False)
    config = transformers.ViTConfig(**config_args(encoder))
    state = encoder_state(encoder)
    d = encoder.embed_dim
    state |= {  # transformers' final norm and CLS pooler: mmssl pruned the one, never had the other; unused
        "layernorm.weight": torch.ones(d), "layernorm.bias": torch.zeros(d),
        "pooler.dense.weight": torch.eye(d), "pooler.dense.bias": torch.zeros(d),
    }  # fmt: skip
    return config, state, encoder.num_prefix_tokens


def _open_clip_vit_tower(encoder: nn.Module) -> tuple[Any, dict[str, Tensor], int]:
    import transformers
    from open_clip.transformer import VisionTransformer as OpenCLIPViT

    if not isinstance(encoder, OpenCLIPViT):
        raise Unsupported(f"LLaVA vision tower {type(encoder).__name__}: not an open_clip VisionTransformer")
    blocks = encoder.transformer.resblocks
    blk = blocks[0]
    act = type(blk.mlp.gelu).__name__
    acts = {"QuickGELU": "quick_gelu", "GELU": "gelu"}
    extras = {
        "no LayerNorm before the blocks (no_ln_pre)": not isinstance(encoder.ln_pre, nn.LayerNorm),
        "layer scale": not all(isinstance(b.ls_1, nn.Identity) for b in blocks),
        f"activation {act}": act not in acts,
        "custom attention blocks": not all(hasattr(b.attn, "in_proj_weight") for b in blocks),
    }
    found = [name for name, present in extras.items() if present]
    if found:
        raise Unsupported(f"LLaVA open_clip vision tower uses {', '.join(found)}: not a CLIPVisionModel")
    d = encoder.class_embedding.shape[0]
    grid = encoder.grid_size
    config = transformers.CLIPVisionConfig(
        hidden_size=d,
        intermediate_size=blk.mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blk.attn.num_heads,
        image_size=encoder.image_size[0],
        patch_size=encoder.patch_size[0],
        hidden_act=acts[act],
        layer_norm_eps=blk.ln_1.eps,
    )
    if grid[0] != grid[1]:
        raise Unsupported(f"LLaVA open_clip vision tower: non-square patch grid {grid}")
    state = {
        "embeddings.class_embedding": encoder.class_embedding,
        "embeddings.patch_embedding.weight": encoder.conv1.weight,
        "embeddings.position_embedding.weight": encoder.positional_embedding,
        "pre_layrnorm.weight": encoder.ln_pre.weight,
        "pre_layrnorm.bias": encoder.ln_pre.bias,
        "post_layernorm.weight": torch.ones(d),  # pruned, unused (hidden_states are taken before it)
        "post_layernorm.bias": torch.zeros(d),
    }
    for i, b in enumerate(blocks):
        p = f"encoder.layers.{i}."
        q, k, v = b.attn.in_proj_weight.chunk(3)
        qb, kb, vb = b.attn.in_proj_bias.chunk(3)
        state |= {
            p + "self_attn.q_proj.weight": q, p + "self_attn.q_proj.bias": qb,
            p + "self_attn.k_proj.weight": k, p + "self_attn.k_proj.bias": kb,
            p + "self_attn.v_proj.weight": v, p + "self_attn.v_proj.bias": vb,
            p + "self_attn.out_proj.weight": b.attn.out_proj.weight,
            p + "self_attn.out_proj.bias": b.attn.out_proj.bias,
            p + "layer_norm1.weight": b.ln_1.weight, p + "layer_norm1.bias": b.ln_1.bias,
            p + "layer_norm2.weight": b.ln_2.weight, p + "layer_norm2.bias": b.ln_2.bias,
            p + "mlp.fc1.weight": b.mlp.c_fc.weight, p + "mlp.fc1.bias": b.mlp.c_fc.bias,
            p + "mlp.fc2.weight": b.mlp.c_proj.weight, p + "mlp.fc2.bias": b.mlp.c_proj.bias,
        }  # fmt: skip
    return config, state, 1


def vision_tower(model: LLaVA) -> tuple[Any, dict[str, Tensor], int]:
    """(transformers vision config, its state dict, prefix tokens to drop) for the LLaVA's frozen encoder."""
    encoder, source = model.vision.encoder, model.vision.spec.get("source")
    if isinstance(encoder, VisionTransformer):
        config, state, prefix = _timm_vit_tower(encoder)
    elif source == "open_clip":
        config, state, prefix = _open_clip_vit_tower(encoder)
    else:
        raise Unsupported(
            f"LLaVA vision tower {type(encoder).__name__} ({source}): transformers' Llava takes a ViT's hidden "
            "states; timm ViTs and open_clip ViTs convert"
        )
    if prefix != 1:
        raise Unsupported(
            f"LLaVA vision tower with {prefix} prefix tokens: transformers' Llava drops one CLS"
        )
    return config, state, prefix


# ---- projector ---------------------------------------------------------------------------------------------


def projector_state(model: LLaVA) -> tuple[str, dict[str, Tensor]]:
    """(``projector_hidden_act``, ``multi_modal_projector`` state) for linear and mlp2x_gelu projectors."""
    p = model.projector
    if p.kind == "mlp2x_gelu":
        first, act, second = p[0], p[1], p[2]
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            raise Unsupported(f"projector activation {act}: transformers' Llava applies exact GELU")
        return "gelu", {
            "linear_1.weight": first.weight, "linear_1.bias": first.bias,
            "linear_2.weight": second.weight, "linear_2.bias": second.bias,
        }  # fmt: skip
    if p.kind == "linear":
        width = p.out_dim
        return "linear", {  # linear_2(identity(linear_1(x))) with linear_2 = I: exactly the one layer
            "linear_1.weight": p[0].weight, "linear_1.bias": p[0].bias,
            "linear_2.weight": torch.eye(width), "linear_2.bias": torch.zeros(width),
        }  # fmt: skip
    raise Unsupported(
        f"llava.projector={p.kind!r}: transformers' LlavaMultiModalProjector has two linear layers; only "
        "linear and mlp2x_gelu projectors convert"
    )


# ---- prompt ------------------------------------------------------------------------------------------------


def _literal(text: str) -> str:
    return "{{ " + json.dumps(text) + " }}"  # a Jinja string literal (JSON escapes are Jinja's too)


def chat_template(prompt: PromptEncoder) -> str:
    """A Jinja chat template rendering messages as ``prompt`` lays them out (``vlm/prompt.py``):

    * ``chat``: ``<s>{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: ...``, ending with
      ``ASSISTANT:`` for a generation prompt; an image goes before the question's text unless the text places
      ``<image>`` itself (as mmssl's ``prompt`` does);
    * ``plain``: ``<s><image>``, then the caption and ``</s>`` when given (stage 1 only describes images).
    """
    bos = "{{ bos_token }}" if prompt.bos else ""
    text = (
        "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}"
        "{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
        "| join(' ') %}{% endif %}"
    )
    images = (
        "{% if message['content'] is string %}{% set n = 0 %}{% else %}"
        "{% set n = message['content'] | selectattr('type', 'equalto', 'image') | list | length %}{% endif %}"
    )
    if prompt.conversation == "plain":
        return (
            bos + "{% for message in messages %}" + text + images
            + "{% if message['role'] == 'user' %}{% if n == 0 %}<image>{% endif %}{{ '<image>' * n }}"
            + "{% elif message['role'] == 'assistant' %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
        )  # fmt: skip
    system = _literal(prompt.system + " ") if prompt.system else ""
    return (
        bos + system + "{% for message in messages %}" + text + images
        + "{% if message['role'] == 'user' %}" + _literal(USER + " ")
        + "{% if n == 0 and '<image>' not in text and loop.first %}<image>\n{% endif %}"
        + "{{ '<image>\n' * n }}{{ text }} "
        + "{% elif message['role'] == 'assistant' %}" + _literal(ASSISTANT + " ") + "{{ text }}{{ eos_token }}"
        + "{% endif %}{% endfor %}{% if add_generation_prompt %}" + _literal(ASSISTANT) + "{% endif %}"
    )  # fmt: skip


# ---- the whole model ---------------------------------------------------------------------------------------


def check_llava(model: nn.Module) -> None:
    """A LLaVA whose tower and projector transformers' Llava expresses, or :class:`Unsupported`."""
    if not isinstance(model, LLaVA):
        raise Unsupported(f"{type(model).__name__} is not a LLaVA model")
    vision_tower(model)
    projector_state(model)


def with_image_token(tokenizer) -> tuple[Any, int]:
    """A copy of ``tokenizer`` with ``<image>`` as an added special token, and that token's id."""
    tok = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tok, tok.convert_tokens_to_ids(IMAGE_TOKEN)


def to_llava(model: LLaVA) -> tuple[nn.Module, Any, int]:
    """mmssl LLaVA -> (``LlavaForConditionalGeneration`` in eval mode, tokenizer with ``<image>``, its id)."""
    import transformers

    vision_config, vision_state, _ = vision_tower(model)
    act, projector = projector_state(model)
    decoder = model.decoder
    tokenizer, image_id = with_image_token(model.prompt.tokenizer)
    embed = decoder.get_input_embeddings().weight  # (V, D)
    vocab = max(embed.shape[0], image_id + 1)
    text_config = copy.deepcopy(decoder.config)
    text_config.vocab_size = vocab
    config = transformers.LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_id,
        image_seq_length=model.vision.num_tokens,
        projector_hidden_act=act,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # the tower holds exactly the blocks up to mmssl's layer
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(decoder.config, "tie_word_embeddings", False)),
    )
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    load_checked(hf.model.vision_tower, vision_state, "Llava vision tower")
    load_checked(hf.model.multi_modal_projector, projector, "Llava projector")

    def grown(weight: Tensor) -> Tensor:  # (V, D) -> (vocab, D): zero rows for <image> (and any gap)
        out = torch.zeros(vocab, weight.shape[1])
        out[: weight.shape[0]] = weight.detach().float()
        return out

    inner = decoder.get_decoder()  # the base model inside the causal LM (LlamaModel in LlamaForCausalLM)
    language = dict(inner.state_dict())
    embed_key = next(n for n, p in inner.named_parameters() if p is embed)
    language[embed_key] = grown(embed)
    load_checked(hf.model.language_model, language, "Llava language model")
    head = decoder.get_output_embeddings()
    with torch.no_grad():
        hf.lm_head.weight.copy_(grown(head.weight))
    hf.generation_config = transformers.GenerationConfig.from_model_config(decoder.config)
    hf.generation_config.suppress_tokens = [image_id]
    hf.generation_config.pad_token_id = model.prompt.pad
    hf.generation_config.eos_token_id = tokenizer.eos_token_id
    return hf, tokenizer, image_id


def image_processor(model: LLaVA):
    """``LlavaImageProcessor`` doing mmssl's LLaVA view: pad to a square with the mean colour, resize, normalise."""
    import transformers
    from transformers.image_utils import PILImageResampling

    info = model.image_processing
    size = int(info.get("img_size") or model.vision.image_size[0])
    mean, std = list(info.get("mean", (0.485, 0.456, 0.406))), list(info.get("std", (0.229, 0.224, 0.225)))
    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}.get(
        info.get("interpolation", "bicubic"), PILImageResampling.BICUBIC
    )
    # llava.image_aspect_ratio (data/transforms.py llava_view); parts saved before the key existed padded
    pad = info.get("image_aspect_ratio", "pad") == "pad"
    return transformers.LlavaImageProcessor(
        do_pad=pad,  # pad: with int(255 * mean), as LLaVA's expand2square; crop: shortest side + centre crop
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=resample,
        image_mean=mean,
        image_std=std,
    )


def processor(model: LLaVA, tokenizer) -> Any:
    import transformers

    return transformers.LlavaProcessor(
        image_processor=image_processor(model),
        tokenizer=tokenizer,
        patch_size=model.vision.image_size[0] // int(model.vision.num_tokens**0.5),
        vision_feature_select_strategy="default",
        chat_template=chat_template(model.prompt),
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS token the model drops
    )


def save_llava(model: LLaVA, folder: str | Path) -> Path:
    """Write a ``LlavaForConditionalGeneration`` + ``AutoProcessor`` folder (safetensors, configs, tokenizer,
    image processor, chat template, generation config)."""
    folder = Path(folder)
    hf, tokenizer, _ = to_llava(model)
    hf.save_pretrained(folder)
    processor(model, tokenizer).save_pretrained(folder)
    return folder


@torch.no_grad()
def compare(
    model: LLaVA, hf: nn.Module, image_id: int, images: Tensor, questions: list[str]
) -> dict[str, Any]:
    """Both models on the same pixels and prompts (mmssl's ids, -200 replaced by ``image_id``): the max |logit
    difference| over mmssl's vocabulary and mmssl's vs transformers' greedy answers (token ids)."""
    from mmssl.vlm.llava import IMAGE_TOKEN_ID
    from mmssl.vlm.prompt import Encoded

    p = model.prompt
    encoded = p.pad_batch(
        [Encoded(p.prompt(q), [0] * len(p.prompt(q))) for q in questions], padding_side="left"
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    embeds = model.embed(images, ids)
    ours = model.decoder(inputs_embeds=embeds, attention_mask=mask).logits
    hf_ids = ids.masked_fill(ids == IMAGE_TOKEN_ID, image_id)
    theirs = hf(input_ids=hf_ids, pixel_values=images, attention_mask=mask).logits
    vocab = ours.shape[-1]
    diff = (ours - theirs[..., :vocab]).abs()[mask.bool()].max().item()
    steps = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": p.pad, "eos_token_id": p.eos}
    ours_gen = model.decoder.generate(inputs_embeds=embeds, attention_mask=mask, **steps)
    theirs_gen = hf.generate(input_ids=hf_ids, pixel_values=images, attention_mask=mask, **steps)
    return {"logits": diff, "ours": ours_gen.tolist(), "theirs": theirs_gen[:, ids.shape[1] :].tolist()}


@torch.no_grad()
def round_trip(model: LLaVA, folder: str | Path, batch: int = 2) -> float:
    """Load ``folder`` with ``LlavaForConditionalGeneration.from_pretrained`` and compare logits on random
    pixels and a question: the max absolute difference (inf when the greedy answers differ)."""
    import transformers

    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    size = model.vision.image_size
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    diffs = compare(model.eval(), hf, hf.config.image_token_index, images, ["What is this?"] * batch)
    model.train(was_training)
    return diffs["logits"] if diffs["ours"] == diffs["theirs"] else float("inf")
