"""Where sae-kit keeps derived files (the converted default model): `SAE_KIT_CACHE`, else `$XDG_CACHE_HOME/sae-kit`, else ~/.cache/sae-kit."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The user cache directory for sae-kit."""
    if os.environ.get("SAE_KIT_CACHE"):
        return Path(os.environ["SAE_KIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sae-kit"
