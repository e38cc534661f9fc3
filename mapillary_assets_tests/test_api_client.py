"""MapillaryClient against the emulator (every endpoint and error class) and small local servers."""

import asyncio
import logging
import time
import traceback

import mercantile
import pytest
import shapely
from aiohttp import web
from aiohttp.test_utils import TestServer

from mapillary_assets.api import (
    DEFAULT_IMAGE_FIELDS,
    AuthError,
    ClientConfig,
    MapillaryClient,
    MapillaryError,
    PermanentError,
    RequestTooLargeError,
    Secret,
    SharedRateLimiter,
    ThrottledError,
    TransientError,
    UrlExpiredError,
    decode_image_entity,
    decode_image_layer,
    decode_sequence_lines,
)
from mapillary_assets.api.rate_windows import busiest_window
from mapillary_assets.emulator import EmulatorServer, Faults, World

ZURICH = shapely.box(8.45, 47.32, 8.62, 47.43)
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 5.0}


@pytest.fixture(scope="module")
def world():
    return World(seed=42, scale=0.005)


@pytest.fixture(scope="module")
def server(world):
    # search_max_matches: a box with more images answers code 1 (the real API's limit is unknown)
    with EmulatorServer(world, search_max_matches=500) as emulator:
        yield emulator


@pytest.fixture
def fresh_server(world):
    """A server whose rate windows hold no earlier test's requests."""
    with EmulatorServer(world) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def clean_server(server):
    server.faults = Faults()
    server.reset_stats()
    yield


@pytest.fixture(scope="module")
def dense_tile(server):
    tiles = server.world.nonempty_z14_tiles(ZURICH)
    return max(tiles, key=lambda t: len(server.world.images_in_z14_tile(*t)))


def settings_for(server, **overrides) -> ClientConfig:
    values = {
        "token": Secret(server.token),
        "graph_url": server.graph_url,
        "tiles_url": server.tiles_url,
        **FAST,
    }
    values.update(overrides)
    return ClientConfig(**values)


def run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- endpoints


def test_tiles_z14_low_zooms_and_empty(server, dense_tile):
    x, y = dense_tile

    async def main():
        async with MapillaryClient(settings_for(server)) as client:
            z14 = await client.get_tile(14, x, y)
            computed = await client.get_tile(14, x, y, tileset="mly1_computed_public")
            z10 = await client.get_tile(10, x >> 4, y >> 4)
            z5 = await client.get_tile(5, x >> 9, y >> 9)
            empty = await client.get_tile(14, 0, 0)
            return client.request_counts, z14, computed, z10, z5, empty

    counts, z14, computed, z10, z5, empty = run(main())
    truth = {r.id: r for r in server.world.images_in_z14_tile(x, y)}
    points = decode_image_layer(z14, 14, x, y)
    assert {p.image_id for p in points} == set(truth)
    for point in points:
        record = truth[point.image_id]
        assert point.sequence_id == record.sequence
        assert point.captured_at_ms == record.captured_at
        # one tile pixel at z14 is ~6e-6 degrees
        assert abs(point.lon - record.lon) < 1e-5 and abs(point.lat - record.lat) < 1e-5
    assert decode_image_layer(computed, 14, x, y)
    assert decode_sequence_lines(z10, 10, x >> 4, y >> 4)
    assert decode_sequence_lines(z5, 5, x >> 9, y >> 9)
    assert empty == b""
    assert counts == {"tiles": 5}
    assert server.stats()["family:tiles"] == 5


