"""Dagster-free client for the Mapillary API v4 (real API or the emulator: only URLs and token differ)."""

from mapillary_assets.api.client import MapillaryClient
from mapillary_assets.api.client_config import ClientConfig, Secret
from mapillary_assets.api.entity_decoders import (
    DEFAULT_IMAGE_FIELDS,
    IMAGE_COLUMNS,
    IMAGE_SCHEMA,
    decode_image_entity,
    entities_to_table,
)
from mapillary_assets.api.errors import (
    AuthError,
    DailyQuotaSpent,
    MapillaryError,
    PermanentError,
    RequestTooLargeError,
    ThrottledError,
    TransientError,
    UrlExpiredError,
    classify_error,
)
from mapillary_assets.api.ratelimit import SharedRateLimiter
from mapillary_assets.api.tile_decoders import (
    TileDecodeError,
    TilePoint,
    decode_image_layer,
    decode_sequence_lines,
)

__all__ = [
    "DEFAULT_IMAGE_FIELDS",
    "IMAGE_COLUMNS",
    "IMAGE_SCHEMA",
    "AuthError",
    "ClientConfig",
    "DailyQuotaSpent",
    "MapillaryClient",
    "MapillaryError",
    "PermanentError",
    "RequestTooLargeError",
    "Secret",
    "SharedRateLimiter",
    "ThrottledError",
    "TileDecodeError",
    "TilePoint",
    "TransientError",
    "UrlExpiredError",
    "classify_error",
    "decode_image_entity",
    "decode_image_layer",
    "decode_sequence_lines",
    "entities_to_table",
]
