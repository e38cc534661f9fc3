"""Thumbnail download throughput against the emulator: the pipeline with all its checks vs a plain loop.

An EmulatorServer (World seed 42, scale 0.005; 1024 px thumbnails of ~240 KB) runs in a child process,
so its serving CPU does not share the GIL with the side being measured. Every side starts from a
data dir without thumbnails whose shard folders exist (the steady state of every run after a data dir's
first; that one-time creation is timed apart) and resolves URLs the same way, `client.get_images` in
batches of 50:

* pipeline: `download_thumbnails` (fresh URLs per batch just before downloading, concurrency 64,
  SOI/EOI + header and marker checks, atomic write (temp name + rename) to the sharded path);
* baseline: all URL batches first (concurrently), then aiohttp + asyncio.Semaphore(100) + plain
  `open().write()` into one folder, no checks;
* baseline with the same writes: the same loop, but each file written like the pipeline writes it
  (`storage.atomic_write_bytes(durable=False)` to layout.thumbnail_path, shard folders made first,
  on the event loop as the pipeline does). Against this one
  the pipeline's own work (fresh URLs, checks, retries) is isolated from the cost of the storage layout.

A third figure prices the optional strict decode check (`decode_check=True`) against the same baseline.

A warm-up pass (untimed) makes the emulator render its thumbnail pool first. Median of 5, the repeats
interleaved (each round runs every side once, in a rotating order) so that every side sees the same
load on a shared machine; each figure also records the ratios of the rounds (`round_ratios`), so the
spread of the ratio is visible, not only the medians'.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from benchmarks.harness import Figure, Stopwatch
from mapillary_assets.api import ClientConfig, MapillaryClient, Secret
from mapillary_assets.pipeline import download, jpeg_verification
from mapillary_assets.pipeline.download import RESOLVE_BATCH_SIZE, download_thumbnails
from mapillary_assets.storage import DataLayout, atomic_write_bytes

TOKEN = "MLY|bench-download"
SEED, SCALE = 42, 0.005
REPEATS = 5
ZURICH_BOX = (8.45, 47.32, 8.62, 47.43)


def _serve(port_pipe, stop_event) -> None:
    from mapillary_assets.emulator import EmulatorServer, World

    with EmulatorServer(world=World(seed=SEED, scale=SCALE), token=TOKEN) as server:
        port_pipe.send(server.base_url)
        stop_event.wait()


@contextlib.contextmanager
def emulator_process() -> Iterator[str]:
    """The benchmark world's emulator in a process of its own (its CPU is not the client's); its
    base URL while the block runs."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    stop = context.Event()
    emulator = context.Process(target=_serve, args=(send, stop), daemon=True)
    emulator.start()
    try:
        if not receive.poll(60):
            raise RuntimeError("the emulator did not start within 60 s")
        yield receive.recv()
    finally:
        stop.set()
        emulator.join(10)
        if emulator.is_alive():
            emulator.terminate()


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
    return MapillaryClient(
        ClientConfig(
            token=Secret(TOKEN),
            graph_url=base_url + "/graph",
            tiles_url=base_url + "/tiles",
            entity_per_minute=1_000_000,
        )
    )


async def pipeline_run(
    base_url: str, folder: Path, ids: list[str], decode_check: bool = False
) -> int:
    async with _client(base_url) as client:
        frame = await download_thumbnails(
            client, DataLayout(folder), ids, decode_check=decode_check
        )
    failed = int((frame["status"] != "ok").sum())
    if failed:
        raise RuntimeError(
            f"{failed} pipeline downloads failed: {frame['reason'].dropna().iloc[0]}"
        )
    return len(frame)


async def baseline_run(base_url: str, folder: Path, ids: list[str], durable: bool = False) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    layout = DataLayout(folder)
    async with _client(base_url) as client:
        batches = [ids[i : i + RESOLVE_BATCH_SIZE] for i in range(0, len(ids), RESOLVE_BATCH_SIZE)]
        found = await asyncio.gather(*(client.get_images(b, ["thumb_1024_url"]) for b in batches))
    urls = {
        image_id: entity["thumb_1024_url"]
        for result in found
        for image_id, entity in result.items()
    }
    limit = asyncio.Semaphore(100)
    if durable:  # as the pipeline does: each shard folder once, before the writes
        for image_id in urls:
            layout.thumbnail_path(image_id, 1024).parent.mkdir(parents=True, exist_ok=True)
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


