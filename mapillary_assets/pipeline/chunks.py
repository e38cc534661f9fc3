"""Stable assignment of image ids to fixed-size chunks (the partitions of every per-image asset).

Once a chunk exists its membership never changes: a refresh keeps every existing row untouched and
puts ids it has not seen before into new chunks only, so materialised chunk partitions stay valid.
Unless a size is given (MAPILLARY_CHUNK_SIZE), new chunks get `adaptive_chunk_size` of the area's
image count, so a country's chunk partitions stay in the low thousands (Dagster's UI slows past tens
of thousands of partitions).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mapillary_assets.pipeline.staging import connect_staging
from mapillary_assets.storage import IMAGE_ID_PATTERN, TEMP_MARKER, DataLayout, StorageError

DEFAULT_CHUNK_SIZE = 5000
MIN_CHUNK_SIZE = 50  # one metadata batch
MAX_CHUNK_SIZE = 100_000
TARGET_MAX_CHUNKS = (
    2000  # the adaptive size keeps an area within this many chunks up to 200 M images
)
CHUNK_SIZE_STEP = 1000
CHUNK_PREFIX = "chunk-"
INVALID_IDS_SHOWN = 3
ASSIGNMENT_COLUMNS = ("image_id", "chunk", "position")
# The assignment is written in chunk order in row groups of this many rows, so a chunk run's filtered
# read decodes the one or two groups holding its chunk, not all 10 M rows of a country's assignment.
ASSIGNMENT_ROW_GROUP_ROWS = 50_000
# DuckDB's limit while it assigns a data dir's ids (staging's is larger): the ids are its whole working set,
# which fills whatever limit it has before spilling (max RSS at 2.15 M ids: 630 MB under 256 MB, 398 under this).
ASSIGNMENT_MEMORY_LIMIT = "100MB"
ASSIGNMENT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("chunk", pa.dictionary(pa.int32(), pa.string())),
        ("position", pa.int64()),
    ]
)
IdColumn = pa.Array | pa.ChunkedArray | Iterable[str]  # Arrow columns are taken as they are
Assignment = pa.Table | pd.DataFrame


class ChunkError(ValueError):
    """Bad chunk size or a malformed existing assignment; the message says what to fix."""


def chunk_key(index: int) -> str:
    return f"{CHUNK_PREFIX}{index:06d}"


def _chunk_index(key: str) -> int:
    if not key.startswith(CHUNK_PREFIX) or not key[len(CHUNK_PREFIX) :].isdigit():
        raise ChunkError(f"{key!r} is not a chunk key like 'chunk-000000'")
    return int(key[len(CHUNK_PREFIX) :])


def empty_assignment() -> pa.Table:
    return ASSIGNMENT_SCHEMA.empty_table()


def validate_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise ChunkError(
            f"chunk size {chunk_size!r} is not an integer: use {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE:,}"
        )
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ChunkError(
            f"chunk size {chunk_size:,} is out of range: use {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE:,} "
            "(MAPILLARY_CHUNK_SIZE; unset, it is chosen from the image count)"
        )
    return int(chunk_size)


def adaptive_chunk_size(image_count: int) -> int:
    """DEFAULT_CHUNK_SIZE while that keeps `image_count` images within TARGET_MAX_CHUNKS chunks (up to
    10 M images), else the size that does, rounded up to CHUNK_SIZE_STEP, at most MAX_CHUNK_SIZE."""
    needed = math.ceil(image_count / TARGET_MAX_CHUNKS)
    if needed <= DEFAULT_CHUNK_SIZE:
        return DEFAULT_CHUNK_SIZE
    return min(MAX_CHUNK_SIZE, math.ceil(needed / CHUNK_SIZE_STEP) * CHUNK_SIZE_STEP)


def assign_chunks(
    existing: Assignment | None, discovered_ids: IdColumn, chunk_size: int | None
) -> pa.Table:
    """Existing rows unchanged, then ids not yet assigned, sorted numerically, in new chunks of
    `chunk_size` (the last one may be smaller; a later refresh starts a new chunk after it). None:
    `adaptive_chunk_size` of the ids assigned once this refresh is done (existing chunks keep theirs).

    `position` is the row's running number over the whole assignment (stable order). The tables in
    memory go through the same DuckDB statements as a data dir's files (`update_assignment`)."""
    if chunk_size is not None:
        chunk_size = validate_chunk_size(chunk_size)
    existing_table = (
        empty_assignment() if existing is None or len(existing) == 0 else _as_table(existing)
    )
    discovered = _id_array(discovered_ids)
    with duckdb.connect(":memory:") as con:
        con.register("existing_input", existing_table)
        con.register("discovered_input", pa.table({"image_id": discovered}))
        con.execute(
            "CREATE TABLE discovered AS SELECT CAST(image_id AS VARCHAR) AS image_id, "
            "'' AS source FROM discovered_input"
        )
        invalid = invalid_ids_by_source(con)
        if invalid:
            raise ValueError(
                f"invalid Mapillary image id {invalid[0][2][0]!r}: expected 1-20 decimal digits"
            )
        load_existing(con, "existing_input")
        extend_assignment(con, chunk_size)
        table = con.execute(ASSIGNMENT_QUERY).to_arrow_table()
    return pa.table(
        {
            "image_id": table["image_id"].cast(pa.string()),
            "chunk": pc.dictionary_encode(table["chunk"].cast(pa.string())).cast(
                ASSIGNMENT_SCHEMA.field("chunk").type
            ),
            "position": table["position"],
        },
        schema=ASSIGNMENT_SCHEMA,
    )


