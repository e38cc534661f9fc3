"""Chunk assignment: stable membership under refreshes, new ids only in new chunks, no duplicates."""

from __future__ import annotations

import random

import pandas as pd
import pyarrow as pa
import pytest

from mapillary_assets.pipeline.chunks import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    ChunkError,
    adaptive_chunk_size,
    assign_chunks,
    chunk_image_ids,
    chunk_keys,
)
from mapillary_assets.storage import read_parquet, write_parquet_atomic


def ids(start: int, stop: int) -> list[str]:
    return [str(i) for i in range(start, stop)]


def assigned(existing, discovered, chunk_size) -> pd.DataFrame:
    """`assign_chunks`'s Arrow table as a frame, chunk keys decoded (frames compare and group plainly)."""
    table = assign_chunks(existing, discovered, chunk_size=chunk_size)
    return table.set_column(1, "chunk", table["chunk"].cast(pa.string())).to_pandas()


def test_first_assignment_sorts_numerically_and_fills_chunks():
    discovered = ["1000000000000001", "99", "100", "7"] + ids(200, 296)
    assignment = assigned(None, discovered, chunk_size=50)
    assert list(assignment.columns) == ["image_id", "chunk", "position"]
    assert assignment["position"].dtype == "int64"
    assert assignment["position"].tolist() == list(range(100))
    assert assignment["image_id"].tolist()[:3] == ["7", "99", "100"]  # numeric, not lexical order
    assert assignment["image_id"].iloc[-1] == "1000000000000001"
    assert chunk_keys(assignment) == ["chunk-000000", "chunk-000001"]
    assert assignment.groupby("chunk").size().tolist() == [50, 50]


def test_refresh_keeps_existing_rows_and_adds_new_chunks_only():
    first = assigned(None, ids(1000, 1120), chunk_size=50)  # chunks 0, 1 full; 2 holds 20
    # the refresh sees every old id again plus new ids, some numerically *smaller* than the old ones
    refreshed = assigned(first, ids(1000, 1120) + ids(10, 40) + ids(5000, 5010), chunk_size=50)
    pd.testing.assert_frame_equal(refreshed.iloc[: len(first)], first)
    added = refreshed.iloc[len(first) :]
    assert set(added["chunk"]) == {"chunk-000003"}  # the partial chunk 2 stays as it was
    assert added["image_id"].tolist() == ids(10, 40) + ids(5000, 5010)
    assert added["position"].tolist() == list(range(120, 160))
    assert chunk_image_ids(refreshed, "chunk-000002") == chunk_image_ids(first, "chunk-000002")


def test_refresh_without_new_ids_changes_nothing():
    first = assigned(None, ids(1, 200), chunk_size=50)
    again = assigned(first, list(reversed(ids(1, 200))), chunk_size=50)
    pd.testing.assert_frame_equal(again, first)


def test_ids_that_disappear_keep_their_assignment():
    first = assigned(None, ids(1, 101), chunk_size=50)
    later = assigned(first, ids(50, 60), chunk_size=50)
    pd.testing.assert_frame_equal(later, first)


def test_many_refreshes_never_duplicate_or_move_an_id(tmp_path):
    rng = random.Random(3)
    path = tmp_path / "assignment.parquet"
    universe = [str(rng.randrange(10**15)) for _ in range(3000)]
    seen: dict[str, str] = {}
    for step in range(6):
        existing = read_parquet(path) if path.exists() else None
        discovered = rng.sample(universe[: 500 * (step + 1)], k=400 * (step + 1)) + ["42", "42"]
        assignment = assigned(existing, discovered, chunk_size=64)
        write_parquet_atomic(assignment, path)
        assert not assignment["image_id"].duplicated().any()
        assert assignment["position"].is_unique
        for image_id, chunk in zip(assignment["image_id"], assignment["chunk"]):
            assert seen.setdefault(image_id, chunk) == chunk
    assert set(universe[:3000]) >= set(seen) - {"42"}


def test_chunk_image_ids_in_stable_order_and_unknown_chunk():
    assignment = assigned(None, ids(1, 121), chunk_size=50)
    assert chunk_image_ids(assignment, "chunk-000001") == ids(51, 101)
    with pytest.raises(ChunkError, match="not in the assignment"):
        chunk_image_ids(assignment, "chunk-000009")


def test_empty_inputs():
    assert len(assigned(None, [], chunk_size=DEFAULT_CHUNK_SIZE)) == 0
    assert chunk_keys(assigned(None, [], chunk_size=DEFAULT_CHUNK_SIZE)) == []


@pytest.mark.parametrize("size", [0, 49, 100_001, 2.5, "5000", True])
def test_chunk_size_is_validated(size):
    with pytest.raises(ChunkError, match="chunk size"):
        assigned(None, ids(1, 10), chunk_size=size)


def test_invalid_ids_and_corrupt_existing_are_rejected():
    with pytest.raises(ValueError, match="invalid Mapillary image id"):
        assigned(None, ["12", "abc"], chunk_size=50)
    broken = pd.DataFrame(
        {"image_id": ["1", "1"], "chunk": ["chunk-000000"] * 2, "position": [0, 1]}
    )
    with pytest.raises(ChunkError, match="twice"):
        assigned(broken, ids(1, 5), chunk_size=50)
    with pytest.raises(ChunkError, match="lacks column"):
        assigned(pd.DataFrame({"image_id": ["1"]}), ids(1, 5), chunk_size=50)


@pytest.mark.parametrize(
    ("images", "size"),
    [
        (0, DEFAULT_CHUNK_SIZE),
        (1_200_000, DEFAULT_CHUNK_SIZE),  # Zurich: 240 chunks
        (10_000_000, DEFAULT_CHUNK_SIZE),  # 2,000 chunks exactly
        (10_000_001, 6_000),
        (10_946_055, 6_000),  # the Switzerland world: 1,825 chunks
        (150_000_000, 75_000),
        (200_000_000, MAX_CHUNK_SIZE),
        (1_000_000_000, MAX_CHUNK_SIZE),  # beyond 200 M images the chunks grow in number again
    ],
)
def test_adaptive_chunk_size_keeps_chunks_in_the_low_thousands(images, size):
    assert adaptive_chunk_size(images) == size
    if images <= 200_000_000:
        assert -(-images // size) <= 2000


def test_without_a_size_new_chunks_take_the_adaptive_size_and_old_ones_keep_theirs(monkeypatch):
    monkeypatch.setattr("mapillary_assets.pipeline.chunks.TARGET_MAX_CHUNKS", 2)
    monkeypatch.setattr("mapillary_assets.pipeline.chunks.DEFAULT_CHUNK_SIZE", 100)
    monkeypatch.setattr("mapillary_assets.pipeline.chunks.CHUNK_SIZE_STEP", 10)
    first = assigned(None, ids(1, 151), chunk_size=None)  # 150 ids: the default 100 fits 2
    assert first.groupby("chunk").size().tolist() == [100, 50]
    # 400 more: 550 ids want chunks of ceil(550 / 2) = 275 rounded up to 280; old chunks stay as they are
    refreshed = assigned(first, ids(1, 551), chunk_size=None)
    pd.testing.assert_frame_equal(refreshed.iloc[: len(first)], first)
    assert refreshed.groupby("chunk").size().tolist() == [100, 50, 280, 120]
