"""The scaled-out mode on this machine's loopback: chunk-stage throughput with 2 Celery workers vs 1, and
the entity rate budget held by 2 workers together.

Each measurement starts a fresh stack (scripts/stack.sh's module: PostgreSQL, Redis, N workers, the
daemon) and a fresh emulator, runs the whole pipeline with `python -m mapillary_assets.scaleout run`
(per chunk a fetch run, then a blur run on the `gpu` queue), and times its chunk stage (metadata ->
thumbnails -> blur of every chunk, from submission to the last run's end). 1 and 2 workers alternate,
REPEATS rounds (fresh stacks each), and the figure compares their medians. Requests carry 50 ms of
emulated network latency, as a real API's do.
The third run enforces an entity budget in the emulator and configures the same budget in the client:
the figure is the entity request rate the two workers sustained together, beside that budget, and the
busiest 60-s window must stay within it.

On the 2-core benchmark machine two workers share the cores that one worker already half-uses (blur and
JPEG checks are CPU work), so the speed-up shown is what overlapping network waits buys, not what a
second machine would.

The latency-bound part (a) (issue 20) is the stage as the real API makes it: 300 ms per request (metadata and
thumbnails alike), each worker running one run at a time (Celery concurrency 1) with its client capped at
LATENCY_CONNECTIONS requests in flight (MAPILLARY_MAX_CONNECTIONS, the aiohttp connector's limit). The stage
is the fetch runs alone (`--until thumbnails`: metadata and thumbnail downloads, no blur, which is CPU
work), the area cut into LATENCY_CHUNKS equal chunks, and it is timed by the emulator's request log: from
its answer to the stage's first request to its answer to the last one. Inside that window: each worker's
later run launches, the metadata and thumbnail requests, JPEG checks and writes. Outside it: the stack and
its Celery workers starting, discovery, chunking, each worker's first run launch (so 2 workers have one
launch fewer inside), the last runs' teardown, publish; the driver's whole fetch stage is in the notes
too. The cores then mostly wait on the network, so a second worker should nearly double the rate (goal
>= 1.8x). A third run sets an entity budget at the average rate two workers sent unbounded; they
send in bursts (each fetch run's metadata batches come first), so the budget, not the workers, sets the
pace there, and its busiest 60-s window must stay within it.

Part (b) (issue 20) puts the data dir in the stack's object store (SeaweedFS, `s3://mapillary/data`) against
the same stack on a local data dir: 2 workers, 50 ms latency, the chunk stage (metadata, thumbnail
downloads, blur) in images/s. On loopback the store costs its own CPU on the same 2 cores; what it costs
across a network is not measured here.

MAPILLARY_BENCH_SCALEOUT_ROUNDS (default 3) sets the rounds of every comparison: each round starts fresh
stacks, several minutes on a loaded machine. One part alone, its rows into a file for
`python -m benchmarks.run --merge FILE` (which then replaces only that part's rows):

    python -m benchmarks.bench_scaleout --part a --rounds 2 --json /tmp/scaleout-a.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyogrio

from benchmarks.emulated import SMALL_AOI, SMALL_AOI_ZOOM
from benchmarks.harness import Figure
from mapillary_assets.api.rate_windows import busiest_window
from mapillary_assets.emulator import EmulatorServer, Faults, World
from mapillary_assets.net import free_port

NAME = "scaleout"
REPO = Path(__file__).resolve().parents[1]
TOKEN = "MLY|bench-scaleout|not-a-secret"
REPEATS = 3  # rounds of (1 worker, 2 workers); MAPILLARY_BENCH_SCALEOUT_ROUNDS overrides
LATENCY_S = 0.3
LATENCY_CONNECTIONS = 2  # requests in flight per worker (MAPILLARY_MAX_CONNECTIONS)
LATENCY_CHUNKS = 8  # several runs per worker, so that one run's launch and teardown weigh little
# The driver's line per stage, e.g. "fetch_job -> blur_job: 6 run(s) finished in 70.4 s".
STAGE_LINE = re.compile(r"^(\w+(?: -> \w+)*): \d+ run\(s\) finished in ([\d.]+) s$", re.MULTILINE)
NOT_CHUNK_STAGES = {"discovery_job", "assign_chunks_job", "publish_job"}
# The rows of each part, by the start of their metric: merging one part's file replaces only its rows.
PARTS = {
    "50ms": (
        "chunk stage images/s, 2 Celery workers",
        "entity requests/min sustained by 2 workers",
    ),
    "a": ("latency-bound",),
    "b": ("chunk stage images/s, data dir in the object store",),
}


def _pipeline(
    workers: int,
    world: World,
    faults: Faults,
    chunk_size: int,
    entity_per_minute: int | None,
    gpu_workers: int = 1,
    max_connections: int | None = None,
    on_bucket: bool = False,
    until: str = "blur",
) -> dict:
    from mapillary_assets.scaleout import stack
    from mapillary_assets.storage import DataLayout, ObjectStore, s3_settings_from_env

    root = Path(tempfile.mkdtemp(prefix="mapillary-bench-stack-", dir="/tmp"))
    os.chmod(root, 0o755)  # PostgreSQL runs as the postgres user when we are root
    config = stack.StackConfig(
        root=root,
        workers=workers,
        gpu_workers=gpu_workers,
        pg_port=free_port(),
        redis_port=free_port(),
        webserver_port=free_port(),  # runs are submitted through its GraphQL API
        s3_port=free_port(),
        automation=False,
        data_dir=None if on_bucket else root / "data",
    )
    with EmulatorServer(world=world, faults=faults, token=TOKEN) as server:
        base = {
            **os.environ,
            "MAPILLARY_ACCESS_TOKEN": TOKEN,
            "MAPILLARY_GRAPH_URL": server.graph_url,
            "MAPILLARY_TILES_URL": server.tiles_url,
            "MAPILLARY_AOI": str(SMALL_AOI),
            "MAPILLARY_PARTITION_ZOOM": str(SMALL_AOI_ZOOM),
            "MAPILLARY_CHUNK_SIZE": str(chunk_size),
        }
        if entity_per_minute:
            base["MAPILLARY_ENTITY_PER_MINUTE"] = str(entity_per_minute)
        if max_connections:
            base["MAPILLARY_MAX_CONNECTIONS"] = str(max_connections)
        saved = dict(os.environ)
        os.environ.update(base)
        try:
            env = stack.start(config, log=lambda *_: None)
            driver = subprocess.run(
                [sys.executable, "-m", "mapillary_assets.scaleout", "run", "--until", until],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            geopackage = root / "data" / "output" / "mapillary_images.gpkg"
            if on_bucket and driver.returncode == 0:
                bucket = ObjectStore(env["MAPILLARY_DATA_DIR"], s3_settings_from_env(env))
                geopackage = root / "published.gpkg"
                geopackage.write_bytes(bucket.get(DataLayout.geopackage_key))
        finally:
            stack.stop(config, log=lambda *_: None)
            os.environ.clear()
            os.environ.update(saved)
        if driver.returncode != 0:
            raise RuntimeError(f"scaled-out pipeline failed: {driver.stderr.strip()[-600:]}")
        entity_times = server.request_times("entity")
        cdn_times = server.request_times("cdn")
        rate_limited = server.stats().get("rate_limited", 0)
    (chunk_seconds,) = [
        float(seconds)
        for stage, seconds in STAGE_LINE.findall(driver.stdout)
        if stage not in NOT_CHUNK_STAGES
    ]
    images = pyogrio.read_info(geopackage, layer="images")["features"]
    subprocess.run(["rm", "-rf", str(root)], check=False)
    result = {
        "workers": workers,
        "images": images,
        "chunk_seconds": chunk_seconds,
        "entity_times": entity_times,
        "cdn_times": cdn_times,
        "rate_limited": rate_limited,
    }
    print(
        json.dumps(
            {
                "workers": workers,
                "until": until,
                "images": images,
                "chunk_seconds": chunk_seconds,
                "request_window_s": round(_request_window(result), 1),
                "load_average": os.getloadavg()[0],
            }
        ),
        flush=True,
    )
    return result


def _request_window(result: dict) -> float:
    """Seconds from the emulator's answer to the chunk stage's first request to its answer to the last
    (entity: metadata and URL lookups; cdn: thumbnails). Discovery asks the tiles family only."""
    times = result["entity_times"] + result["cdn_times"]
    return max(times) - min(times)


def _seconds(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"


def _sustained(times: list[float]) -> tuple[float, int]:
    """Requests per minute between the first and the last request, and the busiest 60-s window."""
    times = sorted(times)
    rate = (len(times) - 1) / (times[-1] - times[0]) * 60 if len(times) > 1 else 0.0
    return rate, busiest_window(times, 60.0)


def _latency_bound(world: World, rounds: int) -> list[Figure]:
    """(a): 1 vs 2 workers on the fetch runs alone at 300 ms per request, LATENCY_CONNECTIONS in flight per
    worker, timed by the request log (module docstring); then 2 workers under an entity budget that binds."""
    from mapillary_assets.pipeline.aoi import load_aoi

    images_in_area = len(world.image_ids_in_polygon(load_aoi(SMALL_AOI).geometry))
    chunk_size = math.ceil(images_in_area / LATENCY_CHUNKS)
    load_before = os.getloadavg()[0]

    def pipeline(workers: int, budget: int | None = None) -> dict:
        faults = Faults(
            latency_s=LATENCY_S, rate_limit_per_minute={"entity": budget} if budget else {}
        )
        return _pipeline(
            workers,
            world,
            faults,
            chunk_size,
            budget,
            max_connections=LATENCY_CONNECTIONS,
            until="thumbnails",
        )

    # Interleaved, the order alternating, so that a change in the machine's load falls on both sides.
    runs = [pipeline(workers) for n in range(rounds) for workers in ((1, 2), (2, 1))[n % 2]]
    one = [run for run in runs if run["workers"] == 1]
    two = [run for run in runs if run["workers"] == 2]
    rate_one = statistics.median(run["images"] / _request_window(run) for run in one)
    rate_two = statistics.median(run["images"] / _request_window(run) for run in two)
    # Entity requests per minute the 2 workers sent unbounded, on average over the stage; they come in
    # bursts (each fetch run's metadata batches first), so a budget of that average binds in every burst.
    unbounded = statistics.median(_sustained(run["entity_times"])[0] for run in two)
    budget = max(4, round(unbounded))
    limited = pipeline(2, budget)
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    stage = (
        f"metadata + thumbnails (fetch runs, blur off), {LATENCY_CHUNKS} chunks of {chunk_size}, "
        f"one run at a time per worker (Celery concurrency 1), {LATENCY_CONNECTIONS} requests in flight "
        f"per worker (MAPILLARY_MAX_CONNECTIONS)"
    )
    return [
        Figure(
            NAME,
            f"latency-bound stage images/s, 2 workers ({LATENCY_S * 1000:.0f} ms per request, "
            f"{LATENCY_CONNECTIONS} in flight per worker; median of {rounds})",
            rate_two,
            "images/s",
            rate_one,
            "1 worker, median",
            goal=">= 1.8x 1 worker",
            met=rate_two >= 1.8 * rate_one,
            notes=f"{two[0]['images']:,} images; {stage}; timed from the emulator's answer to the stage's "
            "first request to its answer to the last (inside: later run launches, requests, JPEG checks, "
            "writes; outside: stack and Celery worker start, discovery, chunking, each worker's first run "
            f"launch (1 of 1 worker's {LATENCY_CHUNKS} launches, 2 of 2 workers'), the last runs' teardown, "
            f"publish); windows s per round, 2 workers {_seconds(_windows(two))} vs "
            f"1 worker {_seconds(_windows(one))}; the driver's whole fetch stage (first submission to last "
            f"run's end) 2 workers {_seconds([r['chunk_seconds'] for r in two])} vs 1 worker "
            f"{_seconds([r['chunk_seconds'] for r in one])}; requests in flight on average over the window "
            f"(at most {LATENCY_CONNECTIONS} per worker) 2 workers {_in_flight(two)} vs 1 worker "
            f"{_in_flight(one)}; rounds interleaved; {load}",
        ),
        _budget_held(
            f"latency-bound: entity requests/min of 2 workers under a binding budget of {budget}/min",
            limited,
            budget,
            f"budget = the unbounded 2-worker average {unbounded:.1f}/min, sent in bursts; {stage}; "
            f"{limited['images'] / _request_window(limited):.1f} images/s over the request window (unbounded "
            f"{rate_two:.1f}); {load}",
        ),
    ]


def _budget_held(metric: str, limited: dict, budget: int, notes: str) -> Figure:
    """The entity requests/min a budgeted run sustained beside its budget: held when the average and the
    busiest 60-s window stay within it and the emulator refused nothing."""
    sustained, busiest = _sustained(limited["entity_times"])
    return Figure(
        NAME,
        metric,
        sustained,
        "req/min",
        float(budget),
        "the budget",
        reference=True,
        goal="<= budget, busiest 60-s window <= budget, zero 429s",
        met=sustained <= budget and busiest <= budget and limited["rate_limited"] == 0,
        notes=f"{len(limited['entity_times'])} entity requests; busiest 60-s window {busiest}; "
        f"{limited['rate_limited']} refused; {notes}",
    )


def _windows(runs: list[dict]) -> list[float]:
    return [_request_window(run) for run in runs]


def _in_flight(runs: list[dict]) -> str:
    """Requests in flight on average over each run's window (each answered request waited LATENCY_S):
    at most LATENCY_CONNECTIONS per worker; what falls short is time spent elsewhere (launches, CPU)."""
    means = [
        (len(run["entity_times"]) + len(run["cdn_times"])) * LATENCY_S / _request_window(run)
        for run in runs
    ]
    return "[" + ", ".join(f"{mean:.2f}" for mean in means) + "]"


def _object_store_vs_local(world: World, chunk_size: int, rounds: int) -> Figure:
    """(b): the chunk stage with the data dir in the stack's bucket vs on local disk, 2 workers."""
    load_before = os.getloadavg()[0]
    latency = Faults(latency_s=0.05)

    def pipeline(on_bucket: bool) -> dict:
        return _pipeline(2, world, latency, chunk_size, None, on_bucket=on_bucket)

    # Interleaved, the order alternating: whatever the first run of a round warms or pays falls on both sides.
    pairs = []
    for n in range(rounds):
        if n % 2:
            bucket = pipeline(True)
            pairs.append((pipeline(False), bucket))
        else:
            pairs.append((pipeline(False), pipeline(True)))
    if {local["images"] for local, _ in pairs} != {bucket["images"] for _, bucket in pairs}:
        raise RuntimeError("the bucket's GeoPackage holds other images than the local one's")
    rate_local = statistics.median(local["images"] / local["chunk_seconds"] for local, _ in pairs)
    rate_bucket = statistics.median(
        bucket["images"] / bucket["chunk_seconds"] for _, bucket in pairs
    )
    return Figure(
        NAME,
        f"chunk stage images/s, data dir in the object store (2 workers; median of {len(pairs)})",
        rate_bucket,
        "images/s",
        rate_local,
        "local data dir, median",
        notes=f"{pairs[0][0]['images']:,} images, chunks of {chunk_size}, 50 ms latency; metadata, "
        f"thumbnail downloads and blur to s3://mapillary/data on the stack's SeaweedFS vs a local folder; "
        f"chunk stage s per round, bucket {_seconds([b['chunk_seconds'] for _, b in pairs])} vs local "
        f"{_seconds([local['chunk_seconds'] for local, _ in pairs])} (rounds interleaved, the order alternating, "
        f"local first in round 1); SeaweedFS shares the 2 cores; load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end",
    )