# Over a connection holding the tables `existing` (checked: `load_existing`) and `added` (`extend_assignment`):
# the whole assignment in chunk order, existing rows first and unchanged.
ASSIGNMENT_QUERY = (
    "SELECT image_id, chunk, position FROM existing "
    "UNION ALL SELECT image_id, chunk, position FROM added ORDER BY position"
)


def invalid_ids_by_source(con: duckdb.DuckDBPyConnection) -> list[tuple[str, int, list]]:
    """(source, count, the first few in order) of the ids of table `discovered` (image_id, source) that are
    not 1-20 decimal digits (nulls included), distinct within each source."""
    return con.execute(
        f"""SELECT source, count(*), list(image_id ORDER BY image_id NULLS FIRST)[1:{INVALID_IDS_SHOWN}]
        FROM (SELECT DISTINCT source, image_id FROM discovered
              WHERE NOT coalesce(regexp_full_match(image_id, $pattern), false))
        GROUP BY source ORDER BY source""",
        {"pattern": IMAGE_ID_PATTERN.pattern.strip("^$")},
    ).fetchall()


def load_existing(
    con: duckdb.DuckDBPyConnection, source: str, parameters: dict | None = None
) -> None:
    """Table `existing` from the assignment `source` (a table, view or `read_parquet($path)` with its
    `parameters`), typed as ASSIGNMENT_COLUMNS; a missing column or an id listed twice raises ChunkError."""
    present = {
        row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}", parameters).fetchall()
    }
    missing = [c for c in ASSIGNMENT_COLUMNS if c not in present]
    if missing:
        raise ChunkError(
            f"existing chunk assignment lacks column(s) {missing}: delete it to start over"
        )
    con.execute(
        "CREATE TABLE existing AS SELECT CAST(image_id AS VARCHAR) AS image_id, "
        f"CAST(chunk AS VARCHAR) AS chunk, CAST(position AS BIGINT) AS position FROM {source}",
        parameters,
    )
    # sorted neighbours, not a hash set: hashing 8.6 M ids ran out of the memory limit where a sort spills
    (twice,) = con.execute(
        "SELECT count(*) FROM (SELECT image_id = lag(image_id) OVER (ORDER BY image_id) AS repeated "
        "FROM existing) WHERE repeated"
    ).fetchone()
    if twice:
        raise ChunkError(
            "existing chunk assignment lists an image id twice: it is corrupt, delete it to start over"
        )


