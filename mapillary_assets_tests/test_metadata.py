"""Metadata stage: batching, bisection of unknown ids, failure records, resume; then against the emulator."""

from __future__ import annotations

import asyncio
import math

import pandas as pd
import pyarrow.parquet as pq
import pytest

from mapillary_assets.api import ClientConfig, MapillaryClient, Secret
from mapillary_assets.api.entity_decoders import IMAGE_COLUMNS
from mapillary_assets.api.errors import AuthError, PermanentError, TransientError
from mapillary_assets.emulator import EmulatorServer, World
from mapillary_assets.pipeline.aoi import load_aoi
from mapillary_assets.pipeline.metadata import (
    BATCH_SIZE,
    NOT_RETURNED,
    MetadataResult,
    conform_metadata,
    fetch_metadata,
    fetch_sequence_image_ids,
    ids_to_fetch,
    merge_with_existing,
)
from mapillary_assets.storage import read_parquet, write_parquet_atomic
from mapillary_assets_tests.support.clients import emulator_client


def entity(image_id: str) -> dict:
    n = int(image_id)
    return {
        "id": image_id,
        "captured_at": 1_600_000_000_000 + n,
        "geometry": {"type": "Point", "coordinates": [8.5 + n * 1e-6, 47.3]},
        "sequence": f"seq{n % 7}",
        "width": 4000,
        "is_pano": n % 2 == 0,
        "creator": {"id": "1001", "username": "someone"},
    }


class FakeClient:
    """`get_images` as the API answers it: a batch with an unknown id fails as a whole (code 100/33)."""

    def __init__(self, known, omitted=(), flaky=(), auth_fail=False):
        self.known, self.omitted, self.flaky, self.auth_fail = (
            set(known),
            set(omitted),
            set(flaky),
            auth_fail,
        )
        self.batches: list[list[str]] = []

    async def get_images(self, image_ids, fields):
        assert len(image_ids) <= BATCH_SIZE
        self.batches.append(list(image_ids))
        await asyncio.sleep(0)
        if self.auth_fail:
            raise AuthError("token rejected (code 190): set MAPILLARY_ACCESS_TOKEN", code=190)
        if self.flaky & set(image_ids):
            raise TransientError("server error (HTTP 503)", status=503)
        if set(image_ids) - self.known - self.omitted:
            raise PermanentError(
                "unknown id or field (HTTP 400, code 100/33)", code=100, subcode=33, status=400
            )
        return {i: entity(i) for i in image_ids if i not in self.omitted}

    async def get_sequence_image_ids(self, sequence_id):
        if sequence_id == "missing":
            raise PermanentError("unknown id", code=100, subcode=33)
        return [f"{sequence_id[-1]}{k}" for k in range(3)]


def ids(n: int, start: int = 1000) -> list[str]:
    return [str(start + k) for k in range(n)]


def fetch(client, image_ids, **kwargs) -> MetadataResult:
    return asyncio.run(fetch_metadata(client, image_ids, **kwargs))


def run_async(coroutine):
    return asyncio.run(coroutine)


def test_batches_of_50_and_rows_in_schema_columns():
    wanted = ids(230)
    client = FakeClient(wanted)
    result = fetch(client, wanted + wanted[:10])  # duplicates fetched once
    assert result.requests == math.ceil(230 / 50) == len(client.batches)
    assert sorted(map(len, client.batches)) == [30, 50, 50, 50, 50]
    assert list(result.rows.columns) == list(IMAGE_COLUMNS)
    assert result.rows["image_id"].tolist() == wanted  # input order
    assert result.failures.empty and result.transient_failures == 0
    row = result.rows.iloc[0]
    assert (
        row["lon"] == pytest.approx(8.5 + 1000e-6)
        and row["sequence_id"] == "seq6"
        and row["width"] == 4000
    )
    assert str(result.rows["captured_at"].dtype) == "datetime64[ms, UTC]"


def test_unknown_ids_are_isolated_by_bisection():
    wanted = ids(100)
    bad = {"1007", "1093"}
    client = FakeClient(set(wanted) - bad)
    result = fetch(client, wanted)
    assert set(result.rows["image_id"]) == set(wanted) - bad
    failures = result.failures.set_index("image_id")
    assert set(failures.index) == bad
    assert not failures["transient"].any() and (failures["code"] == 100).all()
    assert "unknown id" in failures.loc["1007", "reason"]
    # 2 batches + for each, ~2 * log2(50) requests to isolate its bad id
    assert result.requests == len(client.batches) <= 2 + 2 * 2 * math.ceil(math.log2(50))