def test_entity_endpoints(server, dense_tile):
    records = server.world.images_in_z14_tile(*dense_tile)
    first = records[0]
    ids = [r.id for r in records[:3]]

    async def main():
        async with MapillaryClient(settings_for(server)) as client:
            one = await client.get_image(first.id, DEFAULT_IMAGE_FIELDS)
            batch = await client.get_images(ids, DEFAULT_IMAGE_FIELDS)
            listed = await client.get_images_by_image_ids(ids, ["id", "geometry"])
            sequence = await client.get_sequence_image_ids(first.sequence)
            assert await client.get_images([], ["id"]) == {}
            return client.request_counts, one, batch, listed, sequence

    counts, one, batch, listed, sequence = run(main())
    row = decode_image_entity(one)
    assert row["image_id"] == first.id and row["sequence_id"] == first.sequence
    assert row["altitude"] == pytest.approx(first.altitude)  # wrapped negatives are undone
    assert (row["lon"], row["lat"]) == first.geometry
    assert set(batch) == set(ids) and all(batch[i]["id"] == i for i in ids)
    assert [item["id"] for item in listed] == ids
    assert sequence == server.world.sequence_image_ids(first.sequence)
    assert first.id in sequence
    assert counts == {"entity": 4}
    stats = server.stats()
    assert (stats["entity"], stats["batch"], stats["images_by_ids"], stats["sequence"]) == (
        1,
        1,
        1,
        1,
    )


def test_search_with_filters_and_too_large(server, dense_tile):
    record = server.world.images_in_z14_tile(*dense_tile)[0]
    lon, lat = record.geometry
    bbox = (lon - 0.002, lat - 0.002, lon + 0.002, lat + 0.002)
    west, south, east, north = mercantile.bounds(dense_tile[0], dense_tile[1], 14)  # ~900 images

    async def main():
        async with MapillaryClient(settings_for(server)) as client:
            found = await client.search_images(bbox, ["id", "sequence", "is_pano"])
            filtered = await client.search_images(
                bbox, ["id", "sequence"], sequence_ids=[record.sequence], is_pano=record.is_pano
            )
            with pytest.raises(RequestTooLargeError) as too_large:
                await client.search_images((west, south, east, north), ["id"], limit=10)
            with pytest.raises(ValueError):
                await client.search_images((1, 1, 0, 0), ["id"])
            with pytest.raises(ValueError):
                await client.search_images(bbox, ["id"], limit=2001)
            return client.request_counts, found, filtered, too_large.value

    counts, found, filtered, too_large = run(main())
    assert record.id in {item["id"] for item in found}
    assert filtered and {item["sequence"] for item in filtered} == {record.sequence}
    assert record.id in {item["id"] for item in filtered}
    assert too_large.code == 1 and not too_large.transient
    assert counts == {
        "search": 3
    }  # code 1 is not retried; invalid arguments never reach the server


def test_batch_limits_and_unknown_ids(server, dense_tile):
    ids = [r.id for r in server.world.images_in_z14_tile(*dense_tile)[:2]]

    async def main():
        async with MapillaryClient(settings_for(server)) as client:
            with pytest.raises(ValueError, match="at most 50"):
                await client.get_images([str(i) for i in range(51)], ["id"])
            with pytest.raises(ValueError):
                await client.get_image("../secret", ["id"])
            with pytest.raises(PermanentError) as unknown_in_batch:
                await client.get_images([*ids, "1"], ["id"])
            with pytest.raises(PermanentError) as unknown_field:
                await client.get_image(ids[0], ["id", "no_such_field"])
            return client.request_counts, unknown_in_batch.value, unknown_field.value

    counts, unknown_in_batch, unknown_field = run(main())
    assert (unknown_in_batch.code, unknown_in_batch.subcode, unknown_in_batch.transient) == (
        100,
        33,
        False,
    )
    assert unknown_field.code == 100 and "no_such_field" in str(unknown_field)
    assert counts == {"entity": 2}  # permanent errors are never retried


def test_auth_errors_are_fatal(server, dense_tile):
    async def main():
        async with MapillaryClient(settings_for(server, token=Secret("MLY|wrong"))) as client:
            with pytest.raises(AuthError) as graph:
                await client.get_image("1", ["id"])
            with pytest.raises(AuthError) as tiles:
                await client.get_tile(14, *dense_tile)
            return client.request_counts, graph.value, tiles.value

    counts, graph, tiles = run(main())
    assert str(graph).startswith("token rejected (code 190): set MAPILLARY_ACCESS_TOKEN")
    assert graph.code == 190 and tiles.code == 190 and tiles.status == 401
    assert counts == {"entity": 1, "tiles": 1}


