"""What every discovery route returns: the discovery frame's columns, `DiscoveryStats`, and the
shared last steps (drop malformed ids, drop repeated ids, order by id)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

import mercantile
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mapillary_assets.storage import IMAGE_ID_PATTERN

log = logging.getLogger(__name__)

IMAGE_ZOOM = 14  # zoom of the `image` layer's tiles; the tile_z14 column names one of them
DEFAULT_TILESET = "mly1_public"
# Graph API fields that fill a discovery row (the search route's searches, the sequence route's lookups)
DISCOVERY_FIELDS = (
    "id",
    "geometry",
    "captured_at",
    "compass_angle",
    "sequence",
    "is_pano",
    "creator",
)

DISCOVERY_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("sequence_id", pa.string()),
        ("lon", pa.float64()),
        ("lat", pa.float64()),
        ("captured_at_ms", pa.int64()),
        ("compass_angle", pa.float64()),
        ("is_pano", pa.bool_()),
        ("organization_id", pa.int64()),
        ("creator_id", pa.int64()),
        ("tile_z14", pa.string()),
        ("tileset", pa.string()),
    ]
)
# the pandas dtypes of a discovery frame (nullable ints and bools keep the Parquet types stable)
DISCOVERY_COLUMNS = {
    "image_id": "str",
    "sequence_id": "str",
    "lon": "float64",
    "lat": "float64",
    "captured_at_ms": "Int64",
    "compass_angle": "float64",
    "is_pano": "boolean",
    "organization_id": "Int64",
    "creator_id": "Int64",
    "tile_z14": "str",
    "tileset": "str",
}


@dataclass
class DiscoveryStats:
    coverage_requests: int = 0
    image_tile_requests: int = 0
    cache_hits: int = 0
    corrupt_cache_tiles: int = 0
    empty_z14_tiles: int = 0  # fetched (or cached) z14 tiles without any image
    nonempty_z14_tiles: int = 0
    skipped_z14_tiles: int = 0  # z14 tiles of the AOI the coverage showed to be empty
    images_in_tiles: int = 0  # image points decoded, before clipping to the AOI
    images_in_aoi: int = 0  # rows returned
    duplicates_dropped: int = 0
    invalid_ids_dropped: int = 0  # ids that are not decimal digits: never a path, never a row
    search_requests: int = 0
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return self.coverage_requests + self.image_tile_requests + self.search_requests

    def __str__(self) -> str:
        shown = [
            f"{f.name}={getattr(self, f.name):,}"
            for f in fields(self)
            if f.name != "seconds" and getattr(self, f.name)
        ]
        return ", ".join(shown + [f"seconds={self.seconds:.1f}"])


def empty_discovery_frame() -> pd.DataFrame:
    return to_frame(DISCOVERY_SCHEMA.empty_table())


def _pandas_dtype(arrow_type: pa.DataType):
    if pa.types.is_integer(arrow_type):
        return pd.Int64Dtype()
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    return None


def to_frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper=_pandas_dtype)


def keep_valid_ids(table: pa.Table, source: str, stats: DiscoveryStats) -> pa.Table:
    """Rows whose image id is decimal digits; the others are dropped with a warning naming `source`
    (an id becomes a file name and a number downstream, so a malformed one must stop here)."""
    valid = pc.fill_null(
        pc.match_substring_regex(table["image_id"], IMAGE_ID_PATTERN.pattern), False
    )
    dropped = table.num_rows - pc.sum(valid).as_py() if table.num_rows else 0
    if dropped:
        example = table.filter(pc.invert(valid))["image_id"][0].as_py()
        log.warning(
            "%s: dropped %d image id(s) that are not decimal digits (e.g. %r)",
            source,
            dropped,
            example,
        )
        stats.invalid_ids_dropped += dropped
        return table.filter(valid)
    return table


def finish_frame(parts: list[pa.Table]) -> tuple[pd.DataFrame, int]:
    """Concatenate, drop repeated image ids (first kept), order by numeric id; (frame, dropped)."""
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return empty_discovery_frame(), 0
    frame = to_frame(pa.concat_tables(parts))
    duplicated = frame["image_id"].duplicated()
    frame = frame[~duplicated]
    # numeric order of digit strings without int64 (20-digit ids overflow it): by length, then text
    order = np.lexsort(
        (frame["image_id"].to_numpy(dtype=str), frame["image_id"].str.len().to_numpy())
    )
    return frame.iloc[order].reset_index(drop=True), int(duplicated.sum())


def z14_key(lon: float, lat: float) -> str | None:
    """The "14/x/y" key of the z14 tile holding lon/lat; None for a row without a position."""
    if math.isnan(lon) or math.isnan(lat):
        return None
    tile = mercantile.tile(lon, lat, IMAGE_ZOOM)
    return f"{IMAGE_ZOOM}/{tile.x}/{tile.y}"
