"""Where frugallm keeps files on disk (the bottom layer: imports nothing from the package)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$FRUGALLM_CACHE_DIR`` or ``<user cache>/frugallm``: converted weights, native builds, probe results."""
    env = os.environ.get("FRUGALLM_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("frugallm"))


def models_dir() -> Path:
    """``$FRUGALLM_MODELS_DIR`` or ``<user cache>/frugallm/models`` (kept apart from the weights cache)."""
    env = os.environ.get("FRUGALLM_MODELS_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("frugallm")) / "models"
