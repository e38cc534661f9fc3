from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from mapillary_assets.api.errors import AuthError, PermanentError, TransientError, UrlExpiredError
from mapillary_assets.pipeline import download
from mapillary_assets.pipeline.download import download_thumbnails, thumbnail_field
from mapillary_assets.pipeline.jpeg_verification import is_complete_jpeg, verify_jpeg
from mapillary_assets.pipeline.thumbnail_shards import SHARD_COLUMNS
from mapillary_assets.storage import TEMP_MARKER, DataLayout
from mapillary_assets.storage.shards import shard_index
from mapillary_assets_tests.support.downloads import (
    EMULATOR_TOKEN,
    download_via,
    emulator_client,
    world_ids,
)


def make_jpeg(
    seed: int = 0, height: int = 96, width: int = 128, progressive: bool = False
) -> bytes:
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 1.5)
    params = [cv2.IMWRITE_JPEG_QUALITY, 85, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    ok, encoded = cv2.imencode(".jpg", image, params)
    assert ok
    return encoded.tobytes()


JPEG = make_jpeg()


# is_complete_jpeg / verify_jpeg (pure)


def test_complete_jpeg_accepted():
    assert is_complete_jpeg(JPEG)
    assert is_complete_jpeg(make_jpeg(seed=3, progressive=True))
    assert verify_jpeg(JPEG) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xd8\xff\xd9",
        JPEG[: len(JPEG) // 2],  # truncated transfer
        JPEG[:-2],  # only the EOI missing
        JPEG[:200] + b"\xff\xd9",  # cut inside the headers, EOI appended
        b"GIF89a" + JPEG[6:],  # not a JPEG
        b"<html>403 URL signature expired</html>",
        bytes(range(256)) * 10,  # garbage
        b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9",  # SOI + garbage + EOI
    ],
)
def test_incomplete_or_foreign_data_rejected(data):
    assert not is_complete_jpeg(data)
    assert verify_jpeg(data) is not None


def test_stray_markers_in_scan_data_are_caught_without_decoding():
    damaged = bytearray(JPEG)
    middle = len(damaged) // 2
    damaged[middle : middle + 300] = (
        np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()
    )
    assert not is_complete_jpeg(bytes(damaged))
    assert "stray marker" in verify_jpeg(bytes(damaged))
    premature_end = JPEG[:middle] + b"\xff\xd9" + JPEG[middle:]
    assert not is_complete_jpeg(premature_end)


def corrupt_scan_keeping_markers(jpeg: bytes) -> bytes:
    """`jpeg` with 256 entropy-coded bytes in the middle of its scan data zeroed: zeros make no marker
    and remove none that matters (the baseline encoder writes no restart markers), so every marker
    check still passes and only a decode of the Huffman-coded data can tell."""
    damaged = bytearray(jpeg)
    start = (jpeg.index(b"\xff\xda") + len(jpeg)) // 2  # halfway between the scan header and EOI
    damaged[start : start + 256] = bytes(256)
    return bytes(damaged)


SCAN_DAMAGED_JPEG = corrupt_scan_keeping_markers(JPEG)


