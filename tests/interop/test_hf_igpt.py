"""iGPT -> transformers: ``ImageGPTForCausalImageModeling`` + ``ImageGPTImageProcessor`` load the exported
folder, the processor turns pictures into mmssl's palette ids, the model gives mmssl's logits and the same
greedy completions; settings transformers cannot express are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from mmssl import config as C
from mmssl import factory
from mmssl.interop import Unsupported
from mmssl.interop.hf_igpt import hf_input, round_trip, save_imagegpt

transformers = pytest.importorskip("transformers")
SMALL = ["igpt.embed_dim=32", "igpt.depth=2", "igpt.num_heads=2"]  # 16x16 digits, 16-grey bundled palette


def digits(n: int = 6, side: int = 16) -> list[Image.Image]:
    gray = load_digits().images[:n] / 16.0  # real 8x8 handwritten digits in [0, 1]
    return [
        Image.fromarray((255 * g).astype(np.uint8)).convert("RGB").resize((side, side), Image.NEAREST)
        for g in gray
    ]


def test_transformers_loads_the_export_with_identical_ids_logits_and_completions(tmp_path):
    cfg = C.load("igpt_demo", SMALL)
    torch.manual_seed(0)
    objective = factory.build_objective(cfg).eval()
    nn.init.normal_(objective.transformer.head.weight, std=0.5)  # zero-initialised logits would be trivial
    for blk in objective.transformer.blocks:
        nn.init.normal_(blk.norm1.weight, 1.0, 0.2)
    folder = save_imagegpt(objective, tmp_path / "igpt")

    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    pictures = digits()
    _, view = factory.build_views(cfg)
    images = torch.stack([view(p)["image"] for p in pictures])
    ids = objective.tokens(images)  # (B, 256)
    assert torch.equal(processor(pictures, return_tensors="pt")["input_ids"], ids)
    assert len(ids.unique()) > 3  # real digits use several greys

    k = objective.transformer.vocab_size
    with torch.no_grad():
        ours = objective.transformer(ids)
        theirs = hf(hf_input(ids, k)).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert round_trip(objective, folder) < 1e-5

    given = 128  # the top half; greedy decoding from both
    done = objective.complete(ids[:2], given, temperature=0)
    prompt = hf_input(ids[:2], k)[:, : given + 1]
    out = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=ids.shape[1] - given,
        do_sample=False,
        pad_token_id=k,
    )  # fmt: skip  (an explicit mask: generate would take the start id, = pad id, for padding)
    assert torch.equal(out[:, 1:], done)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["igpt.mode=bert"], "mode=ar"), (["igpt.norm=layernorm"], "rmsnorm")],
)
def test_bert_mode_and_layernorm_are_refused(overrides, message, tmp_path):
    objective = factory.build_objective(C.load("igpt_demo", [*SMALL, *overrides]))
    with pytest.raises(Unsupported, match=message):
        save_imagegpt(objective, tmp_path / "x")
