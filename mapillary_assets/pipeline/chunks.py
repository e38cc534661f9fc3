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

from mapillary_assets.storage import validate_image_id

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


class ChunkError(ValueError):
    """Bad chunk size or a malformed existing assignment; the message says what to fix."""


def chunk_key(index: int) -> str:
    return f"{CHUNK_PREFIX}{index:06d}"


def _chunk_index(key: str) -> int:
    if not key.startswith(CHUNK_PREFIX) or not key[len(CHUNK_PREFIX) :].isdigit():
        raise ChunkError(f"{key!r} is not a chunk key like 'chunk-000000'")
    return int(key[len(CHUNK_PREFIX) :])


def empty_assignment() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": pd.Series([], dtype="str"),
            "chunk": pd.Series([], dtype="str"),
            "position": pd.Series([], dtype="int64"),
        }
    )


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
    existing: pd.DataFrame | None, discovered_ids: Iterable[str], chunk_size: int | None
) -> pd.DataFrame:
    """Existing rows unchanged, then ids not yet assigned, sorted numerically, in new chunks of
    `chunk_size` (the last one may be smaller; a later refresh starts a new chunk after it). None:
    `adaptive_chunk_size` of the ids assigned once this refresh is done (existing chunks keep theirs).

    `position` is the row's running number over the whole assignment (stable order)."""
    if chunk_size is not None:
        chunk_size = validate_chunk_size(chunk_size)
    existing = _checked_existing(existing)
    known = set(existing["image_id"])
    new_ids = sorted({validate_image_id(i) for i in map(str, discovered_ids)} - known, key=int)
    if not new_ids:
        return existing
    if chunk_size is None:
        chunk_size = adaptive_chunk_size(len(existing) + len(new_ids))
    first_chunk = max(map(_chunk_index, existing["chunk"].unique()), default=-1) + 1
    first_position = int(existing["position"].max()) + 1 if len(existing) else 0
    offsets = np.arange(len(new_ids))
    chunk_of_row = offsets // chunk_size
    # one key object per chunk, shared by its rows (a string per row cost ~60 bytes x 10 M rows)
    keys = np.array(
        [chunk_key(first_chunk + i) for i in range(int(chunk_of_row[-1]) + 1)], dtype=object
    )
    added = pd.DataFrame(
        {
            "image_id": pd.Series(new_ids, dtype="str"),
            "chunk": pd.Series(keys[chunk_of_row], dtype="str"),
            "position": pd.Series(first_position + offsets, dtype="int64"),
        }
    )
    return pd.concat([existing, added], ignore_index=True)


def _checked_existing(existing: pd.DataFrame | None) -> pd.DataFrame:
    if existing is None or len(existing) == 0:
        return empty_assignment()
    missing = [c for c in ASSIGNMENT_COLUMNS if c not in existing.columns]
    if missing:
        raise ChunkError(
            f"existing chunk assignment lacks column(s) {missing}: delete it to start over"
        )
    frame = existing.loc[:, list(ASSIGNMENT_COLUMNS)].astype(
        {"image_id": "str", "chunk": "str", "position": "int64"}
    )
    if frame["image_id"].duplicated().any():
        raise ChunkError(
            "existing chunk assignment lists an image id twice: it is corrupt, delete it to start over"
        )
    return frame.reset_index(drop=True)


def chunk_keys(assignment: pd.DataFrame) -> list[str]:
    """Chunk keys in creation order."""
    return sorted(assignment["chunk"].unique(), key=_chunk_index) if len(assignment) else []


def chunk_image_ids(assignment: pd.DataFrame, chunk_key: str) -> list[str]:
    """The chunk's ids in their stable order; an unknown chunk key raises ChunkError."""
    rows = assignment[assignment["chunk"] == chunk_key]
    if rows.empty:
        raise ChunkError(
            f"chunk {chunk_key!r} is not in the assignment: materialise image_chunks first"
        )
    return rows.sort_values("position")["image_id"].astype(str).tolist()
