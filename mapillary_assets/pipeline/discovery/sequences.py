"""The sequence route: the images of given sequence ids inside the area of interest.

Each sequence's image ids come from `image_ids?sequence_id=`; their positions from batch lookups
(the route has no tile to read them from), clipped to the AOI like the other routes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd
import pyarrow as pa
import shapely

from mapillary_assets.api.coercion import int_or_none
from mapillary_assets.pipeline.aoi import AreaOfInterest
from mapillary_assets.pipeline.discovery.results import (
    DEFAULT_TILESET,
    DISCOVERY_FIELDS,
    DISCOVERY_SCHEMA,
    DiscoveryStats,
    finish_frame,
    keep_valid_ids,
    z14_key,
)
from mapillary_assets.pipeline.metadata import (
    conform_failures,
    fetch_metadata,
    fetch_sequence_image_ids,
)


async def discover_by_sequences(
    client,
    aoi: AreaOfInterest,
    sequence_ids: Sequence[str],
    existing: pd.DataFrame | None = None,
    tileset_label: str = DEFAULT_TILESET,
) -> tuple[pd.DataFrame, pd.DataFrame, DiscoveryStats]:
    """Images of `sequence_ids` inside the AOI: (frame, failures, stats).

    Each sequence's image ids are listed afresh (a sequence may have grown); positions are looked up
    only for ids `existing` (an earlier result) does not hold. `failures` are the ids whose lookup
    failed (pipeline.metadata's failure columns); unknown sequences are empty, with a warning."""
    started = time.perf_counter()
    stats = DiscoveryStats()
    by_sequence = await fetch_sequence_image_ids(client, sequence_ids)
    stats.search_requests += len(by_sequence)
    wanted = list(dict.fromkeys(image_id for ids in by_sequence.values() for image_id in ids))
    kept = (
        existing[existing["image_id"].isin(wanted)]
        if existing is not None and len(existing)
        else None
    )
    known = set(kept["image_id"]) if kept is not None else set()
    result = await fetch_metadata(
        client, [i for i in wanted if i not in known], fields=DISCOVERY_FIELDS
    )
    stats.search_requests += result.requests
    rows = result.rows
    table = keep_valid_ids(
        pa.Table.from_arrays(
            [
                pa.array(rows["image_id"], pa.string()),
                pa.array(rows["sequence_id"], pa.string()),
                pa.array(rows["lon"], pa.float64()),
                pa.array(rows["lat"], pa.float64()),
                pa.array(rows["captured_at"], pa.timestamp("ms", tz="UTC")).cast(pa.int64()),
                pa.array(rows["compass_angle"], pa.float64()),
                pa.array(rows["is_pano"], pa.bool_()),
                pa.nulls(len(rows), pa.int64()),
                pa.array([int_or_none(c) for c in rows["creator_id"]], pa.int64()),
                pa.array(
                    [z14_key(lon, lat) for lon, lat in zip(rows["lon"], rows["lat"])], pa.string()
                ),
                pa.array([tileset_label] * len(rows), pa.string()),
            ],
            schema=DISCOVERY_SCHEMA,
        ),
        "sequence route",
        stats,
    )
    stats.images_in_tiles = table.num_rows + len(known)
    lon, lat = (
        table["lon"].to_numpy(zero_copy_only=False),
        table["lat"].to_numpy(zero_copy_only=False),
    )
    inside = shapely.intersects_xy(aoi.geometry, lon, lat)
    parts = (
        [pa.Table.from_pandas(kept, schema=DISCOVERY_SCHEMA, preserve_index=False)]
        if kept is not None
        else []
    )
    frame, dropped = finish_frame(parts + [table.filter(pa.array(inside))])
    stats.duplicates_dropped = dropped
    stats.images_in_aoi = len(frame)
    stats.seconds = time.perf_counter() - started
    return frame, conform_failures(result.failures), stats