def make_shard_folders(folder: Path) -> None:
    """Create every folder the layout spreads 1024 px thumbnails over (the last 3 digits of an id: 1,000)."""
    layout = DataLayout(folder)
    for path in sorted({layout.thumbnail_path(str(n), 1024).parent for n in range(1000)}):
        path.mkdir(parents=True)


def folder_creation_ms(scratch: Path, repeats: int = 3) -> float:
    """Wall ms to create every shard folder of a new data dir: paid once per data dir and size, by its
    first download run (median of `repeats`)."""
    times = []
    for _ in range(repeats):
        folder = Path(tempfile.mkdtemp(dir=scratch))
        started = time.perf_counter()
        make_shard_folders(folder)
        times.append((time.perf_counter() - started) * 1000)
        shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(times)


def images_per_second(
    run_once, base_url: str, scratch: Path, ids: list[str]
) -> tuple[float, float, float]:
    """(images/s, CPU ms of this process per image, of it in the kernel): the event loop is the
    bottleneck, and its CPU per image is far less disturbed by other load on a shared machine than the
    wall-clock rate. The run writes into a data dir whose shard folders exist, as every run after a data
    dir's first does (their one-time creation is `folder_creation_ms`)."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    make_shard_folders(folder)
    try:
        before = os.times()
        with Stopwatch() as watch:
            done = asyncio.run(run_once(base_url, folder, ids))
        after = os.times()
        assert done == len(ids)
        user, kernel = after.user - before.user, after.system - before.system
        return done / watch.seconds, (user + kernel) * 1000 / done, kernel * 1000 / done
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def interleaved(
    sides: dict, base_url: str, scratch: Path, ids: list[str], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """images/s, CPU ms/image and its kernel part of every side, `repeats` rounds; each round runs every
    side once, the order rotating by one each round."""
    names = list(sides)
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    kernel: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(repeats):
        for name in names[round_number % len(names) :] + names[: round_number % len(names)]:
            rate, cpu_ms, kernel_ms = images_per_second(sides[name], base_url, scratch, ids)
            rates[name].append(rate)
            cpu[name].append(cpu_ms)
            kernel[name].append(kernel_ms)
    return rates, cpu, kernel


def _microseconds_each(action, items: list, repeats: int = 5, before_each_pass=None) -> float:
    """Median over `repeats` passes of the µs per item of `action(item)`; `before_each_pass()` is untimed."""

    def one_pass() -> float:
        if before_each_pass is not None:
            before_each_pass()
        started = time.perf_counter()
        for item in items:
            action(item)
        return (time.perf_counter() - started) * 1e6 / len(items)

    return statistics.median(one_pass() for _ in range(repeats))


def check_costs(ids: list[str], scratch: Path) -> dict[str, float]:
    """µs per 1024 px thumbnail of each check and of each way of writing, measured alone on the bodies
    the emulator serves (the end-to-end figures above are noisier than these differences)."""
    from mapillary_assets.emulator.thumbnails import thumbnail_bytes

    bodies = [(image_id, thumbnail_bytes(image_id, 1024, False)) for image_id in ids[:200]]
    layout = DataLayout(scratch / "sharded")
    plain = scratch / "plain"
    plain.mkdir()

    def write_plain(item) -> None:
        with open(plain / f"{item[0]}.jpg", "wb") as handle:
            handle.write(item[1])

    sharded_paths = [layout.thumbnail_path(image_id, 1024) for image_id, _ in bodies]

    def empty_folders() -> None:
        """Every pass writes new files into existing folders, the steady state of a download run (a
        shard's folder is created once, by its first file; a rename over an existing file is rarer)."""
        for path in [*sharded_paths, *(plain / f"{image_id}.jpg" for image_id, _ in bodies)]:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)

    costs = {
        "marker checks (SOI/EOI, header segments, scan markers)": _microseconds_each(
            lambda item: jpeg_verification.verify_jpeg(item[1]), bodies
        ),
        "strict decode (optional, decode_check=True)": _microseconds_each(
            lambda item: jpeg_verification.decode_problem(item[1]), bodies, repeats=3
        ),
        "plain write to one folder (baseline)": _microseconds_each(
            write_plain, bodies, before_each_pass=empty_folders
        ),
        "atomic write (temp name + rename) to the sharded path": _microseconds_each(
            lambda item: atomic_write_bytes(
                layout.thumbnail_path(item[0], 1024), item[1], durable=False
            ),
            bodies,
            before_each_pass=empty_folders,
        ),
    }
    return {name: round(value, 1) for name, value in costs.items()}


