"""What config sections share: the ``check`` callback their ``validate`` receives, and choice fields."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any

# check(ok, key, message): raise ConfigError naming the full key path (e.g. "igpt.mode") unless ok
Check = Callable[[bool, str, str], None]


def choice(default: str, options: Sequence[str]) -> Any:
    """A string field that must be one of ``options``; ``config.validate`` checks it and names the key."""
    return field(default=default, metadata={"choices": tuple(options)})