def test_thumbnails_and_expired_urls(server, dense_tile):
    image_id = server.world.images_in_z14_tile(*dense_tile)[0].id

    async def main():
        async with MapillaryClient(settings_for(server)) as client:
            fresh = (await client.get_image(image_id, ["thumb_256_url"]))["thumb_256_url"]
            jpeg = await client.get_thumbnail(fresh)
            server.set_faults(thumbnail_ttl_s=-60)
            stale = (await client.get_image(image_id, ["thumb_256_url"]))["thumb_256_url"]
            with pytest.raises(UrlExpiredError) as expired:
                await client.get_thumbnail(stale)
            return client.request_counts, jpeg, expired.value

    counts, jpeg, expired = run(main())
    assert jpeg[:2] == b"\xff\xd8"
    assert expired.status == 403 and not expired.transient
    assert "oh=" not in str(expired)  # the signed query is left out of messages
    assert counts == {"entity": 2, "cdn": 2}
    assert server.stats()["family:cdn"] == 2


# ----------------------------------------------------------------------------- retries and limits


def test_injected_5xx_are_retried(server, dense_tile):
    ids = [r.id for r in server.world.images_in_z14_tile(*dense_tile)[:20]]
    server.set_faults(error_5xx_rate=0.3)

    async def main():
        async with MapillaryClient(
            settings_for(server, max_retries=10, backoff_base_s=0.001)
        ) as client:
            rows = await asyncio.gather(*(client.get_image(i, ["id"]) for i in ids))
            return client.request_counts, client.retry_counts, rows

    counts, retries, rows = run(main())
    assert [r["id"] for r in rows] == ids
    stats = server.stats()
    assert stats["faulted"] > 0
    assert stats["family:entity"] == counts["entity"] == len(ids) + stats["faulted"]
    assert retries["entity"] == stats["faulted"]


def test_outage_gives_up_after_max_retries(server):
    server.set_faults(outage_start=0.0, outage_end=time.time() + 3600)

    async def main():
        async with MapillaryClient(
            settings_for(server, max_retries=2, backoff_base_s=0.001)
        ) as client:
            with pytest.raises(TransientError) as failure:
                await client.get_image("1", ["id"])
            return client.request_counts, failure.value

    counts, failure = run(main())
    assert failure.status == 503 and failure.transient
    assert "gave up after 3 attempts" in str(failure)
    assert counts == {"entity": 3} and server.stats()["family:entity"] == 3


def test_timeouts_are_transient(server):
    server.set_faults(latency_s=0.5)

    async def main():
        async with MapillaryClient(
            settings_for(server, timeout_s=0.1, max_retries=1, backoff_base_s=0.001)
        ) as c:
            with pytest.raises(TransientError, match="timed out") as failure:
                await c.get_image("1", ["id"])
            return c.request_counts, failure.value

    counts, failure = run(main())
    assert counts == {"entity": 2}
    assert failure.__context__ is None and failure.__cause__ is None


def test_client_limiter_keeps_every_window_within_budget(server, dense_tile):
    x, y = dense_tile

    async def main():
        async with MapillaryClient(settings_for(server)) as client:
            client.limiters["tiles"] = SharedRateLimiter(
                "tiles", per_minute=20, burst=4, window_s=2.0
            )
            await asyncio.gather(*(client.get_tile(14, x, y) for _ in range(24)))

    run(main())
    times = server.request_times("tiles")
    assert len(times) == 24 and server.stats()["rate_limited"] == 0
    assert busiest_window(times, 2.0) <= 20


