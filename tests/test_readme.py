"""The README's Python code runs as written (issue 19: its ``mmssl.factory`` one-liner raised AttributeError)."""

from __future__ import annotations

import re
import subprocess
import sys
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


@pytest.mark.slow
def test_simclr_benchmark_without_lightly_names_the_dev_extra():
    """README: the benchmark's peer is a dev extra; without it, one clear line instead of a traceback."""
    bench = README.parent / "benchmarks"  # as `python benchmarks/x.py` puts its folder first on sys.path
    hide = f"import sys, runpy; sys.path.insert(0, {str(bench)!r}); sys.modules['lightly'] = None; sys.argv = ['x']; "
    run = f"runpy.run_path({str(bench / 'bench_simclr_step.py')!r}, run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", hide + run], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "lightly" in done.stderr and '".[dev]"' in done.stderr
