"""Offline, deterministic emulator of the Mapillary API v4 (Graph API, vector tiles, thumbnail CDN).

The names below load on first use, so a module that needs only the JPEG generator
(`emulator.thumbnails`, e.g. benchmarks/gpu_check.py on a machine without aiohttp) does not import
the server.
"""

import importlib

_EXPORTS = {
    "EmulatorServer": "app",
    "create_app": "app",
    "Faults": "faults",
    "ImageRecord": "records",
    "World": "world",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
