"""The staging tables derived from the stage tables: `images` and `sequences` (DuckDB, Dagster-free).

`images` joins every stage per image id (discovery, metadata and its failures, downloads, blur
scores; the latest chunk's row wins) and adds the filter flags `in_filter_area` and `keep_spacing`,
computed by walking the sequences a batch at a time. `sequences` holds one line per sequence,
built a range of sequence ids at a time. Memory stays bounded whatever the image count.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import shapely
from shapely.geometry.base import BaseGeometry

from mapillary_assets.pipeline.aoi import in_area
from mapillary_assets.pipeline.filters import spacing_filter, tag_in_polygons

WALK_BATCH_ROWS = 50_000  # rows of the spacing walk held in pandas at once
SEQUENCE_BATCH_IMAGES = 50_000  # images per batch of the sequences build

# Columns the joined `images` table takes from metadata as they are (the shared ones are merged).
_METADATA_ONLY = [
    "computed_lon", "computed_lat", "altitude", "computed_altitude", "computed_compass_angle",
    "creator_username", "camera_type", "make", "model", "width", "height", "quality_score",
    "exif_orientation", "atomic_scale", "merge_cc", "has_mesh", "has_sfm_cluster",
]  # fmt: skip


def build_images(
    con,
    filter_polygons,
    inside_spacing_m: float,
    outside_spacing_m: float,
    only_assigned: bool = False,
    area: BaseGeometry | None = None,
    thumbnail_ranges: bool = False,
) -> None:
    """`thumbnail_ranges` (a bucket data dir): `thumbnail_path` names the chunk's tar shard and
    `thumbnail_offset`/`thumbnail_length` the image's bytes in it, one ranged GET away
    (`DataLayout.read_thumbnail`); a local data dir's rows have no such columns (its files are its own)."""
    metadata_only = ", ".join(f"m.{name}" for name in _METADATA_ONLY)
    ranges = (
        ', dl."offset" AS thumbnail_offset, dl."length" AS thumbnail_length'
        if thumbnail_ranges
        else ""
    )
    assigned_only = (
        "WHERE image_id IN (SELECT image_id FROM chunk_assignment)" if only_assigned else ""
    )
    # Each stage's latest row per id as its own table first: in one statement the five windows and four
    # joins pinned more than the memory limit (out of memory at 2.1 M images), one at a time they spill.
    latest = {
        "d": f"SELECT * FROM discovered_images {assigned_only} "
        "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY partition) = 1",
        "m": "SELECT * FROM image_metadata "
        "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY chunk DESC) = 1",
        "f": "SELECT image_id, reason FROM metadata_failures "
        "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY chunk DESC) = 1",
        "dl": "SELECT * FROM downloads "
        "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY status = 'ok' DESC, chunk DESC) = 1",
        "b": "SELECT * FROM blur_scores "
        "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY chunk DESC) = 1",
    }
    for name, select in latest.items():
        con.execute(f"CREATE TABLE latest_{name} AS {select}")
    # Then one stage joined per statement: a statement joining them all held every hash table at once and
    # ran out of the memory limit at 1.2 M images with downloads and blur scores (each join alone spills).
    # Metadata and its failures go together: an id is in one or the other, except after a retry.
    con.execute(
        f"""
        CREATE TABLE images_dmf AS
        SELECT
            d.image_id,
            coalesce(m.sequence_id, d.sequence_id) AS sequence_id,
            coalesce(m.captured_at, CAST(epoch_ms(d.captured_at_ms) AS TIMESTAMPTZ)) AS captured_at,
            CASE WHEN m.lon IS NOT NULL AND m.lat IS NOT NULL THEN m.lon ELSE d.lon END AS lon,
            CASE WHEN m.lon IS NOT NULL AND m.lat IS NOT NULL THEN m.lat ELSE d.lat END AS lat,
            coalesce(m.compass_angle, d.compass_angle) AS compass_angle,
            coalesce(m.is_pano, d.is_pano) AS is_pano,
            CAST(d.organization_id AS VARCHAR) AS organization_id,
            coalesce(m.creator_id, CAST(d.creator_id AS VARCHAR)) AS creator_id,
            d.tile_z14,
            d.partition,
            {metadata_only},
            CASE WHEN m.image_id IS NOT NULL THEN 'ok' WHEN f.image_id IS NOT NULL THEN 'failed'
                 ELSE 'pending' END AS metadata_status,
            CASE WHEN m.image_id IS NULL THEN f.reason END AS metadata_failure_reason
        FROM latest_d d
        LEFT JOIN latest_m m ON m.image_id = d.image_id
        LEFT JOIN latest_f f ON f.image_id = d.image_id
        """
    )
    con.execute(
        f"""
        CREATE TABLE images_dl AS
        SELECT x.*, coalesce(dl.status, 'pending') AS download_status, dl.path AS thumbnail_path {ranges}
        FROM images_dmf x LEFT JOIN latest_dl dl ON dl.image_id = x.image_id
        """
    )
    con.execute(
        """
        CREATE TABLE images_base AS
        SELECT
            row_number() OVER () AS row_id,
            x.*,
            b.blur_value,
            b.sobel_value,
            b.is_blurry,
            b.backend AS blur_backend,
            b.reason AS blur_failure_reason
        FROM images_dl x LEFT JOIN latest_b b ON b.image_id = x.image_id
        """
    )
    con.execute("DROP TABLE images_dmf")
    con.execute("DROP TABLE images_dl")
    for name in latest:
        con.execute(f"DROP TABLE latest_{name}")
    if area is not None:
        _drop_outside_area(con, area)
    _image_flags(con, filter_polygons, inside_spacing_m, outside_spacing_m)
    con.execute(
        """
        CREATE TABLE images AS
        SELECT b.* EXCLUDE (row_id), f.in_filter_area, f.keep_spacing, ST_Point(b.lon, b.lat) AS geom
        FROM images_base b JOIN image_flags f USING (row_id)
        ORDER BY b.sequence_id
        """
    )
    con.execute("DROP TABLE images_base")
    con.execute("DROP TABLE image_flags")


