"""Decoders for Mapillary vector tiles (pure: no HTTP, no I/O).

Vector tiles are parsed with the protobuf message class shipped by `mapbox_vector_tile`, but the
features are walked here rather than through `mapbox_vector_tile.decode`: a dense z14 tile holds
~170,000 image points and the generic decoder (per-feature dicts, string-based command parsing)
takes far longer than this direct walk. Coordinates follow the MVT convention (y grows downward,
as `decode(..., default_options={"y_coord_down": True})` reports them) and are converted to
lon/lat in one vectorised web-mercator inverse per layer.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from mapbox_vector_tile.Mapbox import vector_tile_pb2

from mapillary_assets.api.coercion import bool_or_none, float_or_none, id_str, int_or_none

__all__ = [
    "TileDecodeError",
    "TilePoint",
    "decode_image_layer",
    "decode_sequence_lines",
    "tile_pixels_to_lonlat",
]

DEFAULT_EXTENT = 4096
_GZIP_MAGIC = b"\x1f\x8b"
_MOVE_TO, _LINE_TO, _CLOSE_PATH = 1, 2, 7
_POINT, _LINESTRING = 1, 2


class TileDecodeError(ValueError):
    """The bytes are not a valid (optionally gzipped) Mapbox vector tile."""


@dataclass(frozen=True, slots=True)
class TilePoint:
    image_id: str
    lon: float
    lat: float
    captured_at_ms: int | None
    sequence_id: str | None
    compass_angle: float | None
    is_pano: bool | None
    organization_id: int | None
    creator_id: int | None


def tile_pixels_to_lonlat(
    px: np.ndarray, py: np.ndarray, z: int, x: int, y: int, extent: int = DEFAULT_EXTENT
) -> tuple[np.ndarray, np.ndarray]:
    """Web-mercator inverse of tile pixel coordinates (origin top-left, y down) of tile z/x/y."""
    n = float(2**z)
    tx = (x + np.asarray(px, dtype=np.float64) / extent) / n
    ty = (y + np.asarray(py, dtype=np.float64) / extent) / n
    lon = tx * 360.0 - 180.0
    lat = np.degrees(np.arctan(np.sinh(math.pi * (1.0 - 2.0 * ty))))
    return lon, lat


def _parse_tile(data: bytes) -> vector_tile_pb2.tile | None:
    if not data:
        return None
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise TileDecodeError(f"gzipped vector tile is corrupt: {exc}") from None
        if not data:
            return None
    tile = vector_tile_pb2.tile()
    try:
        tile.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError (message type differs per backend)
        raise TileDecodeError(f"not a Mapbox vector tile ({len(data)} bytes): {exc}") from None
    return tile


def _layer(tile: vector_tile_pb2.tile | None, name: str):
    if tile is None:
        return None
    for layer in tile.layers:
        if layer.name == name:
            return layer
    return None


def _layer_values(layer) -> list[Any]:
    values = []
    for value in layer.values:
        fields = value.ListFields()
        values.append(fields[0][1] if fields else None)
    return values


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _first_point(geometry) -> tuple[int, int] | None:
    """First MoveTo of a point geometry (an image feature is one point)."""
    if len(geometry) < 3 or geometry[0] & 7 != _MOVE_TO or geometry[0] >> 3 < 1:
        return None
    return _zigzag(geometry[1]), _zigzag(geometry[2])


def _line_parts(geometry) -> list[list[tuple[int, int]]]:
    """Pixel coordinates of each part (MoveTo starts a part) of a point or line geometry."""
    parts: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    cx = cy = 0
    i, size = 0, len(geometry)
    while i < size:
        command, count = geometry[i] & 7, geometry[i] >> 3
        i += 1
        if command == _CLOSE_PATH:
            continue
        if command not in (_MOVE_TO, _LINE_TO) or i + 2 * count > size:
            break
        for _ in range(count):
            cx += _zigzag(geometry[i])
            cy += _zigzag(geometry[i + 1])
            i += 2
            if command == _MOVE_TO and current:
                parts.append(current)
                current = []
            current.append((cx, cy))
    if current:
        parts.append(current)
    return parts


def decode_image_layer(data: bytes, z: int, x: int, y: int) -> list[TilePoint]:
    """Image points of a z14 tile (`image` layer), lon/lat from the tile pixel coordinates.

    Accepts gzipped bodies; b"" (an empty tile) and tiles without an `image` layer give [].
    """
    layer = _layer(_parse_tile(data), "image")
    if layer is None or not layer.features:
        return []
    extent = layer.extent or DEFAULT_EXTENT
    keys = list(layer.keys)
    values = _layer_values(layer)
    key_index = {name: i for i, name in enumerate(keys)}
    # One slot per property we keep; tag pairs are mapped to slots without building a dict per feature.
    wanted = (
        "id",
        "captured_at",
        "sequence_id",
        "compass_angle",
        "is_pano",
        "organization_id",
        "creator_id",
    )
    slot_of_key = [-1] * len(keys)
    for slot, name in enumerate(wanted):
        if name in key_index:
            slot_of_key[key_index[name]] = slot

    n_keys, n_values = len(keys), len(values)
    pxs: list[int] = []
    pys: list[int] = []
    props: list[list[Any]] = []
    for feature in layer.features:
        point = _first_point(feature.geometry)
        if point is None:
            continue
        row: list[Any] = [None] * len(wanted)
        tag_iter = iter(feature.tags)
        for key, value in zip(tag_iter, tag_iter):
            if key < n_keys and value < n_values:
                slot = slot_of_key[key]
                if slot >= 0:
                    row[slot] = values[value]
        if row[0] is None:
            continue
        pxs.append(point[0])
        pys.append(point[1])
        props.append(row)

    lons, lats = tile_pixels_to_lonlat(np.array(pxs), np.array(pys), z, x, y, extent)
    return [
        TilePoint(
            image_id=str(image_id) if type(image_id) is int else id_str(image_id),
            lon=lon,
            lat=lat,
            captured_at_ms=captured if type(captured) is int else int_or_none(captured),
            sequence_id=sequence if type(sequence) is str else id_str(sequence),
            compass_angle=compass if type(compass) is float else float_or_none(compass),
            is_pano=bool_or_none(pano),
            organization_id=org if type(org) is int else int_or_none(org),
            creator_id=creator if type(creator) is int else int_or_none(creator),
        )
        for (image_id, captured, sequence, compass, pano, org, creator), lon, lat in zip(
            props, lons.tolist(), lats.tolist()
        )
    ]


def decode_sequence_lines(data: bytes, z: int, x: int, y: int) -> list[list[tuple[float, float]]]:
    """lon/lat coordinates of every `sequence` line part (z6-14) and `overview` point (z0-5).

    A MultiLineString contributes one list per part; an overview point is a one-element list.
    """
    tile = _parse_tile(data)
    lines: list[list[tuple[float, float]]] = []
    for name in ("sequence", "overview"):
        layer = _layer(tile, name)
        if layer is None:
            continue
        extent = layer.extent or DEFAULT_EXTENT
        parts: list[list[tuple[int, int]]] = []
        for feature in layer.features:
            if feature.type not in (_POINT, _LINESTRING):
                continue
            parts.extend(_line_parts(list(feature.geometry)))
        if not parts:
            continue
        flat = np.array([p for part in parts for p in part], dtype=np.float64)
        lons, lats = tile_pixels_to_lonlat(flat[:, 0], flat[:, 1], z, x, y, extent)
        coords = list(zip(lons.tolist(), lats.tolist()))
        start = 0
        for part in parts:
            lines.append(coords[start : start + len(part)])
            start += len(part)
    return lines
