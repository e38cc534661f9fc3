"""Offline, deterministic emulator of the Mapillary API v4 (Graph API, vector tiles, thumbnail CDN)."""

from .records import ImageRecord
from .server import EmulatorServer, Faults, create_app
from .world import World

__all__ = ["EmulatorServer", "Faults", "ImageRecord", "World", "create_app"]
