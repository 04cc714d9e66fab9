"""Finding a model: local files, named presets, and the Hugging Face hub.

- `resolve`: a path, preset or repo id -> a validated local GGUF (`resolve_model`, `download`);
- `presets`: the named models and the copy a Python package may ship;
- `cache`: the hub cache on disk, read without the network;
- `fetch`: the network, and every failure turned into a typed error.
"""

from __future__ import annotations

from .cache import CachedModel, list_cached
from .fetch import CacheWriteError, HubAccessError, HubConnectionError, HubError
from .presets import DEFAULT_MODEL, PRESETS, Preset
from .resolve import ResolvedModel, download, resolve_model

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "CacheWriteError",
    "CachedModel",
    "HubAccessError",
    "HubConnectionError",
    "HubError",
    "Preset",
    "ResolvedModel",
    "download",
    "list_cached",
    "resolve_model",
]
