"""Offline, deterministic emulator of the Mapillary API v4 (Graph API, vector tiles, thumbnail CDN)."""

from .app import EmulatorServer, create_app
from .faults import Faults
from .records import ImageRecord
from .world import World

__all__ = ["EmulatorServer", "Faults", "ImageRecord", "World", "create_app"]
