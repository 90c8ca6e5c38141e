"""benchmarks/gpu_check.py off a GPU: its arguments, and a clean exit with a clear message without CUDA."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments():
    gpu_check = load()
    quick = gpu_check.parse_args(["--quick", "--rows", "mae, hog"])
    assert (
        quick.rows == ["mae", "hog"] and quick.batch == 128 and quick.steps < gpu_check.parse_args([]).steps
    )
    assert gpu_check.parse_args([]).rows == list(gpu_check.ROWS)
    assert all(callable(getattr(gpu_check, f"row_{name}")) for name in gpu_check.ROWS)
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--rows", "mae,warp"])
    assert exc.value.code == 2


def test_exits_cleanly_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no CUDA device" in res.stdout and "Traceback" not in res.stderr
