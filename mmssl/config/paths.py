"""Where configs and the data files they name live."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def find_file(path: str) -> Path | None:
    """A data file named in a config (e.g. ``igpt.palette``): as given, else relative to the repository."""
    for candidate in (Path(path), CONFIG_DIR.parent / path):
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
