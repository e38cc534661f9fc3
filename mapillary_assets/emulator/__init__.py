"""Offline, deterministic emulator of the Mapillary API v4 (Graph API, vector tiles, thumbnail CDN)."""

from .server import EmulatorServer, Faults, create_app
from .world import ImageRecord, World

__all__ = ["EmulatorServer", "Faults", "ImageRecord", "World", "create_app"]
