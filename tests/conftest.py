"""Shared test helpers: small models, real images (the demo data), the pretraining CLI runner and env changes
through ``monkeypatch``, so tests stay fast and meaningful. Test modules import the helpers with
``from conftest import ...``; fixtures (``demo_root``, ``uneven_shards``) are found by pytest."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
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
def demo_root(tmp_path_factory) -> str:
    return os.environ.get("MMSSL_DATA") or str(tmp_path_factory.mktemp("mmssl_data"))


def cli(args: list[str], demo_root: str, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MMSSL_DATA": demo_root,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, str(ROOT / "tools" / "pretrain.py"), "--cfg", "mae_demo", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **popen)


def metrics(run: Path, version: int = 0) -> list[dict]:
    with open(run / "logs" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def uneven_shards(tmp_path, demo_root) -> str:
    """Real photo crops in 3 train shards of 5, 17 and 58 samples and 3 val shards of 3, 9 and 1 samples."""
    src = Path(demo.ensure_demo("photos", demo_root))
    import webdataset as wds

    samples = [s for s in wds.WebDataset(sorted(str(p) for p in src.glob("train-*.tar")), shardshuffle=False)]
    out = tmp_path / "uneven"
    for i, (start, stop) in enumerate([(0, 5), (5, 22), (22, 80)]):
        write_shards(
            ({"__key__": s["__key__"], "jpg": s["jpg"]} for s in samples[start:stop]), out, f"train{i}"
        )
    for i, (start, stop) in enumerate([(80, 83), (83, 92), (92, 93)]):
        write_shards(
            ({"__key__": s["__key__"], "jpg": s["jpg"]} for s in samples[start:stop]), out, f"val{i}"
        )
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
