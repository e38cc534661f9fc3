"""Thumbnail URLs from the metadata request, reused by the downloads while valid (issue 23)."""

import asyncio
import time

import pyarrow.parquet as pq

from mapillary_assets.pipeline import thumbnail_urls
from mapillary_assets.pipeline.metadata import fetch_metadata, metadata_frame
from mapillary_assets.pipeline.thumbnail_urls import SAFETY_MARGIN_S, SignedUrl, signed_url
from mapillary_assets.storage import DataLayout, write_parquet_atomic
from mapillary_assets_tests import test_download
from mapillary_assets_tests.support.downloads import download_via, emulator_client, world_ids

emulator = test_download.emulator  # the fixtures of test_download's emulator tests
server = test_download.server


def test_signed_url_reads_the_hex_expiry_and_applies_the_margin():
    url = signed_url("http://cdn/thumb/256/1.jpg?stp=s256x192&oe=65F00000&oh=00_abc")
    assert url.expires_at == float(0x65F00000)
    assert url.usable(now=0x65F00000 - SAFETY_MARGIN_S - 1)
    assert not url.usable(now=0x65F00000 - SAFETY_MARGIN_S + 1)
    assert signed_url("http://cdn/thumb/256/1.jpg").expires_at is None
    assert not signed_url("http://cdn/thumb/256/1.jpg?oe=zz").usable(now=0)


def test_handoff_is_taken_once_per_chunk(tmp_path):
    urls = {"1": SignedUrl("http://cdn/a?oe=ffffffff", float(0xFFFFFFFF))}
    thumbnail_urls.remember(tmp_path, "chunk-000001", urls)
    assert thumbnail_urls.take(tmp_path, "chunk-000002") == {}
    assert thumbnail_urls.take(tmp_path, "chunk-000001") == urls
    assert thumbnail_urls.take(tmp_path, "chunk-000001") == {}


def metadata_with_urls(server, ids, field="thumb_1024_url"):
    async def go():
        async with emulator_client(server) as client:
            return await fetch_metadata(client, ids, thumbnail_field=field)

    return asyncio.run(go())


def test_metadata_urls_are_reused_without_lookups_and_never_stored(server, tmp_path):
    ids = world_ids(server.world, 120)
    result = metadata_with_urls(server, ids)
    assert result.requests == 3  # ceil(120 / 50)
    assert set(result.thumbnail_urls) == set(ids)
    assert all(url.usable() for url in result.thumbnail_urls.values())
    write_parquet_atomic(result.rows, tmp_path / "metadata.parquet")
    stored = pq.read_table(tmp_path / "metadata.parquet")
    assert list(stored.column_names) == list(metadata_frame([]).columns)
    assert not any(
        "/cdn/" in str(value) for column in stored.to_pylist() for value in column.values()
    )

    server.reset_stats()
    frame = download_via(
        server, DataLayout(tmp_path), ids, size=1024, known_urls=result.thumbnail_urls
    )
    assert (frame["status"] == "ok").all(), frame["reason"].dropna().tolist()
    stats = server.stats()
    assert stats["batch"] == 0  # no `?ids=` lookup: every URL came from the metadata request
    assert stats["family:cdn"] == len(ids)


def test_urls_close_to_expiry_or_expired_are_re_resolved(server, tmp_path):
    ids = world_ids(server.world, 60)
    fresh = metadata_with_urls(server, ids[:50]).thumbnail_urls
    server.set_faults(thumbnail_ttl_s=-5.0)
    expired = metadata_with_urls(server, ids[50:]).thumbnail_urls  # rejected by the CDN if used
    server.set_faults(thumbnail_ttl_s=3600.0)
    soon = {i: SignedUrl(url.url, time.time() + SAFETY_MARGIN_S / 2) for i, url in fresh.items()}
    known = {**fresh, **expired}
    known.update({i: soon[i] for i in ids[:10]})  # valid now, but not for the safety margin

    server.reset_stats()
    frame = download_via(server, DataLayout(tmp_path), ids, size=1024, known_urls=known)
    assert (frame["status"] == "ok").all(), frame["reason"].dropna().tolist()
    stats = server.stats()
    assert stats["batch"] == 1  # the 10 near expiry and the 10 expired, in one batch of 20
    assert stats["family:cdn"] == len(ids)  # no 403: nothing expired was used


def test_urls_that_answer_expired_anyway_are_re_resolved_for_their_id(server, tmp_path):
    ids = world_ids(server.world, 20)
    server.set_faults(thumbnail_ttl_s=-5.0)
    stale = metadata_with_urls(server, ids).thumbnail_urls
    server.set_faults(thumbnail_ttl_s=3600.0)
    # a clock that disagrees with the CDN's: the URLs look valid here but answer 403 "expired"
    lying = {i: SignedUrl(url.url, time.time() + 3600) for i, url in stale.items()}
    server.reset_stats()
    frame = download_via(server, DataLayout(tmp_path), ids, size=1024, known_urls=lying)
    assert (frame["status"] == "ok").all(), frame["reason"].dropna().tolist()
    stats = server.stats()
    assert stats["family:cdn"] == 2 * len(ids)  # one 403 and one good download each
    assert stats["batch"] == len(ids)  # one fresh URL per id, nothing else