def test_decode_check_catches_damage_that_keeps_markers_intact():
    assert is_complete_jpeg(SCAN_DAMAGED_JPEG)
    assert verify_jpeg(SCAN_DAMAGED_JPEG) is None
    # OpenCV paints over it (it only fails on fatal errors): the strict decode is what catches it.
    assert (
        cv2.imdecode(np.frombuffer(SCAN_DAMAGED_JPEG, np.uint8), cv2.IMREAD_GRAYSCALE) is not None
    )
    assert "Corrupt JPEG data" in verify_jpeg(SCAN_DAMAGED_JPEG, decode=True)
    cut_with_eoi = JPEG[: len(JPEG) * 2 // 3] + b"\xff\xd9"
    assert is_complete_jpeg(cut_with_eoi)
    assert verify_jpeg(cut_with_eoi) is None
    assert "corrupt JPEG" in verify_jpeg(cut_with_eoi, decode=True)
    assert verify_jpeg(JPEG, decode=True) is None
    assert verify_jpeg(make_jpeg(seed=3, progressive=True), decode=True) is None


def test_thumbnail_fields_and_paths(tmp_path):
    assert thumbnail_field(1024) == "thumb_1024_url"
    assert thumbnail_field("original") == "thumb_original_url"
    with pytest.raises(ValueError):
        thumbnail_field(512)
    layout = DataLayout(tmp_path)
    assert layout.thumbnail_path("1234567", 256) == tmp_path / "thumbnails/256/567/1234567.jpg"
    assert (
        layout.thumbnail_path("1234567", "original")
        == tmp_path / "thumbnails/original/567/1234567.jpg"
    )


# download_thumbnails against a scripted client (no network)


class FakeClient:
    """get_images/get_thumbnail with scripted misbehaviour; URLs carry a generation counter."""

    def __init__(self, known: set[str], bodies: dict[str, bytes] | None = None) -> None:
        self.known = known
        self.bodies = bodies or {}
        self.generation: Counter = Counter()
        self.expire_first: Counter = Counter()  # id -> how many fresh URLs still answer "expired"
        self.bad_bodies: Counter = (
            Counter()
        )  # id -> how many downloads still return a truncated body
        self.no_url: set[str] = set()
        self.thumbnail_errors: dict[str, Exception] = {}
        self.lookups: list[list[str]] = []
        self.downloads: Counter = Counter()
        self.in_flight = self.max_in_flight = 0

    async def get_images(self, image_ids, fields):
        self.lookups.append(list(image_ids))
        (field,) = fields
        if any(i not in self.known for i in image_ids):
            raise PermanentError(
                "unknown id or field (HTTP 400, code 100/33)", code=100, subcode=33, status=400
            )
        out = {}
        for image_id in image_ids:
            self.generation[image_id] += 1
            out[image_id] = {"id": image_id}
            if image_id not in self.no_url:
                out[image_id][field] = f"fake://{image_id}/{self.generation[image_id]}"
        return out

    async def get_thumbnail(self, url):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
        finally:
            self.in_flight -= 1
        image_id = url.split("/")[2]
        self.downloads[image_id] += 1
        if image_id in self.thumbnail_errors:
            raise self.thumbnail_errors[image_id]
        if self.expire_first[image_id] > 0:
            self.expire_first[image_id] -= 1
            raise UrlExpiredError("thumbnail URL expired", status=403)
        body = self.bodies.get(image_id, JPEG)
        if self.bad_bodies[image_id] > 0:
            self.bad_bodies[image_id] -= 1
            return body[: len(body) // 3]
        return body


def run(coro):
    return asyncio.run(coro)


def test_downloads_are_verified_sharded_and_atomic(tmp_path):
    layout = DataLayout(tmp_path)
    ids = [str(10_000 + i) for i in range(120)]
    client = FakeClient(set(ids), {i: make_jpeg(int(i)) for i in ids})
    seen = []
    frame = run(
        download_thumbnails(
            client, layout, ids + ids[:5], concurrency=8, progress=lambda *a: seen.append(a)
        )
    )
    assert frame["image_id"].tolist() == ids
    assert list(frame.columns) == download.COLUMNS
    assert (
        (frame["status"] == "ok").all()
        and frame["reason"].isna().all()
        and not frame["transient"].any()
    )
    assert frame["bytes"].dtype == np.int64 and frame["transient"].dtype == bool
    for row in frame.itertuples():
        path = tmp_path / row.path
        assert path == layout.thumbnail_path(row.image_id, 1024)
        assert path.read_bytes() == client.bodies[row.image_id] and row.bytes == path.stat().st_size
    assert [len(b) for b in client.lookups] == [50, 50, 20]
    assert client.max_in_flight == 8
    assert seen[-1] == (120, 120, 0) and len(seen) == 120
    assert not list(tmp_path.rglob(f"*{TEMP_MARKER}*"))


def test_existing_files_are_not_requested_again_and_damaged_ones_are(tmp_path):
    layout = DataLayout(tmp_path)
    ids = ["11", "22", "33"]
    client = FakeClient(set(ids))
    run(download_thumbnails(client, layout, ids))
    layout.thumbnail_path("22", 1024).write_bytes(JPEG[:100])  # damaged since
    client.lookups.clear()
    client.downloads.clear()
    frame = run(download_thumbnails(client, layout, ids))
    assert (frame["status"] == "ok").all()
    assert client.lookups == [["22"]] and dict(client.downloads) == {"22": 1}
    assert layout.thumbnail_path("22", 1024).read_bytes() == JPEG


def test_unknown_ids_are_isolated_by_bisection(tmp_path):
    ids = [str(i) for i in range(100, 150)]
    client = FakeClient(set(ids) - {"117", "140"})
    client.no_url.add("101")
    frame = run(download_thumbnails(client, DataLayout(tmp_path), ids)).set_index("image_id")
    failed = frame[frame["status"] == "failed"]
    assert set(failed.index) == {"117", "140", "101"}
    assert not failed["transient"].any()
    assert "code 100" in failed.loc["117", "reason"]
    assert "no thumb_1024_url" in failed.loc["101", "reason"]
    assert failed["path"].isna().all() and (failed["bytes"] == 0).all()
    assert (frame.drop(index=failed.index)["status"] == "ok").all()
    assert (
        len(client.lookups) <= 1 + 2 * 2 * 6
    )  # two bad ids: two bisection paths of depth ceil(log2 50)


def test_expired_urls_are_re_resolved_a_bounded_number_of_times(tmp_path):
    client = FakeClient({"1", "2"})
    client.expire_first["1"] = 2  # recovers on the third URL
    client.expire_first["2"] = 100  # never recovers
    frame = run(download_thumbnails(client, DataLayout(tmp_path), ["1", "2"])).set_index("image_id")
    assert frame.loc["1", "status"] == "ok"
    assert client.generation["1"] == 3
    assert frame.loc["2", "status"] == "failed" and frame.loc["2", "transient"]
    assert "expired" in frame.loc["2", "reason"]
    assert client.generation["2"] == 1 + download.MAX_URL_REFRESHES


@pytest.mark.parametrize("decode_check", [False, True])
def test_truncated_bodies_are_retried_then_recorded_transient(tmp_path, decode_check):
    layout = DataLayout(tmp_path)
    client = FakeClient({"5", "6"})
    client.bad_bodies["5"] = download.MAX_JPEG_ATTEMPTS - 1  # last attempt succeeds
    client.bad_bodies["6"] = 100
    frame = run(
        download_thumbnails(client, layout, ["5", "6"], decode_check=decode_check)
    ).set_index("image_id")
    assert frame.loc["5", "status"] == "ok"
    assert frame.loc["6", "status"] == "failed" and frame.loc["6", "transient"]
    assert "truncated JPEG" in frame.loc["6", "reason"]
    assert client.downloads["6"] == download.MAX_JPEG_ATTEMPTS
    assert not layout.thumbnail_path("6", 1024).exists()
    client.bad_bodies["6"] = 0
    assert (run(download_thumbnails(client, layout, ["5", "6"]))["status"] == "ok").all()


def test_scan_damage_is_downloaded_as_ok_unless_decode_check_then_retried_and_recorded(tmp_path):
    layout = DataLayout(tmp_path)
    client = FakeClient({"5"}, {"5": SCAN_DAMAGED_JPEG})
    frame = run(download_thumbnails(client, layout, ["5"], decode_check=False))
    assert frame["status"].tolist() == ["ok"]  # the marker checks alone let it through
    layout.thumbnail_path("5", 1024).unlink()
    client.downloads.clear()
    frame = run(download_thumbnails(client, layout, ["5"], decode_check=True)).set_index("image_id")
    assert frame.loc["5", "status"] == "failed" and frame.loc["5", "transient"]
    assert "Corrupt JPEG data" in frame.loc["5", "reason"]
    assert client.downloads["5"] == download.MAX_JPEG_ATTEMPTS
    assert not layout.thumbnail_path("5", 1024).exists()


def test_download_errors_recorded_with_their_transience(tmp_path):
    client = FakeClient({"7", "8", "9"})
    client.thumbnail_errors["7"] = TransientError("server error (HTTP 503)", status=503)
    client.thumbnail_errors["8"] = PermanentError("request rejected (HTTP 404)", status=404)
    frame = run(download_thumbnails(client, DataLayout(tmp_path), ["7", "8", "9"])).set_index(
        "image_id"
    )
    assert frame["status"].tolist() == ["failed", "failed", "ok"]
    assert frame["transient"].tolist() == [True, False, False]


def test_auth_error_propagates(tmp_path):
    client = FakeClient({str(i) for i in range(1, 30)})
    client.thumbnail_errors["13"] = AuthError("token rejected (code 190)", code=190)
    with pytest.raises(AuthError):
        run(
            download_thumbnails(
                client, DataLayout(tmp_path), [str(i) for i in range(1, 30)], concurrency=4
            )
        )


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "12a", "", " 12", "1" * 21])
def test_non_digit_id_rejected_before_any_path_or_request(tmp_path, bad_id):
    client = FakeClient({"1"})
    with pytest.raises(ValueError, match="invalid Mapillary image id"):
        run(download_thumbnails(client, DataLayout(tmp_path / "data"), ["1", bad_id]))
    assert client.lookups == [] and not (tmp_path / "data").exists()


