"""Mapillary's vector tilesets for the emulator, drawn from the world (encoding: ``mvt.py``).

Layers, by zoom (``mly1_public``):

* z14: ``sequence`` (one LineString per sequence, all its images) then ``image`` (one Point per image);
* z6-13: ``sequence`` only, one 2-point line per sequence (from its first to its last image), as
  Mapillary draws one line per sequence (piece): an exact coverage mask of non-empty z14 tiles whose
  line count follows the image count at any density (each sequence is generated alone, without its
  image ids, and kept by the world: ``World.tile_lines``);
* z0-5: ``overview``, one Point per non-empty z14 tile (the first image of its first sequence).

``mly1_computed_public`` places z14 images at their computed (SfM) position (the original one when
there is none), so an image near a border may appear in the neighbouring z14 tile; its lower zooms
are the same as ``mly1_public``'s.
"""

from __future__ import annotations

import math

import numpy as np

from .geography import ZOOM
from .mvt import LayerValues, layer, line_feature, point_features, tile_pixels
from .records import TileImages
from .world import World

TILESETS = ("mly1_public", "mly1_computed_public")


def render_tile(world: World, tileset: str, z: int, x: int, y: int) -> bytes:
    """The tile's bytes; b"" when it holds nothing."""
    if tileset not in TILESETS:
        raise KeyError(tileset)
    if z == ZOOM:
        if tileset == "mly1_public":
            return _z14_tile(world, world.tile_images(x, y), None, x, y)
        return _z14_computed_tile(world, x, y)
    if z > ZOOM:
        raise ValueError("zoom above 14")
    return _low_zoom_tile(world, z, x, y)


def _z14_tile(
    world: World,
    tile: TileImages,
    rows: np.ndarray | None,
    x: int,
    y: int,
    lon: np.ndarray | None = None,
    lat: np.ndarray | None = None,
) -> bytes:
    """The two z14 layers for ``rows`` of ``tile`` (all rows when None), at positions lon/lat."""
    if rows is None:
        rows = np.arange(len(tile))
    if len(rows) == 0:
        return b""
    lon = tile.lon[rows] if lon is None else lon
    lat = tile.lat[rows] if lat is None else lat
    px, py = tile_pixels(lon, lat, ZOOM, x, y)
    seq_rows = tile.sequence_row[rows]
    sequences = tile.sequences

    # sequence layer: one line per run of rows of one sequence (in capture order)
    values = LayerValues()
    starts = np.flatnonzero(np.diff(seq_rows, prepend=-1))
    ends = np.append(starts[1:], len(rows))
    features = []
    for fid, (a, b) in enumerate(zip(starts.tolist(), ends.tolist()), start=1):
        seq = sequences[int(seq_rows[a])]
        first = int(rows[a])
        tags = [
            0,
            values.add(int(tile.captured_at[first])),
            1,
            values.add(seq.id),
            2,
            values.add(int(tile.ids[first])),
            3,
            values.add(bool(world.camera(seq)[3])),
        ]
        if seq.organization_id is not None:
            tags += [4, values.add(int(seq.organization_id))]
        features.append(line_feature(fid, tags, px[a:b], py[a:b]))
    sequence_layer = layer(
        "sequence",
        ["captured_at", "id", "image_id", "is_pano", "organization_id"],
        values,
        b"".join(features),
    )

    # image layer, vectorised per property column
    values = LayerValues()
    n = len(rows)
    seq_ids = np.array([values.add(s.id) for s in sequences], dtype=np.int64)
    pano = np.array([values.add(bool(world.camera(s)[3])) for s in sequences], dtype=np.int64)
    org_index = np.array(
        [
            values.add(int(s.organization_id)) if s.organization_id is not None else -1
            for s in sequences
        ],
        dtype=np.int64,
    )
    creators = np.array([world.creator_of(s)[1] for s in sequences], dtype=np.uint64)
    captured = values.add_ints(tile.captured_at[rows])
    compass = values.add_doubles(tile.compass[rows])
    image_ids = values.add_ints(tile.ids[rows])
    creator_values = values.add_ints(creators[seq_rows])
    keys = [
        "captured_at",
        "compass_angle",
        "id",
        "sequence_id",
        "organization_id",
        "is_pano",
        "creator_id",
    ]
    tags = np.zeros((n, 14), dtype=np.uint64)
    for k in range(7):
        tags[:, 2 * k] = k
    tags[:, 1], tags[:, 3], tags[:, 5] = captured, compass, image_ids
    tags[:, 7] = seq_ids[seq_rows]
    org = org_index[seq_rows]
    tags[:, 9] = np.maximum(org, 0)
    tags[:, 11] = pano[seq_rows]
    tags[:, 13] = creator_values
    present = np.ones((n, 14), dtype=bool)
    present[:, 8] = present[:, 9] = org >= 0
    image_layer = layer(
        "image", keys, values, point_features(len(starts) + 1, tags, present, px, py)
    )
    return sequence_layer + image_layer


