"""Where configs and the data files they name live.

The recipes (``configs/*.yaml``), the small assets they name (``assets/palettes/*``) and the tools ship inside
the package: in a checkout ``mmssl/configs``, ``mmssl/assets`` and ``mmssl/tools`` are symlinks to the
repository's top-level folders (which stay where they are), and a wheel holds copies (pyproject.toml
``package-data``). So ``--cfg NAME`` and a recipe's relative paths resolve the same from any directory, with or
without a checkout.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../mmssl
CONFIG_DIR = PACKAGE_DIR / "configs"
TOOLS_DIR = PACKAGE_DIR / "tools"


def find_file(path: str) -> Path | None:
    """A data file named in a config (e.g. ``igpt.palette``): as given (absolute, or relative to the working
    directory), else relative to the package (``assets/palettes/digits16.safetensors``)."""
    for candidate in (Path(path), PACKAGE_DIR / path):
        if candidate.is_file():
            return candidate
    return None


HUB_REFUSED = "a model-hub name; mmssl never downloads weights: pass the path of a local file or folder"


def is_hub_name(value: str | None) -> bool:
    """``hf-hub:``/``timm/`` names and URLs (checked before any file is looked for, so never fetched)."""
    if value is None:
        return False
    return (
        value.startswith(("hf-hub:", "hf_hub:"))
        or "://" in value
        or (value.startswith("timm/") and not Path(value).exists())
    )
