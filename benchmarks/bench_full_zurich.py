"""The user's whole job at full size: World(scale=1.0) over the shipped Zurich AOI (~1.2 M images),
every asset through Dagster as `mapillary-assets demo` runs it (`run_pipeline`, per-chunk runs in
concurrent worker processes), thumbnails at 256 px on disk.

    python -m benchmarks.run --only full_zurich          # scale 1.0, merged into RESULTS.md
    python -m benchmarks.bench_full_zurich --scale 0.05  # a quicker run, printed (and --json FILE)

The emulator is a separate process (`python -m mapillary_assets.emulator`), so its CPU and memory are
measured apart from the pipeline's. Per stage (asset), from the Dagster event log: wall time from its
first step start to its last step end over all runs, the summed step time, images/s; requests from
the emulator's counters; the overlap of blur and downloads where it happens (the seconds during which
a blur step and a download step of different chunks run at once, from the steps' start and end events);
peak memory as the summed PSS (shared pages counted once) of this process
and every run worker it forked, sampled each second, per job. Beside them: the notebook's figures
for the same 1.2 M images and the floor the API budget allows (tiles: one request per non-empty z14
tile plus the coverage tiles at 6,000/min; metadata: ceil(n/50) `?ids=` requests at 50,000/min).
The 1024 px cost (download + blur) is measured on a sample of ids after the run, beside 256 px of
the same ids.

Against an earlier version of the code (issue 23's before and after), run this benchmark in a worktree
of that commit first, then here with `--before THAT_RUN/measured.json --before-label COMMIT`: the
end-to-end images/s and the `?ids=` requests then stand beside that run's, measured on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
from pathlib import Path

from benchmarks.harness import Figure, Stopwatch
from benchmarks.measurement import (
    IDS_PER_REQUEST,
    Emulator,
    MemorySampler,
    TimedRunner,
    chunk_sizes,
    geopackage_rows,
    metadata_request_floor,
    ogrinfo_summary,
    quantiles,
    save_measured,
    scaled_data_root,
    stage_times,
    step_intervals,
)

TOKEN = "MLY|bench-full-zurich|not-a-secret"
SEED = 42
FULL_SCALE = 1.0
QUICK_SCALE = 0.005
THUMBNAIL_SIZE = 256
SAMPLE_1024 = 2000  # ids priced at 1024 px (and again at 256 px) after the run
RSS_GOAL_GB = 2.0
OVERLAP_GOAL = 0.5  # share of the blur step time spent beside another chunk's downloads
END_TO_END_GOAL = 1200.0  # images/s, 2 cores, the emulator on the same cores (issue 23)
METADATA_REQUESTS_GOAL = 1.02  # x ceil(images / 50), the thumbnail URL lookups counted apart
# what the request figures read of a run on the code before a change (`--before`)
BEFORE_KEYS = ("label", "images", "total_s", "requests", "load_average")
# The notebook on the same 1.2 M images (RTX 4080 for blur); seconds.
NOTEBOOK = {"discovery": (6 * 3600, 9 * 3600), "metadata": 2 * 3600 + 8 * 60, "blur": 26 * 60}
NOTEBOOK_BLUR_RATE = 794.0


def cross_chunk_overlap_s(
    first: list[tuple[str, float, float]], second: list[tuple[str, float, float]]
) -> float:
    """Seconds during which a step of `first` and a step of `second` run at once for different chunks
    (e.g. one chunk's blur while another chunk downloads); each step is (chunk, start, end)."""
    events = sorted(
        [
            (start, 1, side, chunk)
            for side, spans in enumerate((first, second))
            for chunk, start, _ in spans
        ]
        + [
            (end, -1, side, chunk)
            for side, spans in enumerate((first, second))
            for chunk, _, end in spans
        ]
    )
    running: tuple[dict[str, int], dict[str, int]] = ({}, {})
    overlap, previous = 0.0, None
    for time, change, side, chunk in events:
        one, other = running
        different_chunks = (
            one and other and not (len(one) == len(other) == 1 and one.keys() == other.keys())
        )
        if previous is not None and different_chunks:
            overlap += time - previous
        previous = time
        count = running[side].get(chunk, 0) + change
        if count:
            running[side][chunk] = count
        else:
            del running[side][chunk]
    return overlap


def price_1024(layout, emulator: Emulator, image_ids: list[str]) -> dict[str, float]:
    """Download + blur the same sample at 256 and 1024 px into a scratch layout: seconds per image each."""
    from mapillary_assets.api import ClientConfig, MapillaryClient, Secret
    from mapillary_assets.pipeline.blur import analysis_box, score_images
    from mapillary_assets.pipeline.download import download_thumbnails
    from mapillary_assets.storage import DataLayout

    settings = ClientConfig(
        token=Secret(TOKEN),
        graph_url=emulator.graph_url,
        tiles_url=emulator.tiles_url,
        rate_limit_store=layout.root / "price-1024" / "rate_limits.sqlite",
    )
    out = {}
    for size in (THUMBNAIL_SIZE, 1024):
        scratch = DataLayout(layout.root / "price-1024" / str(size))

        async def download(scratch=scratch, size=size):
            async with MapillaryClient(settings) as client:
                return await download_thumbnails(client, scratch, image_ids, size=size)

        with Stopwatch() as fetched:
            frame = asyncio.run(download())
        ok = frame[frame["status"] == "ok"]
        with Stopwatch() as scored:
            score_images(
                [scratch.root / path for path in ok["path"]], analysis_size=analysis_box(size)
            )
        out[f"download_{size}_s_per_image"] = fetched.seconds / max(len(ok), 1)
        out[f"blur_{size}_s_per_image"] = scored.seconds / max(len(ok), 1)
        out[f"bytes_{size}_per_image"] = float(ok["bytes"].mean()) if len(ok) else 0.0
    shutil.rmtree(layout.root / "price-1024", ignore_errors=True)
    return out


def api_floors(scale: float) -> dict[str, float]:
    """Requests the API budget needs at least, and the seconds that takes at the default budgets."""
    from mapillary_assets.defs.area import current_aoi, partition_zoom
    from mapillary_assets.emulator import World
    from mapillary_assets.pipeline.aoi import partition_tiles

    aoi = current_aoi()
    tiles = World(seed=SEED, scale=scale).nonempty_z14_tiles(aoi.geometry)
    coverage = len(partition_tiles(aoi, partition_zoom()))
    return {
        "z14_tiles": len(tiles),
        "coverage_tiles": coverage,
        "tiles_floor_s": (len(tiles) + coverage) / 6000 * 60,
    }


def measure(scale: float, data_root: Path, log=print) -> dict:
    """One full run from empty folders; returns every number the figures need."""
    if data_root.exists():
        shutil.rmtree(data_root)
    data_dir, home = data_root / "data", data_root / "dagster_home"
    from mapillary_assets.runners.instance import prepare_dagster_home

    prepare_dagster_home(home)
    emulator = Emulator(scale, SEED, TOKEN)
    log(
        f"emulator pid {emulator.process.pid} at {emulator.base_url} (scale {scale}); data {data_dir}"
    )
    os.environ.update(
        {
            "DAGSTER_HOME": str(home),
            "MAPILLARY_ACCESS_TOKEN": TOKEN,
            "MAPILLARY_GRAPH_URL": emulator.graph_url,
            "MAPILLARY_TILES_URL": emulator.tiles_url,
            "MAPILLARY_DATA_DIR": str(data_dir),
            "MAPILLARY_THUMBNAIL_SIZE": str(THUMBNAIL_SIZE),
        }
    )
    sampler = MemorySampler(emulator.process.pid)
    sampler.start()
    try:
        from mapillary_assets.definitions import build_definitions
        from mapillary_assets.runners.instance import configure_pools, open_instance
        from mapillary_assets.runners.local import LocalRunner
        from mapillary_assets.runners.pipeline import run_pipeline
        from mapillary_assets.storage import DataLayout

        with open_instance(home) as instance:
            configure_pools(instance)
            defs = build_definitions()
            runner = TimedRunner(LocalRunner(instance, defs, log=log), sampler, log)
            with Stopwatch() as total:
                summary = run_pipeline(instance, defs, log=log, runner=runner)
            sampler.label = "after"
            requests = emulator.stats()
            intervals = step_intervals(instance)
            runs = len(instance.get_runs())
        layout = DataLayout(data_dir)
        images = geopackage_rows(layout.geopackage_path)
        ogrinfo = ogrinfo_summary(layout.geopackage_path)
        gpkg_mb = layout.geopackage_path.stat().st_size / 1e6
        sizes = chunk_sizes(layout)
        event_log_mb = sum(p.stat().st_size for p in home.rglob("*.db")) / 1e6
        sample_ids = _sample_ids(layout, SAMPLE_1024)
        sampler.label = "price_1024"
        price = price_1024(layout, emulator, sample_ids)
    finally:
        sampler.stopped.set()
        emulator.close()
    return {
        "scale": scale,
        "images": images,
        "chunks": summary["chunks"],
        "runs": runs,
        "total_s": total.seconds,
        "job_s": runner.job_seconds,
        "stages": stage_times(intervals),
        "blur_beside_downloads_s": cross_chunk_overlap_s(
            intervals.get("blur", []), intervals.get("downloads", [])
        ),
        "requests": requests,
        "metadata_floor": metadata_request_floor(sizes),
        "peak_pss": sampler.peaks,
        "driver_peak_pss": sampler.driver_peaks,
        "emulator_peak_pss": sampler.emulator_peak,
        "gpkg_mb": gpkg_mb,
        "instance_db_mb": event_log_mb,
        "price_1024": price,
        "floors": api_floors(scale),
        "ogrinfo": ogrinfo,
        "load_average": quantiles(sampler.load_averages),
    }


def _sample_ids(layout, count: int) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(layout.chunk_assignment_path, columns=["image_id"])
    return table.column("image_id").to_pylist()[:: max(1, table.num_rows // count)][:count]


def figures(m: dict) -> list[Figure]:
    n, stages, requests = m["images"], m["stages"], m["requests"]
    scale_note = (
        f"World(scale={m['scale']}), {n:,} images, {m['chunks']} chunks, {m['runs']} Dagster runs"
    )
    load = m.get("load_average", {"median": float("nan"), "max": float("nan")})
    noise = f"{os.cpu_count()}-core machine, load average median {load['median']:.1f}, max {load['max']:.1f}"
    out = []

    def stage(
        name: str,
        notebook: float | None,
        notebook_name: str,
        requests_text: str,
        floor_s: float | None = None,
    ):
        s = stages.get(name, {"wall_s": float("nan"), "step_s": float("nan")})
        floor = f"; API floor {floor_s:,.0f} s" if floor_s is not None else ""
        out.append(
            Figure(
                "full_zurich",
                f"{name}: wall time",
                s["wall_s"],
                "s",
                baseline=notebook,
                baseline_name=notebook_name,
                reference=notebook is not None,
                notes=f"{n / max(s['wall_s'], 1e-9):,.0f} images/s; summed step time {s['step_s']:,.0f} s; "
                f"{requests_text}{floor}; {scale_note}",
                extra={**s, "floor_s": floor_s},
            )
        )

    floors = m["floors"]
    metadata_requests = math.ceil(n / IDS_PER_REQUEST)
    stage(
        "discovery",
        NOTEBOOK["discovery"][0],
        "notebook, 6-9 h",
        f"{requests['tile']:,} tile requests ({floors['z14_tiles']:,} non-empty z14 + {floors['coverage_tiles']} "
        "coverage tiles)",
        floors["tiles_floor_s"],
    )
    stage("chunking", None, "", "no requests")
    stage(
        "metadata",
        NOTEBOOK["metadata"],
        "notebook, 2 h 08 min",
        f"{requests['batch']:,} `?ids=` requests in all (metadata ~{metadata_requests:,}, the rest are the "
        "downloads' fresh-URL lookups)",
        metadata_requests / 50_000 * 60,
    )
    stage(
        "downloads",
        None,
        "",
        f"{requests['thumbnail']:,} thumbnail requests at {THUMBNAIL_SIZE} px",
    )
    stage(
        "blur",
        NOTEBOOK["blur"],
        f"notebook, RTX 4080 at {NOTEBOOK_BLUR_RATE:.0f} images/s",
        f"CPU ({os.cpu_count()} cores), {THUMBNAIL_SIZE} px thumbnails scored at their own "
        f"{THUMBNAIL_SIZE}x{THUMBNAIL_SIZE * 3 // 4} (the 1024 px cost: the sample row below)",
    )
    out.extend(request_figures(m))
    stage("staging", None, "", "DuckDB from the stage Parquet files")
    stage("geopackage", None, "", f"{m['gpkg_mb']:,.0f} MB written")
    steps_one_after_another = sum(s["step_s"] for s in stages.values())
    out.append(
        Figure(
            "full_zurich",
            "total wall time (first run start .. last run end)",
            m["total_s"],
            "s",
            baseline=steps_one_after_another,
            baseline_name="every stage's summed step time, one after another",
            notes=f"{n / m['total_s']:,.0f} images/s end to end; per job: "
            + ", ".join(f"{job} {s:,.0f} s" for job, s in m["job_s"].items())
            + f"; Dagster instance DBs {m['instance_db_mb']:,.0f} MB; {noise}",
        )
    )
    blur_step_s = stages.get("blur", {}).get("step_s", float("nan"))
    overlap = m["blur_beside_downloads_s"]
    out.append(
        Figure(
            "full_zurich",
            "blur beside downloads: seconds a chunk's blur step runs while another chunk's download step does",
            overlap,
            "s",
            baseline=blur_step_s,
            baseline_name="blur steps' summed time",
            goal=f">= {OVERLAP_GOAL:g} x blur step time",
            met=overlap >= OVERLAP_GOAL * blur_step_s,
            notes="from the step start/end events of every run; the stages overlap instead of adding up only "
            "when blur and downloads of different chunks run at once",
        )
    )
    peak = max((v for k, v in m["peak_pss"].items() if k != "price_1024"), default=0) / 1e9
    out.append(
        Figure(
            "full_zurich",
            "peak memory of the pipeline's processes (summed PSS)",
            peak,
            "GB",
            baseline=m["emulator_peak_pss"] / 1e9,
            baseline_name="emulator process, apart",
            goal=f"< {RSS_GOAL_GB:g} GB",
            met=peak < RSS_GOAL_GB,
            notes="per job (of it the driver process alone): "
            + ", ".join(
                f"{job} {v / 1e9:.2f} GB ({m.get('driver_peak_pss', {}).get(job, 0) / 1e9:.2f})"
                for job, v in m["peak_pss"].items()
                if job not in ("start", "after")
            ),
        )
    )
    ogr = m.get("ogrinfo", {"available": False})
    if ogr["available"]:
        out.append(
            Figure(
                "full_zurich",
                "GeoPackage read by GDAL's ogrinfo: features in `images`",
                ogr["features"],
                "features",
                baseline=n,
                baseline_name="rows written (SQLite count)",
                goal="= rows, with R-tree index",
                met=ogr["rc"] == 0 and ogr["features"] == n and ogr["rtree"],
                notes=f"ogrinfo -so {ogr['summary_s']:.1f} s; a 0.01 x 0.01 degree window read through the "
                f"R-tree {ogr['window_read_s']:.1f} s; R-tree {'present' if ogr['rtree'] else 'MISSING'}"
                + (f"; stderr: {ogr['stderr']}" if ogr["stderr"] else ""),
            )
        )
    price = m["price_1024"]
    per_image_1024 = price["download_1024_s_per_image"] + price["blur_1024_s_per_image"]
    per_image_256 = (
        price[f"download_{THUMBNAIL_SIZE}_s_per_image"]
        + price[f"blur_{THUMBNAIL_SIZE}_s_per_image"]
    )
    out.append(
        Figure(
            "full_zurich",
            f"1024 px download + blur, per image (sample of {SAMPLE_1024:,})",
            per_image_1024 * 1000,
            "ms",
            baseline=per_image_256 * 1000,
            baseline_name=f"{THUMBNAIL_SIZE} px, same ids",
            notes=f"download {price['download_1024_s_per_image'] * 1000:.2f} vs "
            f"{price[f'download_{THUMBNAIL_SIZE}_s_per_image'] * 1000:.2f} ms, blur "
            f"{price['blur_1024_s_per_image'] * 1000:.2f} vs "
            f"{price[f'blur_{THUMBNAIL_SIZE}_s_per_image'] * 1000:.2f} ms; "
            f"{price['bytes_1024_per_image'] / 1e3:,.0f} vs "
            f"{price[f'bytes_{THUMBNAIL_SIZE}_per_image'] / 1e3:,.0f} KB; "
            f"at 1024 px the {n:,} images would need ~{per_image_1024 * n / 3600:.1f} h of one process",
        )
    )
    return out


def request_figures(m: dict) -> list[Figure]:
    """End-to-end images/s and the `?ids=` requests, beside the run of the code before the change when
    `m["before"]` holds one (`--before`)."""
    n, requests, before = m["images"], m["requests"], m.get("before")
    floor = math.ceil(n / IDS_PER_REQUEST)
    rate = n / m["total_s"]
    per_image = f"{requests['requests'] / n:.3f} requests per image in all"
    before_rate = before["images"] / before["total_s"] if before else None
    before_name = f"the code before the change ({before['label']}), same machine, same session"
    out = [
        Figure(
            "full_zurich",
            "end to end: images/s (first run start .. last run end)",
            rate,
            "images/s",
            baseline=before_rate,
            baseline_name=before_name if before else "",
            goal=f">= {END_TO_END_GOAL:,.0f} images/s",
            met=rate >= END_TO_END_GOAL,
            notes=f"{n:,} images in {m['total_s']:,.0f} s; {per_image}"
            + (
                f"; before: {before['images']:,} images in {before['total_s']:,.0f} s, "
                f"{before['requests']['requests'] / before['images']:.3f} requests per image, load "
                f"average median {before['load_average']['median']:.1f}"
                if before
                else ""
            ),
        )
    ]
    lookups = requests.get("batch:url_lookup")
    if lookups is None:  # an emulator older than the counter (a before run)
        return out
    metadata = requests["batch"] - lookups
    out.append(
        Figure(
            "full_zurich",
            "Graph `?ids=` metadata requests (thumbnail URL lookups counted apart)",
            metadata,
            "requests",
            baseline=floor,
            baseline_name="ceil(images / 50)",
            goal=f"<= {METADATA_REQUESTS_GOAL}x, plus the re-resolutions",
            met=metadata <= METADATA_REQUESTS_GOAL * floor,
            notes=f"the chunks' floor (sum of ceil(chunk / 50)) {m['metadata_floor']:,}; re-resolutions "
            f"(thumbnail URL lookups by the downloads: URLs missing, expiring before use or refused as "
            f"expired) {lookups:,}; `?ids=` requests in all {requests['batch']:,}"
            + (f" (before: {before['requests']['batch']:,})" if before else ""),
        )
    )
    return out


def run(
    quick: bool,
    scale: float | None = None,
    data_root: Path | None = None,
    before: dict | None = None,
) -> list[Figure]:
    """`before`: the `measured.json` of this benchmark run on the code before a change, with its `label`."""
    scale = scale if scale is not None else (QUICK_SCALE if quick else FULL_SCALE)
    data_root = scaled_data_root(scale, data_root, "/tmp/mapillary-full-zurich")
    measured = measure(scale, data_root)
    if before is not None:
        kept = (*BEFORE_KEYS, "job_s", "stages")
        measured["before"] = {key: before[key] for key in kept if key in before}
    save_measured(data_root, measured)
    return figures(measured)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", type=float, default=FULL_SCALE, help="World scale (1.0 ~= 1.2 M images)"
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="empty folder on local disk (default under /tmp)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="measured.json of this benchmark on the code before a change (same machine, same session)",
    )
    parser.add_argument(
        "--before-label", default="earlier commit", help="what --before ran, e.g. its commit"
    )
    args = parser.parse_args(argv)
    before = None
    if args.before:
        try:
            before = {**json.loads(args.before.read_text()), "label": args.before_label}
        except (OSError, ValueError) as exc:
            parser.error(f"--before {args.before}: not a readable measured.json ({exc})")
        missing = [key for key in BEFORE_KEYS if key not in before]
        if missing:
            parser.error(
                f"--before {args.before}: no {', '.join(missing)} (a measured.json of this benchmark?)"
            )
    results = run(quick=False, scale=args.scale, data_root=args.data_root, before=before)
    for figure in results:
        print(json.dumps({k: v for k, v in figure.__dict__.items() if k != "extra"}))
    if args.json:
        args.json.write_text(
            json.dumps({"figures": [f.__dict__ for f in results]}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
