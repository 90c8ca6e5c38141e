"""Shared test helpers: small models, real images (the demo data), the pretraining CLI runner and env changes
through ``monkeypatch``, so tests stay fast and meaningful. Test modules import the helpers with
``from conftest import ...``; fixtures (``demo_root``, ``uneven_shards``) are found by pytest."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmssl import config as C
from mmssl.data import demo
from mmssl.data.shards import write_shards
from mmssl.objectives.igpt import ImageGPT
from mmssl.sequence import SequenceTransformer
from mmssl.targets.palette import Palette

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_cfg(*overrides: str):
    """The MAE demo config shrunk further for unit tests (32 px, 8 px patches, 2 blocks)."""
    base = [
        "backbone.img_size=32",
        "backbone.depth=2",
        "backbone.embed_dim=64",
        "backbone.num_heads=4",
        "mae.decoder_embed_dim=32",
        "mae.decoder_depth=1",
        "mae.decoder_num_heads=4",
    ]
    return C.load("mae_demo", [*base, *overrides])


MAE_TINY_RUN = [  # the MAE demo shrunk for CLI runs: 2 blocks, 32 px, fp32, one log line a step
    "backbone.img_size=32",
    "backbone.depth=2",
    "backbone.embed_dim=64",
    "backbone.num_heads=4",
    "mae.decoder_embed_dim=64",
    "mae.decoder_depth=1",
    "mae.decoder_num_heads=4",
    "data.batch_size=32",
    "data.num_workers=0",
    "data.shuffle_buffer=100",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Where the demo shards live, exported as MMSSL_DATA for the session (tools run in-process and their
    subprocesses read it), through a monkeypatch so the environment is restored afterwards."""
    root = os.environ.get("MMSSL_DATA") or str(tmp_path_factory.mktemp("mmssl_data"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMSSL_DATA", root)
        yield root


def cli(args: list[str], demo_root: str, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MMSSL_DATA": demo_root,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, str(ROOT / "tools" / "pretrain.py"), "--cfg", "mae_demo", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **popen)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> bool:
    """Waits until ``path`` exists, ``proc`` exits or ``timeout`` seconds pass; True when the path exists. A
    ``*`` in the file name matches as a glob (a step checkpoint replaced by the next one may live < 0.2 s)."""

    def exists() -> bool:
        return any(path.parent.glob(path.name)) if "*" in path.name else path.exists()

    deadline = time.monotonic() + timeout
    while not exists() and time.monotonic() < deadline:
        try:
            proc.wait(timeout=0.2)  # returns at once when the process dies
            break
        except subprocess.TimeoutExpired:
            pass
    return exists()


def metrics(run: Path, version: int = 0) -> list[dict]:
    with open(run / "logs" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def uneven_shards(tmp_path, demo_root) -> str:
    """Real labelled digits (32 px, ``png`` + ``cls``) in 3 train shards of 5, 17 and 58 samples and 3 val shards
    of 3, 9 and 1 samples."""
    src = Path(demo.ensure_demo("digits", demo_root))
    import webdataset as wds

    samples = [s for s in wds.WebDataset(sorted(str(p) for p in src.glob("train-*.tar")), shardshuffle=False)]
    out = tmp_path / "uneven"
    for split, cuts in (("train", [(0, 5), (5, 22), (22, 80)]), ("val", [(80, 83), (83, 92), (92, 93)])):
        for i, (start, stop) in enumerate(cuts):
            keep = ({"__key__": s["__key__"], "png": s["png"], "cls": s["cls"]} for s in samples[start:stop])
            write_shards(keep, out, f"{split}{i}")
    return str(out)


def tiny_igpt(
    mode: str = "ar", k: int = 8, side: int = 8, depth: int = 2, palette: Palette | None = None
) -> ImageGPT:
    """A 2-block iGPT over an 8x8 grid of k grey levels."""
    transformer = SequenceTransformer(
        k, side * side, embed_dim=32, depth=depth, num_heads=4, causal=mode == "ar"
    )
    if palette is None:
        palette = Palette(torch.linspace(0, 1, k)[:, None].repeat(1, 3))  # k greys
    return ImageGPT(transformer, palette, mode=mode)


CLIP_TEXT = {"context_length": 16, "width": 32, "heads": 2, "layers": 1}  # a 1-layer open_clip text tower


def tiny_clip(loss: str = "clip"):
    """CLIP (or SigLIP) with the same weights in every process: a 1-block timm ViT image tower on 32 px images and
    a 1-layer open_clip text tower. SigLIP's bias is 0, not the paper's -10: there the negatives' terms are
    ~e^-10 each, and a test that leaves out the other rank's texts could not tell the difference."""
    from mmssl.backbones import create_backbone
    from mmssl.objectives.clip import CLIP, open_clip_text_tower
    from mmssl.objectives.siglip import siglip

    torch.manual_seed(0)
    vit = create_backbone(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2
    )
    text = open_clip_text_tower("ViT-B-32", embed_dim=32, text_cfg=CLIP_TEXT)
    return siglip(vit, text, logit_bias=0.0) if loss == "siglip" else CLIP(vit, text)


def clip_batch(n: int = 8) -> dict[str, torch.Tensor]:
    """n random 32 px images with the shapes captions, tokenised for ``tiny_clip``."""
    from mmssl.data import shapes
    from mmssl.objectives.clip import clip_tokenizer

    captions = [caption for _, _, caption, _, _ in shapes.samples("train", n, 0)]
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"image": images, "tokens": clip_tokenizer("ViT-B-32", CLIP_TEXT["context_length"])(captions)}