def test_omitted_ids_fail_permanently_as_not_returned():
    wanted = ids(60)
    client = FakeClient(wanted, omitted={"1010"})
    result = fetch(client, wanted)
    assert len(result.rows) == 59
    (failure,) = result.failures.itertuples(index=False)
    assert (failure.image_id, failure.reason, failure.transient) == ("1010", NOT_RETURNED, False)
    assert pd.isna(failure.code)


def test_transient_errors_are_recorded_not_raised():
    wanted = ids(120)
    client = FakeClient(wanted, flaky={"1060"})  # poisons the second batch
    result = fetch(client, wanted)
    assert len(result.rows) == 70
    assert set(result.failures["image_id"]) == set(ids(50, start=1050))
    assert result.failures["transient"].all() and result.transient_failures == 50


def test_auth_error_propagates():
    with pytest.raises(AuthError, match="MAPILLARY_ACCESS_TOKEN"):
        fetch(FakeClient(ids(500), auth_fail=True), ids(500))


def test_field_error_is_raised_not_bisected():
    class FieldError(FakeClient):
        async def get_images(self, image_ids, fields):
            self.batches.append(list(image_ids))
            raise PermanentError(
                "unknown id or field (HTTP 400, code 100): Tried accessing nonexisting field "
                "(colour) on node type (Image)",
                code=100,
                status=400,
            )

    client = FieldError(ids(100))
    with pytest.raises(PermanentError, match="nonexisting field"):
        fetch(client, ids(100), fields=("id", "colour"))
    assert len(client.batches) <= 2


def test_invalid_ids_fail_without_a_request():
    client = FakeClient(ids(3))
    result = fetch(client, ids(3) + ["12ab", ""])
    assert len(result.rows) == 3 and client.batches == [ids(3)]
    assert set(result.failures["image_id"]) == {"12ab", ""}


def test_progress_reports_every_batch():
    calls = []
    fetch(
        FakeClient(ids(140)),
        ids(140) + ["999999"],
        concurrency=2,
        progress=lambda done, total, failed: calls.append((done, total, failed)),
    )
    assert calls[-1] == (141, 141, 1)
    assert len(calls) == 3 and [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_empty_input():
    result = fetch(FakeClient([]), [])
    assert result.requests == 0 and result.rows.empty and result.failures.empty
    assert list(result.rows.columns) == list(IMAGE_COLUMNS)


def test_rerun_fetches_only_missing_ids_and_keeps_each_id_once(tmp_path):
    chunk = ids(150)
    rows_path, failures_path = tmp_path / "chunk.parquet", tmp_path / "chunk.failures.parquet"
    # first attempt: one unknown id, one batch failing transiently
    first_client = FakeClient(set(chunk) - {"1003"}, flaky={"1120"})
    first = fetch(first_client, ids_to_fetch(chunk, None, None))
    rows, failures = merge_with_existing(None, None, first)
    write_parquet_atomic(rows, rows_path)
    write_parquet_atomic(failures, failures_path)
    assert len(rows) == 99 and failures["transient"].sum() == 50

    # second attempt: the API recovered; only the transiently failed ids are asked again
    stored_rows, stored_failures = read_parquet(rows_path), read_parquet(failures_path)
    todo = ids_to_fetch(chunk, stored_rows, stored_failures)
    assert todo == ids(50, start=1100)
    second_client = FakeClient(set(chunk) - {"1003"})
    second = fetch(second_client, todo)
    assert second.requests == 1
    rows, failures = merge_with_existing(stored_rows, stored_failures, second)
    assert sorted(rows["image_id"]) == sorted(set(chunk) - {"1003"})
    assert failures.to_dict("records")[0]["image_id"] == "1003" and len(failures) == 1
    write_parquet_atomic(rows, rows_path)
    write_parquet_atomic(failures, failures_path)
    # nothing left: a third run makes no request
    assert ids_to_fetch(chunk, read_parquet(rows_path), read_parquet(failures_path)) == []


def test_stored_schema_is_stable_even_when_columns_are_all_null(tmp_path):
    sparse = FakeClient(ids(3))
    result = fetch(sparse, ids(3))
    write_parquet_atomic(result.rows, tmp_path / "a.parquet")
    empty_rows, _ = merge_with_existing(None, None, fetch(FakeClient([]), []))
    write_parquet_atomic(empty_rows, tmp_path / "b.parquet")
    schema_a = pq.read_schema(tmp_path / "a.parquet").remove_metadata()
    schema_b = pq.read_schema(tmp_path / "b.parquet").remove_metadata()
    assert schema_a == schema_b
    assert str(schema_a.field("altitude").type) == "double"  # all null here, still a double
    assert str(schema_a.field("exif_orientation").type) == "int64"
    assert str(schema_a.field("has_mesh").type) == "bool"
    # a stored file read back with plain pandas dtypes conforms again
    pd.testing.assert_frame_equal(
        conform_metadata(read_parquet(tmp_path / "a.parquet")), result.rows
    )


def test_sequence_image_ids():
    found = asyncio.run(fetch_sequence_image_ids(FakeClient([]), ["s1", "s2", "missing", "s1"]))
    assert found == {"s1": ["10", "11", "12"], "s2": ["20", "21", "22"], "missing": []}


# ---------------------------------------------------------------------------------------------
# against the emulator (HTTP, the real client)


async def fetch_via(server, tmp_path, image_ids, **overrides) -> MetadataResult:
    async with emulator_client(server, tmp_path, **overrides) as client:
        return await fetch_metadata(client, image_ids)


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=5, scale=0.006)