def _fifty_ms(world: World, chunk_size: int, round_count: int, quick: bool) -> list[Figure]:
    """1 vs 2 workers on the whole chunk stage at 50 ms per request; 2 workers under an entity budget."""
    latency = Faults(latency_s=0.05)
    rounds = [
        (
            _pipeline(1, world, latency, chunk_size, None),
            _pipeline(2, world, latency, chunk_size, None),
        )
        for _ in range(round_count)
    ]
    images = rounds[0][1]["images"]
    one_s = [one["chunk_seconds"] for one, _ in rounds]
    two_s = [two["chunk_seconds"] for _, two in rounds]
    budget = 30 if quick else 40
    limited = _pipeline(
        2,
        world,
        Faults(latency_s=0.05, rate_limit_per_minute={"entity": budget}),
        chunk_size,
        budget,
    )

    rate_one = statistics.median(one["images"] / one["chunk_seconds"] for one, _ in rounds)
    rate_two = statistics.median(two["images"] / two["chunk_seconds"] for _, two in rounds)
    times = sorted(limited["entity_times"])
    return [
        Figure(
            NAME,
            f"chunk stage images/s, 2 Celery workers (median of {len(rounds)})",
            rate_two,
            "images/s",
            rate_one,
            "1 worker, median",
            goal="> 1 worker",
            met=rate_two > rate_one,
            notes=f"{images:,} images, chunks of {chunk_size}, a fetch run + a blur run (gpu queue, w1) per "
            f"chunk, 50 ms latency; chunk stage s per round, 2 workers {_seconds(two_s)} vs 1 worker "
            f"{_seconds(one_s)}; 2 shared cores",
        ),
        _budget_held(
            f"entity requests/min sustained by 2 workers, budget {budget}/min",
            limited,
            budget,
            f"metadata + thumbnail URLs over {times[-1] - times[0]:.0f} s; chunk stage "
            f"{limited['images'] / limited['chunk_seconds']:.1f} images/s",
        ),
    ]


