"""Stable assignment of image ids to fixed-size chunks (the partitions of every per-image asset).

Once a chunk exists its membership never changes: a refresh keeps every existing row untouched and
puts ids it has not seen before into new chunks only, so materialised chunk partitions stay valid.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from mapillary_assets.storage import validate_image_id

DEFAULT_CHUNK_SIZE = 5000
MIN_CHUNK_SIZE = 50  # one metadata batch
MAX_CHUNK_SIZE = 100_000
CHUNK_PREFIX = "chunk-"
ASSIGNMENT_COLUMNS = ("image_id", "chunk", "position")


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
            f"(MAPILLARY_CHUNK_SIZE, default {DEFAULT_CHUNK_SIZE:,})"
        )
    return int(chunk_size)


def assign_chunks(
    existing: pd.DataFrame | None, discovered_ids: Iterable[str], chunk_size: int
) -> pd.DataFrame:
    """Existing rows unchanged, then ids not yet assigned, sorted numerically, in new chunks of
    `chunk_size` (the last one may be smaller; a later refresh starts a new chunk after it).

    `position` is the row's running number over the whole assignment (stable order)."""
    chunk_size = validate_chunk_size(chunk_size)
    existing = _checked_existing(existing)
    known = set(existing["image_id"])
    new_ids = sorted({validate_image_id(i) for i in map(str, discovered_ids)} - known, key=int)
    if not new_ids:
        return existing
    first_chunk = max(map(_chunk_index, existing["chunk"].unique()), default=-1) + 1
    first_position = int(existing["position"].max()) + 1 if len(existing) else 0
    offsets = np.arange(len(new_ids))
    added = pd.DataFrame(
        {
            "image_id": pd.Series(new_ids, dtype="str"),
            "chunk": pd.Series(
                [chunk_key(first_chunk + i) for i in offsets // chunk_size], dtype="str"
            ),
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
