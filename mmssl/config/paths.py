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