def run(quick: bool, parts: str = "all", rounds: int | None = None) -> list[Figure]:
    """The parts' figures (`parts`: one of PARTS, or all of them)."""
    from mapillary_assets.scaleout.services import StackError, postgres_bin

    try:
        postgres_bin("initdb")
    except StackError as exc:
        raise RuntimeError(f"{exc}; run scripts/install_services.sh") from None
    round_count = rounds or (
        1 if quick else int(os.environ.get("MAPILLARY_BENCH_SCALEOUT_ROUNDS", REPEATS))
    )
    world = World(seed=11, scale=0.003 if quick else 0.006)
    chunk_size = 150 if quick else 200
    wanted = PARTS if parts == "all" else (parts,)
    figures: list[Figure] = []
    if "50ms" in wanted:
        figures += _fifty_ms(world, chunk_size, round_count, quick)
    if "a" in wanted:
        figures += _latency_bound(world, round_count)
    if "b" in wanted:
        figures.append(_object_store_vs_local(world, chunk_size, round_count))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_scaleout",
        description="One part of the scaleout benchmark (see the module docstring), its rows into --json.",
    )
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument(
        "--rounds", type=int, help="rounds of each comparison (default 3; 1 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="a smaller world, for a smoke run")
    parser.add_argument(
        "--json", type=Path, help="write the rows here, for `python -m benchmarks.run --merge`"
    )
    args = parser.parse_args(argv)
    figures = run(args.quick, args.part, args.rounds)
    for figure in figures:
        print(json.dumps({k: v for k, v in figure.__dict__.items() if k != "extra"}), flush=True)
    if args.json:
        parts = PARTS if args.part == "all" else (args.part,)
        replaces = [prefix for part in parts for prefix in PARTS[part]]
        args.json.write_text(
            json.dumps(
                {"figures": [f.__dict__ for f in figures], "replaces": {NAME: replaces}}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