def test_retry_after_pauses_all_tasks_then_succeeds(fresh_server, dense_tile, monkeypatch):
    from mapillary_assets.emulator import state as emulator_state

    if not hasattr(emulator_state, "WINDOW_S"):
        pytest.skip("emulator rate window is not adjustable")
    monkeypatch.setattr(emulator_state, "WINDOW_S", 2.0)  # the emulator's "minute" becomes 2 s
    fresh_server.set_faults(rate_limit_per_minute={"entity": 5})
    ids = [r.id for r in fresh_server.world.images_in_z14_tile(*dense_tile)[:8]]

    async def main():
        async with MapillaryClient(settings_for(fresh_server)) as client:
            rows = await asyncio.gather(*(client.get_image(i, ["id"]) for i in ids))
            return client, rows

    started = time.time()
    client, rows = run(main())
    assert [r["id"] for r in rows] == ids
    stats = fresh_server.stats()
    assert stats["rate_limited"] >= 1
    assert client.request_counts["entity"] == len(ids) + stats["rate_limited"]
    assert busiest_window(fresh_server.request_times("entity"), 2.0 - 0.01) <= 5
    assert time.time() - started >= 1.0  # the Retry-After was waited out
    assert client.limiters["entity"].paused_for() == 0.0


def test_long_retry_after_fails_fast_and_pauses_the_family(fresh_server, dense_tile, tmp_path):
    fresh_server.set_faults(rate_limit_per_minute={"entity": 3})
    image_id = fresh_server.world.images_in_z14_tile(*dense_tile)[0].id
    store = tmp_path / "limits.sqlite"

    async def main():
        async with MapillaryClient(settings_for(fresh_server, rate_limit_store=store)) as client:
            for _ in range(3):
                await client.get_image(image_id, ["id"])
            usage_rate = client.limiters["entity"].effective_rate()
            with pytest.raises(ThrottledError) as throttled:
                await client.get_image(image_id, ["id"])
            with pytest.raises(ThrottledError, match="paused"):
                await client.get_image(image_id, ["id"])
            return client, usage_rate, throttled.value

    client, usage_rate, throttled = run(main())
    assert (
        throttled.code == 4
        and throttled.transient
        and throttled.retry_after > FAST["backoff_max_s"]
    )
    assert usage_rate < client.limiters["entity"].rate  # x-app-usage at 100 % slowed the bucket
    assert fresh_server.stats()["family:entity"] == 4  # the paused call never reached the server
    # another process sharing the store sees the pause
    assert SharedRateLimiter("entity", per_minute=50_000, store=store).paused_for() > 30


# ----------------------------------------------------------------------------- settings and secrets


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MAPILLARY_ACCESS_TOKEN", raising=False)
    monkeypatch.delenv("MAPILLARY_RATE_LIMIT_STORE", raising=False)
    with pytest.raises(ValueError, match="MAPILLARY_ACCESS_TOKEN is not set"):
        ClientConfig.from_env()
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", "MLY|abc")
    monkeypatch.setenv("MAPILLARY_GRAPH_URL", "http://127.0.0.1:9/graph/")
    monkeypatch.setenv("MAPILLARY_TILES_URL", "http://127.0.0.1:9/tiles//")
    monkeypatch.setenv("MAPILLARY_RATE_LIMIT_STORE", str(tmp_path / "rl.sqlite"))
    settings = ClientConfig.from_env(max_retries=2)
    assert settings.token.reveal() == "MLY|abc"
    assert (
        settings.graph_url == "http://127.0.0.1:9/graph"
        and settings.tiles_url == "http://127.0.0.1:9/tiles"
    )
    assert settings.rate_limit_store == tmp_path / "rl.sqlite" and settings.max_retries == 2
    assert "MLY|abc" not in repr(settings) and "***" in repr(settings)
    assert ClientConfig.from_env(token="MLY|other").token.reveal() == "MLY|other"
    with pytest.raises(ValueError, match="MAPILLARY_ACCESS_TOKEN is not set"):
        MapillaryClient(ClientConfig(token=Secret("")))


def test_secret_never_prints():
    secret = Secret("MLY|s3cr3t")
    assert str(secret) == repr(secret) == f"{secret}" == "***"
    assert secret.reveal() == "MLY|s3cr3t" and Secret(secret) == secret