def test_original_size_uses_its_own_folder(tmp_path):
    client = FakeClient({"42"})
    frame = run(download_thumbnails(client, DataLayout(tmp_path), ["42"], size="original"))
    assert frame.loc[0, "path"] == "thumbnails/original/042/42.jpg"
    assert Path(tmp_path / frame.loc[0, "path"]).read_bytes() == JPEG


# download_thumbnails end to end against the emulator


@pytest.fixture(scope="module")
def emulator():
    from mapillary_assets.emulator import EmulatorServer, World

    with EmulatorServer(world=World(seed=11, scale=0.005), token=EMULATOR_TOKEN) as server:
        yield server


@pytest.fixture
def server(emulator):
    from mapillary_assets.emulator import Faults

    emulator.faults = Faults()
    emulator.reset_stats()
    yield emulator
    emulator.faults = Faults()


def test_emulator_download_end_to_end_and_idempotent_rerun(server, tmp_path):
    layout = DataLayout(tmp_path)
    ids = world_ids(server.world, 150)
    frame = download_via(server, layout, ids)
    assert (frame["status"] == "ok").all(), frame[frame["status"] != "ok"].head()
    assert frame["image_id"].tolist() == ids
    stats = server.stats()
    assert stats["family:cdn"] == 150 and stats["batch"] == 3
    for row in frame.itertuples():
        path = tmp_path / row.path
        assert path == layout.thumbnail_path(row.image_id, 1024)
        assert path.relative_to(tmp_path).parts[:2] == ("thumbnails", "1024")
        data = path.read_bytes()
        assert verify_jpeg(data) is None and len(data) == row.bytes
    assert not list(tmp_path.rglob(f"*{TEMP_MARKER}*"))

    server.reset_stats()
    again = download_via(server, layout, ids)
    assert (again["status"] == "ok").all()
    assert again["bytes"].tolist() == frame["bytes"].tolist()
    assert server.stats()["requests"] == 0  # no URL lookups and no CDN requests