def extend_assignment(
    con: duckdb.DuckDBPyConnection, chunk_size: int | None, sample_limit: int | None = None
) -> list[str]:
    """Table `added`: the distinct valid ids of table `discovered` that `existing` lacks, numbered in
    numeric order ((length, string) for digit strings: no integer conversion) into new chunks after the
    existing ones. `sample_limit`: only the first that many distinct discovered ids count. Returns every
    chunk key in creation order. DuckDB sorts, deduplicates and subtracts within its memory limit,
    spilling beyond it, so the process does not grow with the id count."""
    numeric_order = "length(image_id), image_id"
    distinct = "SELECT image_id FROM discovered"
    if sample_limit:
        distinct = f"SELECT DISTINCT image_id FROM discovered ORDER BY {numeric_order} LIMIT {int(sample_limit)}"
    # existing and discovered ids sorted together (existing first among equals), a discovered id kept where its
    # predecessor differs: a sort, which spills, where EXCEPT's hash join ran out of memory at 8.6 M ids
    con.execute(
        f"""CREATE TABLE new_ids AS SELECT image_id FROM (
            SELECT image_id, origin,
                   lag(image_id) OVER (ORDER BY image_id, origin) IS DISTINCT FROM image_id AS first_of_id
            FROM (SELECT image_id, 0 AS origin FROM existing
                  UNION ALL SELECT image_id, 1 AS origin FROM ({distinct})))
        WHERE origin = 1 AND first_of_id"""
    )
    existing_rows, last_position = con.execute(
        "SELECT count(*), max(position) FROM existing"
    ).fetchone()
    existing_keys = sorted(
        (row[0] for row in con.execute("SELECT DISTINCT chunk FROM existing").fetchall()),
        key=_chunk_index,
    )
    (new_rows,) = con.execute("SELECT count(*) FROM new_ids").fetchone()
    if chunk_size is None:
        chunk_size = adaptive_chunk_size(existing_rows + new_rows)
    first_chunk = _chunk_index(existing_keys[-1]) + 1 if existing_keys else 0
    first_position = last_position + 1 if existing_rows else 0
    con.execute(
        f"""CREATE TABLE added AS
        SELECT image_id, printf('{CHUNK_PREFIX}%06d', $first_chunk + (number - 1) // $size) AS chunk,
               $first_position + number - 1 AS position
        FROM (SELECT image_id, row_number() OVER (ORDER BY {numeric_order}) AS number FROM new_ids)""",
        {"first_chunk": first_chunk, "size": chunk_size, "first_position": first_position},
    )
    new_chunks = -(-new_rows // chunk_size)
    return existing_keys + [chunk_key(first_chunk + i) for i in range(new_chunks)]


def _id_array(ids: IdColumn) -> pa.Array | pa.ChunkedArray:
    """Ids as Arrow strings; Arrow input as it is (no combined copy: DuckDB scans the chunks)."""
    if not isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = pa.array([str(i) for i in ids], pa.string())
    return ids.cast(pa.string()) if ids.type != pa.string() else ids


def _as_table(assignment: Assignment) -> pa.Table:
    if isinstance(assignment, pd.DataFrame):
        return pa.Table.from_pandas(assignment, preserve_index=False)
    return assignment


def _chunk_values(assignment: pa.Table) -> list[str]:
    """The distinct chunk keys (unique over the dictionary codes, then decoded: few values)."""
    return pc.unique(assignment["chunk"]).cast(pa.string()).to_pylist()


def chunk_keys(assignment: Assignment) -> list[str]:
    """Chunk keys in creation order."""
    table = _as_table(assignment)
    return sorted(_chunk_values(table), key=_chunk_index) if table.num_rows else []


def chunk_image_ids(assignment: Assignment, chunk_key: str) -> list[str]:
    """The chunk's ids in their stable order; an unknown chunk key raises ChunkError."""
    table = _as_table(assignment)
    rows = table.filter(pc.equal(table["chunk"].cast(pa.string()), chunk_key))
    if rows.num_rows == 0:
        raise ChunkError(
            f"chunk {chunk_key!r} is not in the assignment: materialise image_chunks first"
        )
    return rows.sort_by("position")["image_id"].cast(pa.string()).to_pylist()


class AssignmentUpdate(NamedTuple):
    chunk_keys: list[str]  # every chunk in creation order
    ids: int  # assigned, existing and added
    discovered: int  # rows of the discovery files read (an id found twice counts twice)


def update_assignment(
    layout: DataLayout,
    partition_keys: Iterable[str],
    chunk_size: int | None,
    sample_limit: int | None = None,
    row_group_rows: int = ASSIGNMENT_ROW_GROUP_ROWS,
) -> AssignmentUpdate:
    """`assign_chunks` over the data dir's files: the discovery files of `partition_keys` (those that
    exist) against the stored assignment, rewritten (atomically) only when ids were added. A discovery
    file holding an id that is not 1-20 decimal digits is refused (ids become file paths and URLs
    downstream), with the file and the fix named.

    DuckDB (staging's connection: memory limit, one thread) reads, checks, deduplicates and numbers the
    ids in a scratch database beside the assignment, so memory stays flat in the id count; the result
    streams to Parquet in chunk order, one row group of `row_group_rows` at a time."""
    if chunk_size is not None:
        chunk_size = validate_chunk_size(chunk_size)
    store, key = layout.store, layout.chunk_assignment_key
    files = {
        store.duckdb_source(layout.discovery_key(k)): k
        for k in partition_keys
        if store.exists(layout.discovery_key(k))
    }
    target = layout.work_path(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    # what a killed earlier run left (the asset's pool has one slot: no other run is writing now)
    store.remove_leftovers_of([key])
    for leftover in target.parent.glob(f"{target.name}{TEMP_MARKER}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + TEMP_MARKER, dir=target.parent))
    try:
        with connect_staging(scratch / "assignment.duckdb") as con:
            con.execute(f"SET memory_limit = '{ASSIGNMENT_MEMORY_LIMIT}'")
            store.prepare_duckdb(con)  # a bucket's files are read over S3 (httpfs)
            _load_discovered(con, layout, files)
            if store.exists(key):
                load_existing(con, "read_parquet($path)", {"path": store.duckdb_source(key)})
            else:
                con.register("existing_input", empty_assignment())
                load_existing(con, "existing_input")
            keys = extend_assignment(con, chunk_size, sample_limit)
            (discovered,) = con.execute("SELECT count(*) FROM discovered").fetchone()
            existing_rows, added_rows = con.execute(
                "SELECT (SELECT count(*) FROM existing), (SELECT count(*) FROM added)"
            ).fetchone()
            if added_rows:
                _write_assignment(con, scratch / "assignment.parquet", row_group_rows)
                if layout.is_local:
                    os.replace(scratch / "assignment.parquet", target)
                else:
                    store.upload(key, scratch / "assignment.parquet")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return AssignmentUpdate(keys, existing_rows + added_rows, discovered)


def _load_discovered(
    con: duckdb.DuckDBPyConnection, layout: DataLayout, files: dict[str, str]
) -> None:
    """Table `discovered` (image_id, source: the file) of `files` (DuckDB source -> partition key)."""
    if not files:
        con.execute("CREATE TABLE discovered (image_id VARCHAR, source VARCHAR)")
        return
    con.execute(
        "CREATE TABLE discovered AS SELECT CAST(image_id AS VARCHAR) AS image_id, source_file AS source "
        "FROM read_parquet($files, union_by_name = true, filename = 'source_file')",
        {"files": list(files)},
    )
    invalid = {source: (count, shown) for source, count, shown in invalid_ids_by_source(con)}
    for source, partition_key in files.items():  # the first file in partition order is named
        if source in invalid:
            count, shown = invalid[source]
            raise StorageError(
                f"{layout.store.describe(layout.discovery_key(partition_key))} holds {count:,} invalid "
                f"image id(s) ({', '.join(map(repr, shown))}): Mapillary ids are 1-20 decimal digits. "
                f"Delete the file and re-materialise discovered_images partition {partition_key}"
            )


def _write_assignment(con: duckdb.DuckDBPyConnection, path: Path, row_group_rows: int) -> None:
    """The assignment in chunk order, one row group per `row_group_rows` rows, without Arrow's
    schema: the chunk column is stored as plain strings, whose row-group statistics a chunk run's filtered
    read selects its groups by (a dictionary field there makes the filter read every group)."""
    schema = pa.schema(
        [("image_id", pa.string()), ("chunk", pa.string()), ("position", pa.int64())]
    )
    reader = con.execute(ASSIGNMENT_QUERY).to_arrow_reader(row_group_rows)
    with pq.ParquetWriter(path, schema, compression="zstd", store_schema=False) as writer:
        for batch in reader:
            writer.write_batch(batch.cast(schema), row_group_size=row_group_rows)