def test_client_must_be_opened(server):
    with pytest.raises(RuntimeError, match="async with"):
        run(MapillaryClient(settings_for(server)).get_tile(0, 0, 0))


CANARY = "MLY|leak-canary-7f3a9c|Zq"
CANARY_FORMS = ("leak-canary-7f3a9c", "MLY%7Cleak", "MLY%7cleak")


async def _flaky_app(seen_headers: list) -> TestServer:
    """Drops connections mid-body for tiles, 503s for the graph, records what the CDN receives."""

    async def reset(request):
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"partial")
        request.transport.close()
        return response

    async def unavailable(request):
        return web.Response(status=503, body=b"")

    async def cdn(request):
        seen_headers.append((dict(request.headers), str(request.url)))
        return web.Response(body=b"\xff\xd8\xff\xd9")

    app = web.Application()
    app.router.add_get("/tiles/{tail:.*}", reset)
    app.router.add_get("/graph/{tail:.*}", unavailable)
    app.router.add_get("/cdn/{tail:.*}", cdn)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server(
        access_log=None
    )  # a server's access log shows the URL: not ours to test
    return test_server


def test_token_never_leaks(server, dense_tile, caplog):
    caplog.set_level(logging.DEBUG)
    failures: list[BaseException] = []
    seen_cdn: list = []

    async def expect_failure(coro):
        try:
            await coro
        except MapillaryError as error:
            failures.append(error)
        else:
            raise AssertionError("expected a MapillaryError")

    async def main():
        flaky = await _flaky_app(seen_cdn)
        base = str(flaky.make_url("")).rstrip("/")
        try:
            settings = ClientConfig(
                token=Secret(CANARY),
                graph_url=base + "/graph",
                tiles_url=base + "/tiles",
                max_retries=1,
                backoff_base_s=0.001,
                backoff_max_s=0.01,
            )
            async with MapillaryClient(settings) as client:
                await expect_failure(
                    client.get_tile(14, *dense_tile)
                )  # connection dropped mid-body
                await expect_failure(client.get_image("1", ["id"]))  # 503 twice
                assert (
                    await client.get_thumbnail(base + "/cdn/t.jpg?oh=sig&oe=ffffffff")
                    == b"\xff\xd8\xff\xd9"
                )
                texts = [repr(client), repr(settings), str(settings.token)]
            dead = ClientConfig(
                token=Secret(CANARY),
                graph_url="http://127.0.0.1:9/graph",
                tiles_url="http://127.0.0.1:9/tiles",
                max_retries=1,
                backoff_base_s=0.001,
            )
            async with MapillaryClient(dead) as client:
                await expect_failure(client.get_tile(14, 1, 1))  # connection refused
            # the emulator, configured with another token: the canary is rejected
            async with MapillaryClient(
                settings_for(server, token=Secret(CANARY), max_retries=1)
            ) as client:
                await expect_failure(client.get_tile(14, *dense_tile))
                await expect_failure(client.get_image("1", ["id"]))
            server.set_faults(latency_s=0.3)
            async with MapillaryClient(
                settings_for(server, token=Secret(CANARY), timeout_s=0.05, max_retries=0)
            ) as client:
                await expect_failure(client.get_tile(14, *dense_tile))  # timeout
            return texts
        finally:
            await flaky.close()

    texts = run(main())
    kinds = {type(f).__name__ for f in failures}
    assert kinds == {"TransientError", "AuthError"}
    for failure in failures:
        texts += [str(failure), repr(failure), "".join(traceback.format_exception(failure))]
    client_records = [
        r for r in caplog.records if not r.name.startswith("mapillary_assets.emulator")
    ]
    assert any(r.name == "mapillary_assets.api.client" for r in client_records)
    for record in client_records:
        texts.append(record.getMessage())
        if record.exc_info:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
    for text in texts:
        assert CANARY not in text
        for form in CANARY_FORMS:
            assert form not in text, text
    headers, url = seen_cdn[0]
    assert "Authorization" not in headers and "access_token" not in url
