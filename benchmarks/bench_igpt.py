"""iGPT speed against Hugging Face's ``ImageGPTForCausalImageModeling`` (the port of openai/image-gpt) at the
same size, with the same weights, in the same process:

* a training step: forward, next-pixel cross-entropy, backward (``mmssl.sequence.SequenceTransformer``: timm
  blocks on torch's fused ``scaled_dot_product_attention(is_causal=True)``, in bf16 on CPU on chunked explicit
  matmuls + softmax instead (``mmssl.sequence.attention``); HF: its own eager attention);
* completing the bottom half of images: ``ImageGPT.complete`` (key/value cache) vs HF ``generate`` (sampling,
  ``use_cache=True``), the same number of new tokens.

    python benchmarks/bench_igpt.py                         # d=128, 4 blocks, 16x16 (256 tokens), batch 4
    python benchmarks/bench_igpt.py --side 32 --dim 512 --depth 8 --batch 16   # on a GPU: --device cuda

Rounds alternate between the two sides so machine drift hits both alike; the median of the rounds counts. A
training round is ``--steps`` steps (one step of the default size takes tens of milliseconds, where one
scheduler hiccup on a shared machine decides a single-step round).
The training step runs in fp32, and in bf16 autocast where the CPU has native bf16 (``--precision``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import Ratio, add_precision_arg, machine_line, precisions
from transformers import ImageGPTForCausalImageModeling

from mmssl.interop.hf_igpt import to_imagegpt
from mmssl.linear import use_fast_linear
from mmssl.objectives.igpt import ImageGPT
from mmssl.sequence import SequenceTransformer
from mmssl.targets.palette import Palette


def hf_twin(ours: SequenceTransformer, num_heads: int) -> ImageGPTForCausalImageModeling:
    """HF ImageGPT with our weights (mmssl/interop/hf_igpt.py: sos = the extra last token id, zero biases)."""
    del num_heads  # read from the blocks
    return to_imagegpt(ImageGPT(ours, Palette(torch.rand(ours.vocab_size, 3))))


def timed(fn, device: str, repeat: int = 1) -> float:
    """Seconds per call of ``fn``, averaged over ``repeat`` calls."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


QUICK = ["--rounds", "3", "--steps", "5"]


def measure(argv: list[str] | None = None) -> list[Ratio]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=16)
    p.add_argument("--colors", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="training steps per round")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    add_precision_arg(p)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    L, dev = a.side**2, a.device
    ours = SequenceTransformer(a.colors, L, a.dim, a.depth, a.heads, causal=True)
    torch.nn.init.normal_(ours.head.weight, std=0.02)
    hf = hf_twin(ours, a.heads).to(dev)
    use_fast_linear(ours)  # as factory.build_objective does for every objective
    ours = ours.to(dev)
    objective = ImageGPT(ours, Palette(torch.rand(a.colors, 3)), temperature=1.0).to(dev).eval()
    hf.eval()
    ids = torch.randint(0, a.colors, (a.batch, L), device=dev)
    hf_ids = torch.cat([torch.full((a.batch, 1), a.colors, device=dev), ids[:, :-1]], 1)  # sos first
    given = L // 2

    def autocast(bf16: bool):
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16)

    def ours_step(bf16: bool = False):
        with autocast(bf16):
            loss = F.cross_entropy(ours(ids).flatten(0, 1).float(), ids.flatten())
        loss.backward()

    def hf_step(bf16: bool = False):
        with autocast(bf16):
            loss = F.cross_entropy(hf(hf_ids).logits.flatten(0, 1).float(), ids.flatten())
        loss.backward()

    def ours_sample():
        objective.complete(ids, given, generator=torch.Generator(dev).manual_seed(0))

    def hf_sample():
        with torch.no_grad():
            hf.generate(hf_ids[:, : given + 1], max_new_tokens=L - given, do_sample=True, top_k=0,
                        pad_token_id=a.colors, use_cache=True)  # fmt: skip

    with torch.no_grad():
        diff = (ours(ids) - hf(hf_ids).logits).abs().max().item()
    print(machine_line())
    print(f"same weights: max |logit difference| {diff:.2e}")
    print(f"{a.depth} blocks, width {a.dim}, {a.heads} heads, {L} tokens, batch {a.batch}, {dev}")
    cases = [(f"train step {label}", label, lambda b=label == "bf16": ours_step(b),
              lambda b=label == "bf16": hf_step(b), a.steps) for label in precisions(a.precision)]  # fmt: skip
    cases.append(("complete half", "fp32", ours_sample, hf_sample, 1))
    results = []
    for name, label, mine, theirs, repeat in cases:
        mine(), theirs()  # warm-up
        t_ours, t_hf = [], []
        for _ in range(a.rounds):
            t_ours.append(timed(mine, dev, repeat))
            t_hf.append(timed(theirs, dev, repeat))
        mo, mh = statistics.median(t_ours), statistics.median(t_hf)
        print(
            f"{name:>15}: mmssl {mo * 1e3:8.1f} ms   transformers {mh * 1e3:8.1f} ms   speed-up x{mh / mo:.2f}"
        )
        case = f"{name.removesuffix(' ' + label)}, {L} tokens, d={a.dim}x{a.depth}, batch {a.batch}"
        results.append(Ratio.of_times("iGPT", case, label, mo, mh, "transformers ImageGPT"))
    return results


if __name__ == "__main__":
    measure()