def _drop_outside_area(con, area: BaseGeometry) -> None:
    """Remove `images_base` rows whose published position lies outside `area`, a batch at a time."""
    shapely.prepare(area)
    reader = con.execute("SELECT row_id, lon, lat FROM images_base").to_arrow_reader(
        WALK_BATCH_ROWS
    )
    outside = []
    for batch in reader:
        frame = batch.to_pandas()
        outside.append(
            frame["row_id"].to_numpy("int64")[~in_area(area, frame["lon"], frame["lat"])]
        )
    rows = pa.table({"row_id": np.concatenate(outside) if outside else np.zeros(0, "int64")})
    con.register("rows_outside_area", rows)
    try:
        con.execute(
            "DELETE FROM images_base WHERE row_id IN (SELECT row_id FROM rows_outside_area)"
        )
    finally:
        con.unregister("rows_outside_area")


def _image_flags(con, filter_polygons, inside_spacing_m: float, outside_spacing_m: float) -> None:
    """The table `image_flags`: `in_filter_area` and `keep_spacing` per `images_base` row, walking the
    sequences a batch at a time (whole sequences per batch), each batch's flags inserted as it is done
    (through a second connection, while the first streams the walk), so memory stays bounded whatever
    the image count."""
    con.execute(
        "CREATE TABLE image_flags (row_id BIGINT, in_filter_area BOOLEAN, keep_spacing BOOLEAN)"
    )
    reader = con.execute(
        "SELECT row_id, image_id, sequence_id, epoch_ms(captured_at) AS captured_at_ms, lon, lat FROM images_base "
        "ORDER BY sequence_id NULLS LAST, row_id"
    ).to_arrow_reader(WALK_BATCH_ROWS)
    writer = con.cursor()
    carried: pd.DataFrame | None = None  # the last sequence of a batch may continue in the next one

    def walk(frame: pd.DataFrame) -> None:
        frame = frame.reset_index(drop=True)
        inside = tag_in_polygons(frame["lon"], frame["lat"], filter_polygons)
        frame["in_filter_area"] = inside
        flags = pa.table(
            {
                "row_id": pa.array(frame["row_id"].to_numpy(dtype="int64"), pa.int64()),
                "in_filter_area": pa.array(np.asarray(inside, dtype=bool), pa.bool_()),
                "keep_spacing": pa.array(
                    np.asarray(spacing_filter(frame, inside_spacing_m, outside_spacing_m), bool),
                    pa.bool_(),
                ),
            }
        )
        writer.register("flags_batch", flags)
        try:
            writer.execute("INSERT INTO image_flags SELECT * FROM flags_batch")
        finally:
            writer.unregister("flags_batch")

    try:
        for batch in reader:
            frame = batch.to_pandas()
            if carried is not None:
                frame = pd.concat([carried, frame], ignore_index=True)
            last = frame["sequence_id"].iloc[-1]
            tail = (
                frame["sequence_id"].eq(last)
                if pd.notna(last)
                else pd.Series(False, index=frame.index)
            )
            carried = frame[tail]
            if (~tail).any():
                walk(frame[~tail])
        if carried is not None and len(carried):
            walk(carried)
    finally:
        writer.close()


def build_sequences(con, batch_images: int = SEQUENCE_BATCH_IMAGES) -> None:
    """One line per sequence, built a range of sequence ids at a time (about `batch_images` points each):
    DuckDB cannot spill list() aggregates, and all 1.2 M points at once ran out of the 1 GB memory limit.
    `images` is stored in sequence id order (`build_images`), so each range reads only its own row groups
    (zone maps): unordered, every range scanned the whole table, 450 s of 10.9 M images' staging."""
    where = "sequence_id IS NOT NULL AND geom IS NOT NULL"
    bounds = [
        row[0]
        for row in con.execute(
            f"""
        SELECT sequence_id FROM (
            SELECT sequence_id, sum(count(*)) OVER (ORDER BY sequence_id) AS running
            FROM images WHERE {where} GROUP BY sequence_id)
        QUALIFY running // {int(batch_images)}
              > coalesce(lag(running) OVER (ORDER BY sequence_id), 0) // {int(batch_images)}
        ORDER BY sequence_id
        """
        ).fetchall()
    ]
    select = f"""
        SELECT
            sequence_id,
            CAST(count(*) AS BIGINT) AS image_count,
            CAST(count(*) FILTER (WHERE keep_spacing) AS BIGINT) AS kept_count,
            min(captured_at) AS first_captured_at,
            max(captured_at) AS last_captured_at,
            ST_MakeLine(list(geom ORDER BY captured_at, image_id)) AS geom
        FROM images
        WHERE {where} AND ($lo IS NULL OR sequence_id > $lo) AND ($hi IS NULL OR sequence_id <= $hi)
        GROUP BY sequence_id
        HAVING count(*) >= 2
        ORDER BY sequence_id
    """
    con.execute(f"CREATE TABLE sequences AS {select} LIMIT 0", {"lo": None, "hi": None})
    for lo, hi in zip([None, *bounds], [*bounds, None]):  # ranges (lo, hi], in sequence id order
        con.execute(f"INSERT INTO sequences {select}", {"lo": lo, "hi": hi})
