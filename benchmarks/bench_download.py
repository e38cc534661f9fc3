"""Thumbnail download throughput against the emulator: the pipeline with all its checks vs a plain loop.

An EmulatorServer (World seed 42, scale 0.005; 1024 px thumbnails of ~240 KB) runs in a child process,
so its serving CPU does not share the GIL with the side being measured. Both sides start from an
empty folder and resolve URLs the same way, `client.get_images` in batches of 50:

* pipeline: `download_thumbnails` (fresh URLs per batch just before downloading, concurrency 64,
  SOI/EOI + header and marker checks, atomic write (temp name + rename) to the sharded path);
* baseline: all URL batches first (concurrently), then aiohttp + asyncio.Semaphore(100) + plain
  `open().write()` into one folder, no checks;
* baseline with the same writes: the same loop, but each file written like the pipeline writes it
  (storage.atomic_write_bytes to layout.thumbnail_path, on the event loop as the pipeline does). Against this one
  the pipeline's own work (fresh URLs, checks, retries) is isolated from the cost of the storage layout.

A third figure prices the optional strict decode check (`decode_check=True`) against the same baseline.

A warm-up pass (untimed) makes the emulator render its thumbnail pool first. Median of 3.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import aiohttp

from benchmarks.harness import Figure, Stopwatch, median_of
from mapillary_assets.api import ClientSettings, MapillaryClient, Secret
from mapillary_assets.pipeline import download
from mapillary_assets.pipeline.download import RESOLVE_BATCH_SIZE, download_thumbnails
from mapillary_assets.storage import DataLayout, atomic_write_bytes

TOKEN = "MLY|bench-download"
SEED, SCALE = 42, 0.005
REPEATS = 3
ZURICH_BOX = (8.45, 47.32, 8.62, 47.43)


def _serve(port_pipe, stop_event) -> None:
    from mapillary_assets.emulator import EmulatorServer, World

    with EmulatorServer(world=World(seed=SEED, scale=SCALE), token=TOKEN) as server:
        port_pipe.send(server.base_url)
        stop_event.wait()


def world_ids(count: int) -> list[str]:
    from shapely.geometry import box

    from mapillary_assets.emulator import World

    world = World(seed=SEED, scale=SCALE)
    ids: list[str] = []
    for x, y in world.nonempty_z14_tiles(box(*ZURICH_BOX)):
        ids.extend(record.id for record in world.images_in_z14_tile(x, y))
        if len(ids) >= count:
            return ids[:count]
    raise RuntimeError(f"the benchmark world holds fewer than {count} images")


def _client(base_url: str) -> MapillaryClient:
    return MapillaryClient(ClientSettings(token=Secret(TOKEN), graph_url=base_url + "/graph",
                                          tiles_url=base_url + "/tiles", entity_per_minute=1_000_000))


async def pipeline_run(base_url: str, folder: Path, ids: list[str], decode_check: bool = False) -> int:
    async with _client(base_url) as client:
        frame = await download_thumbnails(client, DataLayout(folder), ids, decode_check=decode_check)
    failed = int((frame["status"] != "ok").sum())
    if failed:
        raise RuntimeError(f"{failed} pipeline downloads failed: {frame['reason'].dropna().iloc[0]}")
    return len(frame)


async def baseline_run(base_url: str, folder: Path, ids: list[str], durable: bool = False) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    layout = DataLayout(folder)
    async with _client(base_url) as client:
        batches = [ids[i : i + RESOLVE_BATCH_SIZE] for i in range(0, len(ids), RESOLVE_BATCH_SIZE)]
        found = await asyncio.gather(*(client.get_images(b, ["thumb_1024_url"]) for b in batches))
    urls = {image_id: entity["thumb_1024_url"] for result in found for image_id, entity in result.items()}
    limit = asyncio.Semaphore(100)
    async with aiohttp.ClientSession() as session:
        async def one(image_id: str, url: str) -> None:
            async with limit:
                async with session.get(url) as response:
                    response.raise_for_status()
                    body = await response.read()
            if durable:
                atomic_write_bytes(layout.thumbnail_path(image_id, 1024), body, durable=False)
            else:
                with open(folder / f"{image_id}.jpg", "wb") as handle:
                    handle.write(body)

        await asyncio.gather(*(one(i, u) for i, u in urls.items()))
    return len(urls)


def images_per_second(run_once, base_url: str, scratch: Path, ids: list[str]) -> float:
    def once() -> float:
        folder = Path(tempfile.mkdtemp(dir=scratch))
        try:
            with Stopwatch() as watch:
                done = asyncio.run(run_once(base_url, folder, ids))
            assert done == len(ids)
            return done / watch.seconds
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return median_of(REPEATS, once)


def run(quick: bool) -> list[Figure]:
    count = 300 if quick else 3000
    ids = world_ids(count)
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    stop = context.Event()
    emulator = context.Process(target=_serve, args=(send, stop), daemon=True)
    emulator.start()
    try:
        if not receive.poll(60):
            raise RuntimeError("the emulator did not start within 60 s")
        base_url = receive.recv()
        with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
            scratch = Path(tmp)
            asyncio.run(baseline_run(base_url, scratch / "warm-up", ids))  # emulator renders its pool
            baseline = images_per_second(baseline_run, base_url, scratch, ids)
            durable = images_per_second(functools.partial(baseline_run, durable=True), base_url, scratch, ids)
            ours = images_per_second(pipeline_run, base_url, scratch, ids)
            decoding = images_per_second(functools.partial(pipeline_run, decode_check=True), base_url, scratch, ids)
    finally:
        stop.set()
        emulator.join(10)
        if emulator.is_alive():
            emulator.terminate()
    setting = f"{count} thumbnails (1024 px, ~240 KB) from the emulator"
    return [
        Figure("download", f"images/s, {setting}, all checks", ours, "images/s", baseline,
               "aiohttp + Semaphore(100) + plain write to one folder, no checks", ">= 1.0x", ours >= baseline,
               f"pipeline: fresh URLs per batch, marker checks, atomic writes (rename, no per-file fsync) to the "
               f"sharded layout, concurrency 64; {os.cpu_count()} cores shared with "
               "the emulator process",
               extra={"images": count, "max_jpeg_attempts": download.MAX_JPEG_ATTEMPTS}),
        Figure("download", f"images/s, {setting}, all checks, vs the same atomic writes", ours, "images/s",
               durable, "the plain loop writing like the pipeline (atomic rename, sharded)", ">= 1.0x",
               ours >= durable, "isolates the pipeline's own cost (URL freshness, checks, retries, bookkeeping)",
               extra={"images": count}),
        Figure("download", f"images/s, {setting}, all checks + strict decode (decode_check=True)", decoding,
               "images/s", durable, "the plain loop writing like the pipeline (atomic rename, sharded)",
               None, None, "the optional check; off by default because of this cost", extra={"images": count}),
    ]


if __name__ == "__main__":
    for figure in run(quick=bool(os.environ.get("QUICK"))):
        print(figure)