def _z14_computed_tile(world: World, x: int, y: int) -> bytes:
    parts = []
    for dx, dy in ((0, 0), (-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)):
        nx, ny = x + dx, y + dy
        if not world.tile_sequence_count(nx, ny):
            continue
        tile = world.tile_images(nx, ny)
        clon = np.where(np.isnan(tile.computed_lon), tile.lon, tile.computed_lon)
        clat = np.where(np.isnan(tile.computed_lat), tile.lat, tile.computed_lat)
        gx = (clon + 180.0) / 360.0 * 2.0**ZOOM
        phi = np.radians(clat)
        gy = (1.0 - np.log(np.tan(phi) + 1.0 / np.cos(phi)) / math.pi) / 2.0 * 2.0**ZOOM
        rows = np.flatnonzero((np.floor(gx) == x) & (np.floor(gy) == y))
        if len(rows):
            parts.append((tile, rows, clon[rows], clat[rows]))
    if not parts:
        return b""
    if len(parts) == 1:
        tile, rows, lon, lat = parts[0]
        return _z14_tile(world, tile, rows, x, y, lon, lat)
    return _merge_z14(world, parts, x, y)


def _merge_z14(world: World, parts, x: int, y: int) -> bytes:
    """Images from several generated tiles in one computed tile: build a combined view."""
    sequences = []
    columns: dict[str, list[np.ndarray]] = {
        k: [] for k in ("captured_at", "compass", "ids", "sequence_row")
    }
    lons, lats = [], []
    for tile, rows, lon, lat in parts:
        base = len(sequences)
        sequences.extend(tile.sequences)
        columns["captured_at"].append(tile.captured_at[rows])
        columns["compass"].append(tile.compass[rows])
        columns["ids"].append(tile.ids[rows])
        columns["sequence_row"].append(tile.sequence_row[rows] + base)
        lons.append(lon)
        lats.append(lat)
    merged = _MergedTile(sequences, {k: np.concatenate(v) for k, v in columns.items()})
    return _z14_tile(world, merged, None, x, y, np.concatenate(lons), np.concatenate(lats))


class _MergedTile:
    def __init__(self, sequences, columns):
        self.sequences = sequences
        for k, v in columns.items():
            setattr(self, k, v)

    def __len__(self) -> int:
        return len(self.ids)


def _low_zoom_tile(world: World, z: int, x: int, y: int) -> bytes:
    shift = ZOOM - z
    below = [(tx, ty) for tx, ty in world.nonempty_tiles() if tx >> shift == x and ty >> shift == y]
    if not below:
        return b""
    if z >= 6:
        return _coverage_lines(world, below, z, x, y)
    summaries = [world.tile_summary(tx, ty) for tx, ty in below]
    values = LayerValues()
    px, py = tile_pixels(
        np.array([s["first_lon"] for s in summaries]),
        np.array([s["first_lat"] for s in summaries]),
        z,
        x,
        y,
    )
    tags = np.array(
        [
            [
                0,
                values.add(s["captured_at"]),
                1,
                values.add(s["image_id"]),
                2,
                values.add(s["sequence_id"]),
                3,
                values.add(s["is_pano"]),
            ]
            for s in summaries
        ],
        dtype=np.uint64,
    )
    features = point_features(1, tags, np.ones(tags.shape, bool), px, py)
    return layer("overview", ["captured_at", "id", "sequence_id", "is_pano"], values, features)


def _coverage_lines(world: World, below: list[tuple[int, int]], z: int, x: int, y: int) -> bytes:
    """The `sequence` layer of a z6-13 tile: one 2-point line per sequence of the z14 tiles below
    (from its first to its last image), so the line count follows the image count at any density."""
    values = LayerValues()
    features = []
    for tx, ty in below:
        lines = world.tile_lines(tx, ty)
        first_x, first_y = tile_pixels(lines.first_lon, lines.first_lat, z, x, y)
        last_x, last_y = tile_pixels(lines.last_lon, lines.last_lat, z, x, y)
        for row, sequence_id in enumerate(lines.sequence_ids):
            tags = [
                0,
                values.add(int(lines.captured_at[row])),
                1,
                values.add(sequence_id),
                2,
                values.add(int(lines.image_ids[row])),
                3,
                values.add(bool(lines.is_pano[row])),
            ]
            if lines.organization_ids[row] >= 0:
                tags += [4, values.add(int(lines.organization_ids[row]))]
            features.append(
                line_feature(
                    len(features) + 1,
                    tags,
                    np.array([first_x[row], last_x[row]]),
                    np.array([first_y[row], last_y[row]]),
                )
            )
    return layer(
        "sequence",
        ["captured_at", "id", "image_id", "is_pano", "organization_id"],
        values,
        b"".join(features),
    )
