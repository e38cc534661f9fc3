"""Metadata throughput at a configured entity rate limit, against the emulator enforcing that limit.

The pipeline (`fetch_metadata`: `?ids=` batches of 50, concurrent, paced by the client's shared
token bucket) fetches chunks of 5,000 ids one after another, as the metadata asset does, for about
20 s (quick: 1,200 req/min) or 75 s (full: 6,000 req/min; longer than the 60-s window, so the
window's budget is really put to the test). The emulator rejects every request over the budget of
its 60-second sliding window (code 4), so the figures show whether the pacing holds.

Baselines, measured in the same run on fresh emulators with the same enforced limit:
* per-id entity requests (`GET /{id}`) through the same paced client, concurrently: what the
  limit allows without batching;
* a naive unthrottled `asyncio.gather` of per-id requests (plain aiohttp) on a sample of 1.5 x
  the per-minute budget: what an unpaced script does to the rate limit.
"""

from __future__ import annotations

import asyncio
import math
import resource
import tempfile
from pathlib import Path

import aiohttp
import numpy as np

from benchmarks.harness import Figure, Stopwatch
from mapillary_assets.api import ClientConfig, MapillaryClient, Secret
from mapillary_assets.emulator import EmulatorServer, Faults, World
from mapillary_assets.pipeline.chunks import DEFAULT_CHUNK_SIZE
from mapillary_assets.pipeline.metadata import BATCH_SIZE, fetch_metadata

NAME = "metadata"
FIELDS = "id,captured_at,geometry,sequence,creator,camera_type,make,model,width,height,is_pano"


def _image_ids(world: World, count: int) -> list[str]:
    """`count` ids from the densest tiles (generating only the tiles needed)."""
    ids: list[str] = []
    for x, y in sorted(world.candidate_tiles(), key=lambda t: -world.expected_images(*t)):
        ids.extend(str(int(v)) for v in world.tile_images(x, y).ids)
        if len(ids) >= count:
            return ids[:count]
    raise RuntimeError(f"the world holds fewer than {count} images: raise its scale")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _pipeline(server: EmulatorServer, ids: list[str], per_minute: int, store: Path) -> dict:
    settings = ClientConfig(
        token=Secret(server.token),
        graph_url=server.graph_url,
        tiles_url=server.tiles_url,
        entity_per_minute=per_minute,
        rate_limit_store=store,
    )
    rows = failures = requests_made = 0
    async with MapillaryClient(settings) as client:
        for start in range(0, len(ids), DEFAULT_CHUNK_SIZE):
            result = await fetch_metadata(client, ids[start : start + DEFAULT_CHUNK_SIZE])
            rows += len(result.rows)
            failures += len(result.failures)
            requests_made += result.requests
    return {"rows": rows, "failures": failures, "requests": requests_made}


async def _paced_per_id(
    server: EmulatorServer, ids: list[str], per_minute: int, store: Path
) -> int:
    settings = ClientConfig(
        token=Secret(server.token),
        graph_url=server.graph_url,
        tiles_url=server.tiles_url,
        entity_per_minute=per_minute,
        rate_limit_store=store,
    )
    async with MapillaryClient(settings) as client:
        found = await asyncio.gather(*(client.get_image(i, FIELDS.split(",")) for i in ids))
    return len(found)


async def _unthrottled_gather(server: EmulatorServer, ids: list[str]) -> tuple[int, int]:
    async with aiohttp.ClientSession(headers={"Authorization": f"OAuth {server.token}"}) as session:

        async def one(image_id: str) -> int:
            async with session.get(
                f"{server.graph_url}/{image_id}", params={"fields": FIELDS}
            ) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in ids))
    ok = sum(status == 200 for status in statuses)
    return ok, len(statuses) - ok


def _measured_pipeline(
    world: World, ids: list[str], per_minute: int, budget: int, store: Path
) -> dict:
    """The pipeline against an emulator enforcing `budget` req/min, the client configured for `per_minute`."""
    with EmulatorServer(world, faults=Faults(rate_limit_per_minute={"entity": budget})) as server:
        with Stopwatch() as watch:
            outcome = asyncio.run(_pipeline(server, ids, per_minute, store))
        times = np.sort(np.array(server.request_times("entity")))
        return {**outcome, "seconds": watch.seconds, "stats": server.stats(), "times": times}


def _tail_rate(times: np.ndarray, seconds: float = 20.0) -> float:
    """Requests/s over the last `seconds` of the run (the steady state once the window is full)."""
    if len(times) < 2:
        return 0.0
    return float((times > times[-1] - seconds).sum() / seconds)


