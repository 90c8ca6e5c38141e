"""Make a small, randomly initialised language decoder for LLaVA demos and tests: a word-level tokenizer
whose vocabulary is every word in the shards' captions and conversations (plus the chat template's), and a
Llama of the size asked, saved together in one folder that ``llava.decoder`` can point to.

    python tools/make_decoder.py --texts demo:shapes/train --out runs/tiny_llama
    python tools/make_decoder.py --texts '/data/cc/train-{000000..000099}.tar' --out runs/llama_small --hidden-size 256

A real pretrained decoder needs no such step: any local ``save_pretrained`` folder works.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from mmssl.cli import is_program


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--texts", required=True, help="shard spec whose .txt/.json text makes the vocabulary"
    )
    parser.add_argument("--out", required=True, help="output folder (transformers save_pretrained layout)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-positions", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    return parser


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    make_parser().parse_args()

import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mmssl.data.module import resolve_shards  # noqa: E402
from mmssl.vlm.decoders import save_decoder, tiny_llama, word_tokenizer  # noqa: E402
from mmssl.vlm.prompt import ASSISTANT, IMAGE_TOKEN, USER, VICUNA_SYSTEM  # noqa: E402


def shard_texts(spec: str) -> Iterator[str]:
    """Captions (``.txt``) and conversation turns (``.json``) of every sample; images are not decoded."""
    for sample in tqdm(
        wds.WebDataset(resolve_shards(spec, "--texts"), shardshuffle=False), desc="reading text"
    ):
        if "txt" in sample:
            yield sample["txt"].decode("utf-8")
        if "json" in sample:
            for turn in json.loads(sample["json"]).get("conversations", []):
                yield turn["value"].replace(IMAGE_TOKEN, " ")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        texts = [*shard_texts(args.texts), USER, ASSISTANT, VICUNA_SYSTEM]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = word_tokenizer(texts)
    torch.manual_seed(args.seed)
    model = tiny_llama(
        tokenizer, args.hidden_size, args.layers, args.heads, max_position_embeddings=args.max_positions
    )
    save_decoder(model, tokenizer, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"mmssl: {args.out}: Llama with {n:,} parameters, {len(tokenizer)} word vocabulary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
