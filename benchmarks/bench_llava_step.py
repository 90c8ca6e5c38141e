"""LLaVA stage-2 training-step throughput: mmssl vs transformers' LlavaForConditionalGeneration, same process.

    python benchmarks/bench_llava_step.py                       # 224 px / patch 14 (256 image tokens), batch 4
    python benchmarks/bench_llava_step.py --img 112 --batch 8 --rounds 5

Both sides: a frozen ViT of the same size (timm ViT | transformers CLIPVisionModel) read at its penultimate
layer with the CLS token dropped, an mlp2x_gelu projector, and the same randomly initialised Llama; projector
and decoder train (AdamW). Both get the same shapes-data conversations: transformers gets the token ids and
labels mmssl builds (image token id swapped in), while mmssl's step includes its own tokenisation and label
building, i.e. what it really does per batch. Rounds alternate so machine drift hits both; medians count.
fp32, and bf16 autocast where the CPU has native bf16 (``--precision``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import Ratio, add_precision_arg, machine_line, precisions
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from mmssl.data import shapes
from mmssl.linear import use_fast_linear
from mmssl.vlm.decoders import tiny_llama, word_tokenizer
from mmssl.vlm.llava import LLaVA
from mmssl.vlm.projector import Projector
from mmssl.vlm.prompt import ASSISTANT, IMAGE_TOKEN_ID, USER, PromptEncoder
from mmssl.vlm.vision import VisionTower, create_encoder


def build_pair(args):
    texts = [caption for _, _, caption, _, _ in shapes.samples("train", 200, 0)]
    texts += [q for qs in shapes.QUESTIONS.values() for q in qs] + [USER, ASSISTANT] + list(shapes.POSITIONS)
    tok = word_tokenizer(texts)
    torch.manual_seed(0)
    spec = {"source": "timm", "name": "vit_small_patch16_224",
            "kwargs": {"img_size": args.img, "patch_size": args.patch, "embed_dim": args.vit_dim,
                       "depth": args.vit_depth, "num_heads": args.vit_dim // 64}}  # fmt: skip
    vision = VisionTower(create_encoder(spec), spec, layer=-2)
    decoder = tiny_llama(tok, args.llm_dim, args.llm_depth, args.llm_dim // 64, max_position_embeddings=2048)
    prompt = PromptEncoder(tok, vision.num_tokens, "chat")  # Vicuna v1 system prompt, as in the recipe
    ours = LLaVA(
        vision, Projector("mlp2x_gelu", args.vit_dim, args.llm_dim), decoder, prompt, train_decoder=True
    )
    use_fast_linear(ours)  # as factory.build_objective does for every objective

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=args.vit_dim, intermediate_size=4 * args.vit_dim, num_hidden_layers=args.vit_depth,
            num_attention_heads=args.vit_dim // 64, image_size=args.img, patch_size=args.patch,
        ),
        text_config=decoder.config.to_dict(),
        image_token_index=len(tok),  # one id past the text vocabulary
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # drop CLS
        projector_hidden_act="gelu",
    )  # fmt: skip
    config.text_config.vocab_size = len(tok) + 1
    peer = LlavaForConditionalGeneration(config)
    peer.model.vision_tower.requires_grad_(False)
    return ours, peer


def time_steps(step, params, steps: int, bf16: bool = False) -> float:
    opt = torch.optim.AdamW(params, lr=1e-5)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = step()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


QUICK = ["--img", "112", "--batch", "2", "--steps", "1", "--rounds", "1"]


def measure(argv: list[str] | None = None) -> list[Ratio]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--vit-dim", type=int, default=384)
    parser.add_argument("--vit-depth", type=int, default=6)
    parser.add_argument("--llm-dim", type=int, default=512)
    parser.add_argument("--llm-depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    add_precision_arg(parser)
    args = parser.parse_args(argv)
    ours, peer = build_pair(args)
    conversations = [meta for *_, meta in shapes.samples("train", args.batch, 1)]
    images = torch.randn(args.batch, 3, args.img, args.img)
    batch = {"image": images, "json": conversations}
    tokens = ours.encode_batch(batch)
    ids = tokens["input_ids"].masked_fill(
        tokens["input_ids"] == IMAGE_TOKEN_ID, peer.config.image_token_index
    )

    def ours_step():
        return ours(batch)["loss"]

    def peer_step():
        out = peer(
            input_ids=ids,
            pixel_values=images,
            attention_mask=tokens["attention_mask"],
            labels=tokens["labels"],
        )
        return out.loss

    impls = {
        "mmssl": (ours_step, [p for p in ours.parameters() if p.requires_grad]),
        "transformers": (peer_step, [p for p in peer.parameters() if p.requires_grad]),
    }
    n_img, length = ours.vision.num_tokens, ids.shape[1]
    print(machine_line())
    print(f"LLaVA stage-2 step: {args.img}px/patch {args.patch} ({n_img} image tokens), ViT {args.vit_dim}x"
          f"{args.vit_depth}, Llama {args.llm_dim}x{args.llm_depth}, batch {args.batch}, {length} positions, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    results = []
    for label in precisions(args.precision):
        bf16 = label == "bf16"
        for step, params in impls.values():
            time_steps(step, params, 1, bf16)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, (step, params) in impls.items():
                times[name].append(time_steps(step, params, args.steps, bf16))
        ours_s, peer_s = statistics.median(times["mmssl"]), statistics.median(times["transformers"])
        print(
            f"{label}: mmssl {ours_s * 1000:8.1f} ms/step | transformers {peer_s * 1000:8.1f} ms/step | "
            f"speed ratio (transformers time / mmssl time) {peer_s / ours_s:.2f}x"
        )
        case = f"{args.img}px ({n_img} image tokens), batch {args.batch}"
        results.append(Ratio.of_times("LLaVA step", case, label, ours_s, peer_s, "transformers Llava"))
    return results


if __name__ == "__main__":
    measure()