def run(quick: bool) -> list[Figure]:
    per_minute = 1_200 if quick else 6_000
    seconds = 20 if quick else 75
    per_id_seconds = 5 if quick else 10
    limit_per_s = per_minute / 60
    count = int(limit_per_s * seconds * BATCH_SIZE)
    naive_count = int(1.5 * per_minute)
    world = World(seed=42, scale=0.05 if quick else 0.3)
    ids = _image_ids(world, count)
    faults = Faults(rate_limit_per_minute={"entity": per_minute})

    with tempfile.TemporaryDirectory() as tmp:
        rss_before = _peak_rss_mb()
        main = _measured_pipeline(world, ids, per_minute, per_minute, Path(tmp) / "main.sqlite")
        rss_after = _peak_rss_mb()
        # The client slows down once the API reports > 80 % of the quota used (x-app-usage). With the
        # budget 20 % above the configured limit (docs say 50,000/min, newer wording 60,000/min) it does not.
        roomy = (
            None
            if quick
            else _measured_pipeline(
                world, ids, per_minute, int(1.2 * per_minute), Path(tmp) / "roomy.sqlite"
            )
        )
        with EmulatorServer(world, faults=faults) as server:
            with Stopwatch() as per_id:
                per_id_ok = asyncio.run(
                    _paced_per_id(
                        server,
                        ids[: int(limit_per_s * per_id_seconds)],
                        per_minute,
                        Path(tmp) / "per_id.sqlite",
                    )
                )
            per_id_limited = server.stats()["rate_limited"]
    with EmulatorServer(world, faults=faults) as server:
        with Stopwatch() as naive:
            naive_ok, naive_rejected = asyncio.run(_unthrottled_gather(server, ids[:naive_count]))
        naive_limited = server.stats()["rate_limited"]

    stats = main["stats"]
    images_per_s = main["rows"] / main["seconds"]
    share = stats["batch"] / main["seconds"] / limit_per_s
    expected_requests = math.ceil(len(ids) / BATCH_SIZE)
    per_id_per_s = per_id_ok / per_id.seconds
    context = (
        f"{len(ids):,} ids in chunks of {DEFAULT_CHUNK_SIZE:,}, {main['seconds']:.1f} s, "
        f"{main['failures']} failed; the emulator enforces {per_minute:,} req/min"
    )
    window_note = (
        f"{stats['batch']:,} batch requests in {main['seconds']:.1f} s; busiest 60-s window "
        f"{_busiest_window(main['times']):,} (budget {per_minute:,}); last 20 s at "
        f"{_tail_rate(main['times']) / limit_per_s:.2f} x limit"
    )
    if quick:
        window_note += (
            "; quick runs are shorter than the 60-s window, so its budget is never reached"
        )
    figures = [
        Figure(
            NAME,
            f"images/s at {per_minute:,} req/min entity limit",
            images_per_s,
            "images/s",
            baseline=per_id_per_s,
            baseline_name=f"per-id requests, same paced client ({per_id_seconds} s)",
            goal=f">= 0.95 x {limit_per_s * BATCH_SIZE:,.0f} (limit x 50 ids)",
            met=images_per_s >= 0.95 * limit_per_s * BATCH_SIZE,
            notes=f"{context}; per-id baseline: {per_id_ok:,} images, {per_id_limited} rate-limit errors",
        ),
        Figure(
            NAME,
            "share of the rate limit sustained",
            share,
            "x limit",
            goal=">= 0.95",
            met=share >= 0.95,
            notes=window_note,
        ),
    ]
    if roomy is not None:
        roomy_share = roomy["stats"]["batch"] / roomy["seconds"] / limit_per_s
        figures.append(
            Figure(
                NAME,
                "share of the configured limit sustained, API budget 1.2 x the limit",
                roomy_share,
                "x limit",
                baseline=share,
                baseline_name="budget = limit",
                goal=">= 0.95",
                met=roomy_share >= 0.95,
                notes=f"{roomy['stats']['rate_limited']} rate-limit errors; busiest 60-s window "
                f"{_busiest_window(roomy['times']):,}; last 20 s at {_tail_rate(roomy['times']) / limit_per_s:.2f}"
                " x limit. With budget = limit the client's x-app-usage slowdown (from 95 % used) holds it back",
            )
        )
    figures += [
        Figure(
            NAME,
            "rate-limit errors (code 4) answered by the emulator",
            stats["rate_limited"],
            "errors",
            baseline=naive_limited,
            baseline_name=f"unthrottled asyncio.gather, {naive_count:,} per-id requests",
            goal="0",
            met=stats["rate_limited"] == 0,
            notes=f"baseline: {naive_ok:,} answered, {naive_rejected:,} rejected in {naive.seconds:.1f} s",
        ),
        Figure(
            NAME,
            "requests per ceil(ids / 50)",
            stats["batch"] / expected_requests,
            "x",
            goal="<= 1.01",
            met=stats["batch"] <= 1.01 * expected_requests,
            notes=f"{stats['batch']:,} `?ids=` requests for {len(ids):,} ids ({expected_requests:,} minimum)",
        ),
        Figure(
            NAME,
            "peak resident memory of the benchmark process",
            rss_after,
            "MB",
            notes=f"includes the in-process emulator and its world; {rss_before:,.0f} MB before the run "
            "(ru_maxrss, a high-water mark)",
        ),
    ]
    return figures


def _busiest_window(times: np.ndarray, window_s: float = 60.0) -> int:
    """Most accepted requests in any `window_s`-long window (the budget the emulator enforces)."""
    if len(times) == 0:
        return 0
    times = np.sort(times)
    ends = np.searchsorted(times, times + window_s, side="left")
    return int((ends - np.arange(len(times))).max())