def test_emulator_expired_urls_are_re_resolved(server, tmp_path):
    """URLs resolved while the TTL was negative are already expired when downloaded; the downloader
    must ask for fresh ones (the client sees the CDN's real 403 "URL signature expired")."""
    ids = world_ids(server.world, 60)[-20:]

    async def stale_urls():
        server.set_faults(thumbnail_ttl_s=-5.0)
        async with emulator_client(server) as client:
            found = await client.get_images(ids, ["thumb_1024_url"])
        server.set_faults(thumbnail_ttl_s=3600.0)
        return {i: found[i]["thumb_1024_url"] for i in ids}

    stale = asyncio.run(stale_urls())

    class StaleFirst:
        def __init__(self, client):
            self.client, self.served = client, set()

        async def get_images(self, image_ids, fields):
            found = await self.client.get_images(image_ids, fields)
            for image_id in image_ids:
                if image_id not in self.served:
                    self.served.add(image_id)
                    found[image_id]["thumb_1024_url"] = stale[image_id]
            return found

        async def get_thumbnail(self, url):
            return await self.client.get_thumbnail(url)

    server.reset_stats()
    frame = download_via(server, DataLayout(tmp_path), ids, client_wrapper=StaleFirst)
    assert (frame["status"] == "ok").all(), frame["reason"].dropna().tolist()
    stats = server.stats()
    assert stats["family:cdn"] == 2 * len(ids)  # one 403 and one good download each
    assert stats["batch"] == 1 + len(ids)  # the batch lookup, then one fresh URL per id


