"""Stable assignment of image ids to fixed-size chunks (the partitions of every per-image asset).

Once a chunk exists its membership never changes: a refresh keeps every existing row untouched and
puts ids it has not seen before into new chunks only, so materialised chunk partitions stay valid.
Unless a size is given (MAPILLARY_CHUNK_SIZE), new chunks get `adaptive_chunk_size` of the area's
image count, so a country's chunk partitions stay in the low thousands (Dagster's UI slows past tens
of thousands of partitions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mapillary_assets.storage import IMAGE_ID_PATTERN

DEFAULT_CHUNK_SIZE = 5000
MIN_CHUNK_SIZE = 50  # one metadata batch
MAX_CHUNK_SIZE = 100_000
TARGET_MAX_CHUNKS = (
    2000  # the adaptive size keeps an area within this many chunks up to 200 M images
)
CHUNK_SIZE_STEP = 1000
CHUNK_PREFIX = "chunk-"
ASSIGNMENT_COLUMNS = ("image_id", "chunk", "position")
# The assignment is written in chunk order in row groups of this many rows, so a chunk run's filtered
# read decodes the one or two groups holding its chunk, not all 10 M rows of a country's assignment.
ASSIGNMENT_ROW_GROUP_ROWS = 50_000
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


def sorted_unique_ids(ids: IdColumn) -> pa.Array:
    """The distinct ids in numeric order: for digit strings without leading zeros that is the order by
    (length, string), so millions of ids sort as Arrow strings, never as Python ints. Duplicates are
    dropped once sorted (equal neighbours): a hash set of 2.1 M ids (pyarrow.compute.unique) peaked at
    ~5x their size."""
    ids = _id_array(ids)
    order = pc.sort_indices(
        pa.table({"length": pc.utf8_length(ids), "image_id": ids}),
        sort_keys=[("length", "ascending"), ("image_id", "ascending")],
    )
    ordered = ids.take(order)
    if isinstance(ordered, pa.ChunkedArray):
        ordered = ordered.combine_chunks()
    del order
    if len(ordered) < 2:
        return ordered
    first_of_run = pc.not_equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
    keep = pa.concat_arrays([pa.array([True]), first_of_run])
    return ordered.filter(keep)


def invalid_ids(ids: IdColumn) -> pa.Array:
    """The ids that are not 1-20 decimal digits (nulls included), each once."""
    ids = _id_array(ids)
    valid = pc.fill_null(pc.match_substring_regex(ids, IMAGE_ID_PATTERN.pattern), False)
    return pc.unique(ids.filter(pc.invert(valid), null_selection_behavior="emit_null"))


def assign_chunks(
    existing: Assignment | None, discovered_ids: IdColumn, chunk_size: int | None
) -> pa.Table:
    """Existing rows unchanged, then ids not yet assigned, sorted numerically, in new chunks of
    `chunk_size` (the last one may be smaller; a later refresh starts a new chunk after it). None:
    `adaptive_chunk_size` of the ids assigned once this refresh is done (existing chunks keep theirs).

    `position` is the row's running number over the whole assignment (stable order). Arrow throughout
    (ids as one string buffer, `chunk` dictionary-encoded): a country's 10 M ids as Python strings
    cost about 1 GB."""
    if chunk_size is not None:
        chunk_size = validate_chunk_size(chunk_size)
    existing = _checked_existing(existing)
    discovered = _id_array(discovered_ids)
    invalid = invalid_ids(discovered)
    if len(invalid):
        raise ValueError(
            f"invalid Mapillary image id {invalid[0].as_py()!r}: expected 1-20 decimal digits"
        )
    new_ids = sorted_unique_ids(discovered)
    if existing.num_rows:
        new_ids = new_ids.filter(pc.invert(pc.is_in(new_ids, value_set=existing["image_id"])))
    if not len(new_ids):
        return existing
    if chunk_size is None:
        chunk_size = adaptive_chunk_size(existing.num_rows + len(new_ids))
    first_chunk = max(map(_chunk_index, _chunk_values(existing)), default=-1) + 1
    first_position = pc.max(existing["position"]).as_py() + 1 if existing.num_rows else 0
    offsets = np.arange(len(new_ids), dtype=np.int64)
    chunk_of_row = (offsets // chunk_size).astype(np.int32)
    keys = pa.array([chunk_key(first_chunk + i) for i in range(int(chunk_of_row[-1]) + 1)])
    added = pa.table(
        {
            "image_id": new_ids,
            "chunk": pa.DictionaryArray.from_arrays(chunk_of_row, keys),
            "position": pa.array(first_position + offsets, pa.int64()),
        },
        schema=ASSIGNMENT_SCHEMA,
    )
    return pa.concat_tables([existing, added]).unify_dictionaries()


def _id_array(ids: IdColumn) -> pa.Array | pa.ChunkedArray:
    """Ids as Arrow strings; Arrow input as it is (no combined copy: the compute functions take chunks)."""
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


def _checked_existing(existing: Assignment | None) -> pa.Table:
    if existing is None or len(existing) == 0:
        return empty_assignment()
    table = _as_table(existing)
    missing = [c for c in ASSIGNMENT_COLUMNS if c not in table.column_names]
    if missing:
        raise ChunkError(
            f"existing chunk assignment lacks column(s) {missing}: delete it to start over"
        )
    table = table.select(list(ASSIGNMENT_COLUMNS))
    chunk = table["chunk"]
    if not pa.types.is_dictionary(chunk.type):
        chunk = pc.dictionary_encode(chunk.cast(pa.string()))
    table = pa.table(
        {
            "image_id": table["image_id"].cast(pa.string()),
            "chunk": chunk.cast(ASSIGNMENT_SCHEMA.field("chunk").type),
            "position": table["position"].cast(pa.int64()),
        },
        schema=ASSIGNMENT_SCHEMA,
    )
    if pc.count_distinct(table["image_id"]).as_py() != table.num_rows:
        raise ChunkError(
            "existing chunk assignment lists an image id twice: it is corrupt, delete it to start over"
        )
    return table


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
