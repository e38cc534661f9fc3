"""Decoder for Graph API image entities (pure: no HTTP, no I/O): JSON objects -> typed rows.

`IMAGE_SCHEMA` fixes the columns and types of a decoded row, so that every metadata chunk agrees
whatever fields the API left out of an answer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from mapillary_assets.api.coercion import bool_or_none, float_or_none, id_str, int_or_none

__all__ = [
    "DEFAULT_IMAGE_FIELDS",
    "IMAGE_COLUMNS",
    "IMAGE_SCHEMA",
    "decode_image_entity",
    "entities_to_table",
]

_UINT32_WRAP = 2**32

# Thumbnail URLs are deliberately absent: they are signed, expire, and must never be stored.
DEFAULT_IMAGE_FIELDS: tuple[str, ...] = (
    "id",
    "captured_at",
    "compass_angle",
    "computed_compass_angle",
    "geometry",
    "computed_geometry",
    "altitude",
    "computed_altitude",
    "sequence",
    "creator",
    "camera_type",
    "make",
    "model",
    "height",
    "width",
    "is_pano",
    "quality_score",
    "exif_orientation",
    "atomic_scale",
    "merge_cc",
    "mesh",
    "sfm_cluster",
)

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("captured_at", pa.timestamp("ms", tz="UTC")),
        pa.field("lon", pa.float64()),
        pa.field("lat", pa.float64()),
        pa.field("computed_lon", pa.float64()),
        pa.field("computed_lat", pa.float64()),
        pa.field("altitude", pa.float64()),
        pa.field("computed_altitude", pa.float64()),
        pa.field("compass_angle", pa.float64()),
        pa.field("computed_compass_angle", pa.float64()),
        pa.field("sequence_id", pa.string()),
        pa.field("creator_id", pa.string()),
        pa.field("creator_username", pa.string()),
        pa.field("camera_type", pa.string()),
        pa.field("make", pa.string()),
        pa.field("model", pa.string()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("is_pano", pa.bool_()),
        pa.field("quality_score", pa.float64()),
        pa.field("exif_orientation", pa.int64()),
        pa.field("atomic_scale", pa.float64()),
        pa.field("merge_cc", pa.string()),
        pa.field("has_mesh", pa.bool_()),
        pa.field("has_sfm_cluster", pa.bool_()),
    ]
)
IMAGE_COLUMNS: tuple[str, ...] = tuple(IMAGE_SCHEMA.names)


def _lonlat(geometry: Any) -> tuple[float | None, float | None]:
    if not isinstance(geometry, Mapping):
        return None, None
    coordinates = geometry.get("coordinates")
    if not isinstance(coordinates, (list, tuple)) or len(coordinates) < 2:
        return None, None
    lon, lat = float_or_none(coordinates[0]), float_or_none(coordinates[1])
    if lon is None or lat is None:
        return None, None
    return lon, lat


def _altitude(value: Any) -> float | None:
    altitude = float_or_none(value)
    if altitude is not None and altitude > 2**31:
        # Negative altitudes sometimes arrive as unsigned 32-bit wraps: 4294967281 means -15.
        altitude -= _UINT32_WRAP
    return altitude


def _timestamp_ms(value: Any) -> dt.datetime | None:
    ms = int_or_none(value)
    if ms is None:
        return None
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _present(value: Any) -> bool | None:
    """True when a `{id, url}` object (mesh, sfm_cluster) is present; the API omits it otherwise."""
    if value is None:
        return None
    return bool(value)


def decode_image_entity(obj: Mapping[str, Any]) -> dict[str, Any]:
    """One Graph API image object -> a row keyed by IMAGE_SCHEMA names (absent fields -> None)."""
    lon, lat = _lonlat(obj.get("geometry"))
    computed_lon, computed_lat = _lonlat(obj.get("computed_geometry"))
    creator = obj.get("creator")
    if not isinstance(creator, Mapping):
        creator = {}
    return {
        "image_id": id_str(obj.get("id")),
        "captured_at": _timestamp_ms(obj.get("captured_at")),
        "lon": lon,
        "lat": lat,
        "computed_lon": computed_lon,
        "computed_lat": computed_lat,
        "altitude": _altitude(obj.get("altitude")),
        "computed_altitude": _altitude(obj.get("computed_altitude")),
        "compass_angle": float_or_none(obj.get("compass_angle")),
        "computed_compass_angle": float_or_none(obj.get("computed_compass_angle")),
        "sequence_id": id_str(obj.get("sequence")),
        "creator_id": id_str(creator.get("id")),
        "creator_username": _text(creator.get("username")),
        "camera_type": _text(obj.get("camera_type")),
        "make": _text(obj.get("make")),
        "model": _text(obj.get("model")),
        "width": int_or_none(obj.get("width")),
        "height": int_or_none(obj.get("height")),
        "is_pano": bool_or_none(obj.get("is_pano")),
        "quality_score": float_or_none(obj.get("quality_score")),
        "exif_orientation": int_or_none(obj.get("exif_orientation")),
        "atomic_scale": float_or_none(obj.get("atomic_scale")),
        "merge_cc": id_str(obj.get("merge_cc")),
        "has_mesh": _present(obj.get("mesh")),
        "has_sfm_cluster": _present(obj.get("sfm_cluster")),
    }


def entities_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Decoded entity rows -> a pyarrow Table with exactly IMAGE_SCHEMA (missing keys -> null)."""
    rows = list(rows)
    columns = {name: [row.get(name) for row in rows] for name in IMAGE_COLUMNS}
    arrays = [pa.array(columns[name], type=IMAGE_SCHEMA.field(name).type) for name in IMAGE_COLUMNS]
    return pa.Table.from_arrays(arrays, schema=IMAGE_SCHEMA)