def test_emulator_always_expired_urls_fail_transient_after_bounded_refreshes(server, tmp_path):
    ids = world_ids(server.world, 5)
    server.set_faults(thumbnail_ttl_s=-5.0)
    frame = download_via(server, DataLayout(tmp_path), ids)
    assert (frame["status"] == "failed").all() and frame["transient"].all()
    assert frame["reason"].str.contains("expired").all()
    assert server.stats()["family:cdn"] == len(ids) * (1 + download.MAX_URL_REFRESHES)


def test_emulator_damaged_jpegs_recorded_then_fixed_by_a_rerun(server, tmp_path):
    layout = DataLayout(tmp_path)
    ids = world_ids(server.world, 80)
    server.set_faults(truncated_jpeg_rate=0.15, corrupt_jpeg_rate=0.1)
    frame = download_via(server, layout, ids).set_index("image_id")
    failed = frame[frame["status"] == "failed"]
    assert 5 <= len(failed) <= 40
    assert failed["transient"].all()
    reasons = failed["reason"].tolist()
    assert any("truncated JPEG" in r for r in reasons) and any("corrupt JPEG" in r for r in reasons)
    assert (
        server.stats()["family:cdn"]
        == (len(ids) - len(failed)) + len(failed) * download.MAX_JPEG_ATTEMPTS
    )
    for image_id in failed.index:
        assert not layout.thumbnail_path(image_id, 1024).exists()

    server.set_faults(truncated_jpeg_rate=0.0, corrupt_jpeg_rate=0.0)
    server.reset_stats()
    again = download_via(server, layout, ids)
    assert (again["status"] == "ok").all()
    assert server.stats()["family:cdn"] == len(failed)
    assert not list(tmp_path.rglob(f"*{TEMP_MARKER}*"))


def test_emulator_unknown_id_is_a_permanent_failure(server, tmp_path):
    ids = world_ids(server.world, 10)
    unknown = "9" * 15
    frame = download_via(server, DataLayout(tmp_path), ids + [unknown]).set_index("image_id")
    assert frame.loc[unknown, "status"] == "failed" and not frame.loc[unknown, "transient"]
    assert (frame.drop(index=unknown)["status"] == "ok").all()


def test_emulator_non_digit_id_rejected_without_requests(server, tmp_path):
    with pytest.raises(ValueError):
        download_via(server, DataLayout(tmp_path), world_ids(server.world, 3) + ["12/../../x"])
    assert server.stats()["requests"] == 0


# a bucket data dir: the chunk's thumbnails as one tar shard (pipeline/thumbnail_shards.py)


@pytest.fixture
def bucket_layout(s3_server, tmp_path, monkeypatch):
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    return DataLayout(
        f"s3://{s3_server.bucket}/shards-{uuid.uuid4().hex[:8]}", tmp_path / "scratch"
    )


def test_on_a_bucket_a_chunk_is_one_shard_whose_rows_locate_each_image(bucket_layout, tmp_path):
    layout, store = bucket_layout, bucket_layout.store
    ids = [str(20_000 + i) for i in range(60)]
    client = FakeClient(set(ids), {i: make_jpeg(int(i)) for i in ids})
    client.no_url.add(ids[3])
    client.thumbnail_errors[ids[7]] = TransientError("server error (HTTP 503)", status=503)
    frame = run(download_thumbnails(client, layout, ids, concurrency=8, chunk_key="chunk-000003"))

    shard_key = layout.thumbnail_shard_key("chunk-000003", 1024)
    assert shard_key == "thumbnails/1024/shards/chunk-000003.tar"
    assert list(frame.columns) == download.COLUMNS + SHARD_COLUMNS
    ok = frame[frame["status"] == "ok"]
    assert len(ok) == 58 and (ok["path"] == shard_key).all() and (ok["bytes"] == ok["length"]).all()
    failed = frame[frame["status"] == "failed"]
    assert (
        failed["path"].isna().all()
        and failed["offset"].isna().all()
        and failed["length"].isna().all()
    )
    index = shard_index(store.get(shard_key)).set_index("image_id")
    for row in ok.itertuples():
        assert (index.loc[row.image_id, "offset"], index.loc[row.image_id, "length"]) == (
            row.offset,
            row.length,
        )
        assert (
            layout.read_thumbnail(row.path, row.offset, row.length) == client.bodies[row.image_id]
        )
    # one object for the chunk, none per image, and no spool left in scratch
    assert store.list("thumbnails/1024/shards/") == [shard_key]
    assert not store.exists(layout.thumbnail_key(ids[0], 1024))
    assert not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]


