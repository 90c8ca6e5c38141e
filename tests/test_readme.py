"""The README's Python code runs as written (issue 19: its ``mmssl.build`` one-liner raised AttributeError)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index):
    """Each block in a fresh namespace (as a reader pastes it into a new interpreter), ViT-B sized: seconds."""
    namespace: dict = {}
    exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), namespace)
    if "loss" in namespace:  # the plain-PyTorch block computes a real loss
        assert torch.isfinite(namespace["loss"])
    if "objective" in namespace:
        assert isinstance(namespace["objective"], torch.nn.Module)