@pytest.fixture(scope="module")
def records(world):
    polygon = load_aoi(
        coordinates=[[8.530, 47.370], [8.550, 47.370], [8.550, 47.385], [8.530, 47.385]]
    ).geometry
    found = world.images_in_polygon(polygon)[:400]
    assert len(found) == 400
    return found


def test_emulator_values_match_the_world(tmp_path, world, records):
    unknown = str(2**53 + 12345)  # well-formed, never issued
    wanted = [r.id for r in records] + [unknown]
    with EmulatorServer(world) as server:
        result = run_async(fetch_via(server, tmp_path, wanted))
        batches = server.stats()["batch"]
    assert result.failures["image_id"].tolist() == [unknown]
    assert result.failures["code"].tolist() == [100] and not result.failures["transient"].any()
    assert batches == result.requests <= math.ceil(len(wanted) / 50) + 2 * math.ceil(math.log2(50))
    rows = result.rows.set_index("image_id")
    assert len(rows) == 400
    for record in records[::7]:
        row = rows.loc[record.id]
        assert (row["lon"], row["lat"]) == pytest.approx(record.geometry)
        assert row["captured_at"].value // 10**6 == record.captured_at
        assert row["sequence_id"] == record.sequence and row["creator_id"] == str(record.creator_id)
        assert row["altitude"] == pytest.approx(record.altitude)  # negatives unwrapped
        assert row["make"] == record.make and row["is_pano"] == record.is_pano
        assert (row["has_mesh"] == True) if record.mesh else pd.isna(row["has_mesh"])  # noqa: E712 (absent: omitted)


def test_emulator_5xx_are_retried_and_survivors_recorded_transient(tmp_path, world, records):
    wanted = [r.id for r in records]
    with EmulatorServer(world) as server:
        server.set_faults(error_5xx_rate=0.3)
        retried = run_async(fetch_via(server, tmp_path, wanted))
        assert server.stats()["faulted"] > 0
        assert len(retried.rows) == 400 and retried.failures.empty

        # without retries some batches fail for good: recorded as transient, then a re-run completes
        server.set_faults(error_5xx_rate=0.5)
        first = run_async(fetch_via(server, tmp_path, wanted, max_retries=0))
        assert first.transient_failures > 0 and first.failures["transient"].all()
        rows, failures = merge_with_existing(None, None, first)
        server.set_faults(error_5xx_rate=0.0)
        server.reset_stats()
        todo = ids_to_fetch(wanted, rows, failures)
        assert sorted(todo) == sorted(first.failures["image_id"])
        second = run_async(fetch_via(server, tmp_path, todo))
        assert server.stats()["batch"] == math.ceil(len(todo) / 50)
    rows, failures = merge_with_existing(rows, failures, second)
    assert sorted(rows["image_id"]) == sorted(wanted) and failures.empty


def test_emulator_rejected_token_is_fatal(tmp_path, world, records):
    with EmulatorServer(world, token="MLY|the-real-one") as server:

        async def attempt():
            async with MapillaryClient(
                ClientConfig(
                    token=Secret("MLY|wrong"),
                    graph_url=server.graph_url,
                    tiles_url=server.tiles_url,
                )
            ) as client:
                return await fetch_metadata(client, [r.id for r in records])

        with pytest.raises(AuthError, match="MAPILLARY_ACCESS_TOKEN"):
            run_async(attempt())


def test_emulator_sequence_route(tmp_path, world, records):
    sequence = records[0].sequence

    async def go():
        async with emulator_client(server, tmp_path) as client:
            return await fetch_sequence_image_ids(client, [sequence])

    with EmulatorServer(world) as server:
        found = run_async(go())
    assert found == {sequence: world.sequence_image_ids(sequence)}
