"""A plain (non-editable) install works as a library: build the wheel, install it into a fresh virtual
environment (dependencies reused from this one, no network), then from a directory outside the repository run
the console scripts: a 2-step MAE pretraining (``--cfg mae_demo`` found inside the package) and an iGPT recipe
whose palette path resolves against the package."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_SKIP = {
    ".git",
    ".venv",
    "runs",
    "build",
    "dist",
    ".ci-data",
    ".pytest_cache",
    ".ruff_cache",
    "lightning_logs",
}


def skip(directory: str, names: list[str]) -> set[str]:
    """What not to copy: caches anywhere, and the checkout's own build products and runs at its top only."""
    top = TOP_SKIP if Path(directory) == ROOT else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith((".egg-info", ".whl"))}


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_wheel_installs_and_its_console_scripts_train_from_anywhere(tmp_path):
    src = tmp_path / "src"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    shutil.copytree(ROOT, src, symlinks=True, ignore=skip)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(src)])  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("mmssl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in ("mmssl/configs/mae_demo.yaml", "mmssl/assets/palettes/digits16.safetensors",
                   "mmssl/tools/pretrain.py", "mmssl/interop/hf_llava.py", "mmssl/factory/__init__.py"):  # fmt: skip
        assert member in names, member
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert (
        "Apache-2.0" in zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    )

    # A fresh environment without this one's packages on its path, except for the dependencies: a .pth line
    # per site-packages folder of this environment (appended after the new environment's own, so the wheel's
    # mmssl wins; .pth files inside those folders, such as an editable mmssl, are not processed).
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    purelib = Path(run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
                       ).stdout.strip())  # fmt: skip
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
    (purelib / "_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
         "--no-index", str(wheel)])  # fmt: skip

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "MMSSL_DATA": os.environ.get("MMSSL_DATA") or str(tmp_path / "data")}
    where = run(
        [str(venv / "bin" / "python"), "-c", "import mmssl; print(mmssl.__file__)"], cwd=outside, env=env
    )
    assert where.stdout.strip().startswith(str(purelib)), where.stdout  # the installed copy, not the checkout

    res = run([str(venv / "bin" / "mmssl-pretrain"), "--cfg", "mae_demo", "trainer.max_steps=2",
               "backbone.depth=1", "data.batch_size=4", "data.num_workers=0", "data.val_shards=null",
               "trainer.progress_bar=false", "out_dir=runs", "name=wheel"], cwd=outside, env=env)  # fmt: skip
    assert (outside / "runs" / "wheel" / "checkpoints" / "last.ckpt").is_file(), res.stdout
    res = run(
        [str(venv / "bin" / "mmssl"), "pretrain", "--cfg", "igpt_demo", "--print-config"],
        cwd=outside,
        env=env,
    )
    assert "palette: assets/palettes/digits16.safetensors" in res.stdout  # found inside the package
    assert "pretrain" in run([str(venv / "bin" / "mmssl"), "--list"], cwd=outside, env=env).stdout
