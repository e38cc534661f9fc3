"""Thumbnails in a bucket: one object per image against one tar shard per chunk, on SeaweedFS.

SeaweedFS (`scaleout/object_store.py`, the stack's and the tests' S3 server) runs on loopback; the
local data dir (today's one file per image, written like the downloader writes) is the baseline. The
images are one chunk of real emulator JPEGs made in-process (`emulator.thumbnails.thumbnail_bytes`):
5,000 at 256 px (~20 KB each), then 1,000 at the pipeline's default 1024 px (~240 KB; shard against
objects only). Each round runs every side once on a fresh key prefix, the order rotating, and
the figures are medians of the rounds:

* write: one object per image, PUTs one at a time (what `pipeline/download.py` does today: the store's
  `put` on the event loop) and 64 concurrent `obstore.put_async` (the download concurrency); against
  one tar built in memory (`storage/shards.build_shard`) put once (multipart above 16 MB) plus its index
  (image_id, offset, length) as a small Parquet object beside it;
* read-all, what blur does: one GET per object, from blur's decode threads (one per core, as
  `score_images` reads) and as 64 concurrent async GETs; against one GET of the shard and its members
  iterated;
* read-one-by-id: the GET of one object; against one ranged GET of the member, with the index at hand
  (read once, as from the downloads Parquet) and with the index object fetched first.

The measuring runs in a spawned process: obstore's runtime is not fork-safe, and the benchmark runner
must stay free to fork after this benchmark.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import secrets
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.harness import Figure
from mapillary_assets.storage import DataLayout

NAME = "object_store"
SIZES = (256, 1024)  # the chunk at 256 px; the pipeline's default size, fewer images
CONCURRENCY = 64  # download_thumbnails' default concurrency
ONE_BY_ID_SAMPLES = 40
BUCKET = "bench-thumbnails"
SHARD_KEY = "thumbnails/shards/chunk-000000.tar"
BLUR_THREADS = "s3 objects, blur's threads"
INDEX_KEY = "thumbnails/shards/chunk-000000.index.parquet"


def _chunk(count: int, size: int) -> list[tuple[str, bytes]]:
    from benchmarks.bench_download import world_ids
    from mapillary_assets.emulator.thumbnails import thumbnail_bytes

    return [(image_id, thumbnail_bytes(image_id, size, False)) for image_id in world_ids(count)]


def _timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


class _Sides:
    """Every way of writing and reading the chunk, each on the store (and key prefix) it is given."""

    def __init__(
        self, images: list[tuple[str, bytes]], size: int, settings, blur_threads: int
    ) -> None:
        self.images = images
        self.settings = settings
        self.blur_threads = blur_threads
        self.keys = {image_id: DataLayout.thumbnail_key(image_id, size) for image_id, _ in images}

    def bucket(self, prefix: str):
        from mapillary_assets.storage import ObjectStore

        return ObjectStore(f"s3://{BUCKET}/{prefix}", self.settings)

    # writes
    def put_each(self, store) -> None:
        for image_id, data in self.images:
            store.put(self.keys[image_id], data, durable=False)

    def put_each_concurrently(self, store) -> None:
        import obstore

        from mapillary_assets.storage.object_store import s3_store

        raw = s3_store(store.bucket, self.settings, store.prefix)

        async def all_puts() -> None:
            limit = asyncio.Semaphore(CONCURRENCY)

            async def one(image_id: str, data: bytes) -> None:
                async with limit:
                    await obstore.put_async(raw, self.keys[image_id], data, use_multipart=False)

            await asyncio.gather(*(one(image_id, data) for image_id, data in self.images))

        asyncio.run(all_puts())

    def put_shard(self, store) -> None:
        from mapillary_assets.storage.shards import build_shard

        shard, index = build_shard(self.images)
        store.put(SHARD_KEY, shard, durable=False)
        store.write_parquet(INDEX_KEY, index)

    # reads of the whole chunk
    def get_each_in_blur_threads(self, store) -> list[bytes]:
        with ThreadPoolExecutor(max_workers=self.blur_threads) as pool:
            return list(pool.map(store.get, self.keys.values()))

    def get_each_concurrently(self, store) -> list[bytes]:
        import obstore

        from mapillary_assets.storage.object_store import s3_store

        raw = s3_store(store.bucket, self.settings, store.prefix)

        async def all_gets() -> list[bytes]:
            limit = asyncio.Semaphore(CONCURRENCY)

            async def one(key: str) -> bytes:
                async with limit:
                    return bytes(await (await obstore.get_async(raw, key)).bytes_async())

            return await asyncio.gather(*(one(key) for key in self.keys.values()))

        return asyncio.run(all_gets())

    def get_each_serially(self, store) -> list[bytes]:
        return [store.get(key) for key in self.keys.values()]

    def get_shard(self, store) -> list[bytes]:
        from mapillary_assets.storage.shards import shard_members

        return [data for _, data in shard_members(store.get(SHARD_KEY))]

    # one image by its id (ms per image, median over the sampled ids)
    def one_object(self, store, ids: list[str]) -> float:
        return statistics.median(_timed(lambda i=i: store.get(self.keys[i])) for i in ids) * 1e3

    def one_member(self, store, ids: list[str], index=None) -> float:
        """With `index` (read once beforehand, as from the downloads Parquet) only the ranged GET is
        timed; without, each read first fetches the index object and looks the id up in it."""
        from mapillary_assets.storage.shards import member_range

        at_hand = {i: member_range(index, i) for i in ids} if index is not None else {}

        def read(image_id: str) -> bytes:
            where = at_hand.get(image_id) or member_range(store.read_parquet(INDEX_KEY), image_id)
            return store.get_range(SHARD_KEY, *where)

        expected = dict(self.images)
        assert all(read(i) == expected[i] for i in ids[:3])
        return statistics.median(_timed(lambda i=i: read(i)) for i in ids) * 1e3


def _rotated(names: list[str], round_number: int) -> list[str]:
    shift = round_number % len(names)
    return names[shift:] + names[:shift]


def measure(count: int, rounds: int, size: int) -> dict:
    """Seconds of every side per round, ms of the read-one sides, load averages (runs in a child)."""
    from mapillary_assets.net import free_port
    from mapillary_assets.scaleout import object_store as seaweedfs
    from mapillary_assets.storage import LocalStore, S3Settings

    images = _chunk(count, size)
    expected = [data for _, data in images]
    ids = random.Random(7).sample([image_id for image_id, _ in images], ONE_BY_ID_SAMPLES)
    access_key, secret = "bench" + secrets.token_hex(6), secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="bench-object-store-", dir="/tmp") as tmp:
        folder = Path(tmp) / "seaweedfs"
        endpoint = seaweedfs.start(folder, free_port(), Path(tmp) / "weed.log", access_key, secret)
        try:
            seaweedfs.create_bucket(folder, BUCKET)
            settings = S3Settings(
                endpoint=endpoint,
                access_key_id=access_key,
                secret_access_key=secret,
                allow_http=True,
            )
            sides = _Sides(images, size, settings, blur_threads=len(os.sched_getaffinity(0)))
            writes = {
                "s3 objects, one PUT at a time": ("s3", "objects", sides.put_each),
                "s3 objects, 64 concurrent PUTs": ("s3", "objects", sides.put_each_concurrently),
                "s3 shard": ("s3", "shard", sides.put_shard),
                "local files": ("local", "objects", sides.put_each),
                "local shard": ("local", "shard", sides.put_shard),
            }
            reads = {
                BLUR_THREADS: ("s3", "objects", sides.get_each_in_blur_threads),
                "s3 objects, 64 concurrent GETs": ("s3", "objects", sides.get_each_concurrently),
                "s3 shard": ("s3", "shard", sides.get_shard),
                "local files": ("local", "objects", sides.get_each_serially),
                "local shard": ("local", "shard", sides.get_shard),
            }
            seconds: dict[str, dict[str, list[float]]] = {
                "write": {name: [] for name in writes},
                "read": {name: [] for name in reads},
            }
            one_ms: dict[str, list[float]] = {
                name: []
                for name in (
                    "s3 object",
                    "s3 member",
                    "s3 index + member",
                    "local file",
                    "local member",
                )
            }
            loads = [os.getloadavg()[0]]
            for round_number in range(rounds):
                stores = {
                    ("s3", "objects"): sides.bucket(f"round{round_number}/objects"),
                    ("s3", "shard"): sides.bucket(f"round{round_number}/shard"),
                    ("local", "objects"): LocalStore(Path(tmp) / f"round{round_number}" / "files"),
                    ("local", "shard"): LocalStore(Path(tmp) / f"round{round_number}" / "shard"),
                }
                # each write side writes its own prefix: both object writers get one of their own
                for name in _rotated(list(writes), round_number):
                    backend, layout, write = writes[name]
                    store = stores[(backend, layout)]
                    if name == "s3 objects, 64 concurrent PUTs":
                        store = sides.bucket(f"round{round_number}/objects-concurrent")
                    seconds["write"][name].append(_timed(lambda w=write, s=store: w(s)))
                for name in _rotated(list(reads), round_number):
                    backend, layout, read = reads[name]
                    store = stores[(backend, layout)]
                    started = time.perf_counter()
                    result = read(store)
                    seconds["read"][name].append(time.perf_counter() - started)
                    if result != expected:
                        raise RuntimeError(f"{name} did not read back the chunk it wrote")
                index = stores[("s3", "shard")].read_parquet(INDEX_KEY)
                one_ms["s3 object"].append(sides.one_object(stores[("s3", "objects")], ids))
                one_ms["s3 member"].append(sides.one_member(stores[("s3", "shard")], ids, index))
                one_ms["s3 index + member"].append(sides.one_member(stores[("s3", "shard")], ids))
                one_ms["local file"].append(sides.one_object(stores[("local", "objects")], ids))
                one_ms["local member"].append(
                    sides.one_member(stores[("local", "shard")], ids, index)
                )
                loads.append(os.getloadavg()[0])
            shard_bytes = len(stores[("s3", "shard")].get(SHARD_KEY))
            index_bytes = len(stores[("s3", "shard")].get(INDEX_KEY))
        finally:
            seaweedfs.stop(folder)
    return {
        "seconds": seconds,
        "one_ms": one_ms,
        "loads": loads,
        "jpeg_bytes": sum(len(data) for data in expected),
        "shard_bytes": shard_bytes,
        "index_bytes": index_bytes,
    }


def run(quick: bool) -> list[Figure]:
    settings = {256: (1000, 2), 1024: (300, 1)} if quick else {256: (5000, 3), 1024: (1000, 3)}
    context = multiprocessing.get_context("spawn")
    figures = []
    with context.Pool(1) as pool:
        for size, (count, rounds) in settings.items():
            measured = pool.apply(measure, (count, rounds, size))
            found = figures_of(measured, count, rounds, size)
            # at the default 1024 px only shard against objects: the local baselines are the 256 px ones'
            figures += (
                found if size == SIZES[0] else [f for f in found if f.baseline_name[:5] != "local"]
            )
    return figures


def figures_of(measured: dict, count: int, rounds: int, size: int) -> list[Figure]:
    seconds, one_ms = measured["seconds"], measured["one_ms"]

    def rate(kind: str, name: str) -> float:
        return count / statistics.median(seconds[kind][name])

    def per_round(kind: str, name: str) -> list[float]:
        return [round(count / s, 1) for s in seconds[kind][name]]

    def ms(name: str) -> float:
        return statistics.median(one_ms[name])

    loads = measured["loads"]
    setting = f"{count:,} JPEGs at {size} px (~{measured['jpeg_bytes'] / count / 1e3:.0f} KB), SeaweedFS on loopback"
    common = (
        f"median of {rounds} interleaved rounds; load average {loads[0]:.0f} at the start, "
        f"{', '.join(f'{value:.0f}' for value in loads[1:])} after each round; 2 shared cores"
    )
    extra = {
        "images": count,
        "shard_mb": round(measured["shard_bytes"] / 1e6, 1),
        "index_kb": round(measured["index_bytes"] / 1e3, 1),
        "write_images_per_s_per_round": {
            name: per_round("write", name) for name in seconds["write"]
        },
        "read_images_per_s_per_round": {name: per_round("read", name) for name in seconds["read"]},
        "read_one_ms_per_round": {
            name: [round(v, 2) for v in values] for name, values in one_ms.items()
        },
    }
    requests = f"{count:,} PUTs vs 2 (shard in {(measured['shard_bytes'] - 1) // (8 << 20) + 1} parts + index)"
    return [
        Figure(
            NAME,
            f"write images/s, {setting}: one tar shard + index object",
            rate("write", "s3 shard"),
            "images/s",
            rate("write", "s3 objects, 64 concurrent PUTs"),
            "one object per image, 64 concurrent async PUTs",
            notes=f"{requests}; today's downloader PUTs one at a time: "
            f"{rate('write', 's3 objects, one PUT at a time'):,.0f} images/s; {common}",
            extra=extra,
        ),
        Figure(
            NAME,
            f"write images/s, {setting}: one object per image, 64 concurrent async PUTs",
            rate("write", "s3 objects, 64 concurrent PUTs"),
            "images/s",
            rate("write", "local files"),
            "local data dir, a file per image (atomic rename, no fsync)",
            notes=f"the local dir with one tar shard: {rate('write', 'local shard'):,.0f} images/s; {common}",
        ),
        Figure(
            NAME,
            f"read-all images/s (blur's read), {setting}: one GET of the shard, members iterated",
            rate("read", "s3 shard"),
            "images/s",
            rate("read", "s3 objects, 64 concurrent GETs"),
            "one GET per object, 64 concurrent async GETs",
            notes=f"{count:,} GETs vs 1; blur's own way today (GETs from its "
            f"{len(os.sched_getaffinity(0))} decode threads): "
            f"{rate('read', BLUR_THREADS):,.0f} images/s; {common}",
        ),
        Figure(
            NAME,
            f"read-all images/s (blur's read), {setting}: one object per image, from blur's decode threads",
            rate("read", BLUR_THREADS),
            "images/s",
            rate("read", "local files"),
            "local data dir, a file per image",
            notes=f"the local dir with one tar shard: {rate('read', 'local shard'):,.0f} images/s; {common}",
        ),
        Figure(
            NAME,
            f"read one image by id, ms (lower is better), {setting}: ranged GET of its shard member, index at hand",
            ms("s3 member"),
            "ms",
            ms("s3 object"),
            "GET of the image's own object",
            notes=f"index fetched first (one more GET, {measured['index_bytes'] / 1e3:.0f} KB Parquet): "
            f"{ms('s3 index + member'):.1f} ms; local file {ms('local file'):.2f} ms, local member "
            f"{ms('local member'):.2f} ms; median over {ONE_BY_ID_SAMPLES} ids per round; {common}",
        ),
    ]


if __name__ == "__main__":
    for figure in run(quick=bool(os.environ.get("QUICK"))):
        print(figure)