def test_on_a_bucket_a_rerun_counts_the_shards_images_done_and_a_retry_keeps_them(bucket_layout):
    layout, store = bucket_layout, bucket_layout.store
    ids = [str(30_000 + i) for i in range(40)]
    retried = ids[5]
    client = FakeClient(set(ids), {i: make_jpeg(int(i)) for i in ids})
    client.thumbnail_errors[retried] = TransientError("server error (HTTP 503)", status=503)
    first = run(download_thumbnails(client, layout, ids, chunk_key="chunk-000001"))
    store.write_parquet(
        layout.downloads_key("chunk-000001"), first
    )  # the asset's completion record
    shard_key = layout.thumbnail_shard_key("chunk-000001", 1024)
    committed = store.get(shard_key)

    # A rerun with the failure gone fetches only the failed image (no GET per stored image)...
    del client.thumbnail_errors[retried]
    client.lookups.clear()
    client.downloads.clear()
    again = run(download_thumbnails(client, layout, ids, chunk_key="chunk-000001"))
    assert client.lookups == [[retried]] and dict(client.downloads) == {retried: 1}
    assert (again["status"] == "ok").all() and (again["path"] == shard_key).all()
    # ...and the new shard keeps every stored image where it was, the retried one appended.
    kept = first[first["status"] == "ok"].set_index("image_id")
    shard = store.get(shard_key)
    assert shard.startswith(committed[: int((kept["offset"] + kept["length"]).max())])
    assert (
        again.set_index("image_id")
        .loc[kept.index, ["offset", "length"]]
        .equals(kept[["offset", "length"]])
    )
    for row in again.itertuples():
        assert shard[row.offset : row.offset + row.length] == client.bodies[row.image_id]

    # That attempt killed between its upload and its rows (the first rows are still the stored ones):
    # they hold for the grown shard; the retried image is fetched once more, its last copy counts.
    client.downloads.clear()
    after_kill = run(download_thumbnails(client, layout, ids, chunk_key="chunk-000001"))
    assert dict(client.downloads) == {retried: 1}
    shard = store.get(shard_key)
    for row in after_kill.itertuples():
        assert shard[row.offset : row.offset + row.length] == client.bodies[row.image_id]
    store.write_parquet(layout.downloads_key("chunk-000001"), after_kill)
    client.downloads.clear()
    client.lookups.clear()
    assert (
        run(download_thumbnails(client, layout, ids, chunk_key="chunk-000001"))["status"] == "ok"
    ).all()
    assert not client.downloads and not client.lookups


def test_on_a_bucket_rows_of_a_shard_that_is_gone_are_fetched_again_and_never_describe_the_new_one(
    bucket_layout,
):
    layout, store = bucket_layout, bucket_layout.store
    ids = [str(40_000 + i) for i in range(12)]
    client = FakeClient(set(ids), {i: make_jpeg(int(i)) for i in ids})
    first = run(download_thumbnails(client, layout, ids, chunk_key="chunk-000002"))
    store.write_parquet(layout.downloads_key("chunk-000002"), first)
    store.delete(layout.thumbnail_shard_key("chunk-000002", 1024))
    client.downloads.clear()
    again = run(download_thumbnails(client, layout, ids, chunk_key="chunk-000002"))
    assert dict(client.downloads) == dict.fromkeys(ids, 1)
    # the old rows were removed before the new shard went up (this attempt's rows are the caller's to write)
    assert not store.exists(layout.downloads_key("chunk-000002"))
    for row in again.itertuples():
        assert (
            layout.read_thumbnail(row.path, row.offset, row.length) == client.bodies[row.image_id]
        )