def _round_ratios(values: list[float], baselines: list[float]) -> list[float]:
    return [round(value / baseline, 3) for value, baseline in zip(values, baselines)]


def run(quick: bool) -> list[Figure]:
    count = 300 if quick else 2000
    ids = world_ids(count)
    with (
        emulator_process() as base_url,
        tempfile.TemporaryDirectory(prefix="bench-download-") as tmp,
    ):
        scratch = Path(tmp)
        asyncio.run(baseline_run(base_url, scratch / "warm-up", ids))  # emulator renders its pool
        load_before = os.getloadavg()[0]
        rates, cpu, kernel = interleaved(
            {
                "baseline": baseline_run,
                "durable": functools.partial(baseline_run, durable=True),
                "ours": pipeline_run,
                "decoding": functools.partial(pipeline_run, decode_check=True),
            },
            base_url,
            scratch,
            ids,
            2 if quick else REPEATS,
        )
        costs = check_costs(ids, scratch)
        folders_ms = folder_creation_ms(scratch)
        load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    baseline, durable, ours, decoding = (
        statistics.median(rates[name]) for name in ("baseline", "durable", "ours", "decoding")
    )
    setting = f"{count} thumbnails (1024 px, ~240 KB) from the emulator"
    cpu_ms = {name: statistics.median(values) for name, values in cpu.items()}
    kernel_ms = {name: statistics.median(values) for name, values in kernel.items()}
    steady = (
        f"each run writes into a data dir whose 1,000 shard folders exist, as every run after a data dir's "
        f"first does: creating them takes {folders_ms:,.0f} ms once per data dir and size "
        f"({folders_ms / count:.3f} ms an image at this run's {count:,}, "
        f"{folders_ms / 1_194_833:.5f} at Zurich's 1.2 M)"
    )
    kernel_note = "; CPU ms per image in the kernel (of the total): " + ", ".join(
        f"{name} {kernel_ms[name]:.3f} of {cpu_ms[name]:.3f}" for name in cpu_ms
    )
    return [
        Figure(
            "download",
            f"images/s, {setting}, all checks",
            ours,
            "images/s",
            baseline,
            "aiohttp + Semaphore(100) + plain write to one folder, no checks",
            ">= 1.0x",
            ours >= baseline,
            f"pipeline: fresh URLs per batch, marker checks, atomic writes (rename, no per-file fsync) to the "
            f"sharded layout, concurrency 64; {os.cpu_count()} cores shared with "
            f"the emulator process; repeats interleaved; {steady}; {load}",
            extra={
                "images": count,
                "shard_folder_creation_ms": round(folders_ms, 1),
                "max_jpeg_attempts": download.MAX_JPEG_ATTEMPTS,
                "round_ratios": _round_ratios(rates["ours"], rates["baseline"]),
                "cpu_ms_per_image": {name: round(value, 3) for name, value in cpu_ms.items()},
                "kernel_cpu_ms_per_image": {
                    name: round(value, 3) for name, value in kernel_ms.items()
                },
                "check_costs_us_per_image": costs,
            },
        ),
        Figure(
            "download",
            f"images/s, {setting}, all checks, vs the same atomic writes",
            ours,
            "images/s",
            durable,
            "the plain loop writing like the pipeline (atomic rename, sharded)",
            ">= 1.0x",
            ours >= durable,
            "isolates the pipeline's own cost (URL freshness, checks, retries, bookkeeping)",
            extra={"images": count, "round_ratios": _round_ratios(rates["ours"], rates["durable"])},
        ),
        Figure(
            "download",
            f"CPU ms per image of the downloading process (lower is better), {setting}, all checks",
            cpu_ms["ours"],
            "ms",
            cpu_ms["baseline"],
            "the plain loop (aiohttp + plain write, no checks)",
            "<= 1.3x",
            cpu_ms["ours"] <= 1.3 * cpu_ms["baseline"],
            "user + kernel CPU of the client process per image, median of the same interleaved rounds; "
            f"less disturbed by other load than images/s{kernel_note}",
            extra={"images": count, "check_costs_us_per_image": costs},
        ),
        Figure(
            "download",
            f"images/s, {setting}, all checks + strict decode (decode_check=True)",
            decoding,
            "images/s",
            durable,
            "the plain loop writing like the pipeline (atomic rename, sharded)",
            None,
            None,
            "the optional check; off by default because of this cost",
            extra={"images": count},
        ),
    ]


if __name__ == "__main__":
    for figure in run(quick=bool(os.environ.get("QUICK"))):
        print(figure)
