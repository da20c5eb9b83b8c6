"""The root folder of wartok's caches: token arrays, FID weights and statistics, downloads."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_root() -> Path:
    """Return ``$WARTOK_CACHE_DIR`` when it is set, else the platform's user cache folder for wartok."""
    return Path(os.environ.get("WARTOK_CACHE_DIR") or platformdirs.user_cache_dir("wartok"))
