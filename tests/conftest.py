"""Shared test helpers: small models and real images, so tests stay fast and meaningful."""

from __future__ import annotations

import pytest
import torch

from mmssl import config as C


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
