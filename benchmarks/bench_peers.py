"""Side by side with the tools users would pick instead, on the same emulator world and AOI.

Peers: Meta's Mapillary SDK (PyPI `mapillary` 1.0.16) and ZenSVI's `MLYDownloader` (PyPI `zensvi`
1.7.0), installed in their own virtualenv by `benchmarks/peers/setup.sh` (benchmarks/.peers-venv).
Each peer runs as a subprocess there (`benchmarks/peers/driver.py`), its hard-coded real hosts
redirected to an in-process emulator; ours runs the pipeline's own stage code in this process.

World(seed=42, scale 0.02; quick 0.01). AOI: a 4 x 3 block of z14 tiles on Zurich's lake shore
(z14 x 8579-8582, y 5740-5742), half of them empty (lake, sparse coverage), 881 images (quick 441).
The emulator answers after 50 ms, like a remote API, and enforces the documented per-minute budgets
(entity 50,000/min, search 10,000/min), so a tool that bursts past them gets code-4 answers. Every
run gets a fresh emulator (cold tile renders); the world's tiles are generated beforehand.

Per tool, per step:
* discovery: ids found (against the world's ground truth, World.images_in_polygon), tile requests,
  wall time. Ours: `discover_partition` over the AOI's z12 partitions (one coverage tile each, then
  only the z14 tiles coverage shows), cold tile cache. SDK: `images_in_shape`. ZenSVI: `download_svi`'s
  id stage (`images_in_geojson` of its vendored SDK copy, threaded).
* metadata for the ground-truth ids: requests, wall time, rows, rate-limit errors. Ours:
  `fetch_metadata` (`?ids=` batches of 50 under the shared token bucket). SDK: `image_from_key` per id.
  ZenSVI: `download_svi`'s URL stage (one entity request per id, thread pool; it asks for the thumbnail
  URL with the fields). Peers ask for the fields of ours their own field lists accept.
* thumbnails (ZenSVI only; the SDK has no download): 1024 px files, requests, wall time. Ours:
  `download_thumbnails`, which resolves fresh URLs itself (`?ids=` batches) before the CDN requests.
Ours is the median of 3 repeats; each peer runs once (the SDK's metadata step alone takes ~100 s).
The machine's 2 cores are shared, so figures move between runs: in the quick runs made while building
this, ZenSVI's discovery took 1.4-2.4 s, its 441 downloads 5.1-13.6 s and ours 1.1-3.6 s, the SDK's
metadata 51.5-54.5 s. Request counts and ids found do not move; compare ratios from one run only.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import mercantile
from shapely.geometry import box, mapping

from benchmarks.harness import Figure, Stopwatch
from mapillary_assets.api import ClientConfig, MapillaryClient, Secret
from mapillary_assets.api.entity_decoders import DEFAULT_IMAGE_FIELDS
from mapillary_assets.emulator import EmulatorServer, Faults, World, thumbnails
from mapillary_assets.pipeline.aoi import load_aoi, partition_tiles
from mapillary_assets.pipeline.discovery.tiles import discover_partition
from mapillary_assets.pipeline.download import download_thumbnails
from mapillary_assets.pipeline.metadata import fetch_metadata
from mapillary_assets.storage import DataLayout

NAME = "peers"
HERE = Path(__file__).parent
# PEERS_VENV: another venv made by benchmarks/peers/setup.sh (relative paths from the repository root)
PEER_PYTHON = (
    HERE.parent / os.environ.get("PEERS_VENV", "benchmarks/.peers-venv") / "bin" / "python"
)
DRIVER = HERE / "peers" / "driver.py"
LATENCY_S = 0.05
DOCUMENTED_BUDGETS = {"entity": 50_000, "search": 10_000}
AOI_TILES = (range(8579, 8583), range(5740, 5743))  # z14 x, y: Zurich lake shore
THUMBNAIL_SIZE = 1024
REPEATS = 3
PEERS = {"sdk": "Meta mapillary SDK 1.0.16", "zensvi": "ZenSVI 1.7.0 MLYDownloader"}


def aoi_polygon():
    """The AOI block, shrunk by 1e-6 deg so no tool counts a neighbouring tile as overlapping."""
    xs, ys = AOI_TILES
    north_west, south_east = (
        mercantile.bounds(xs[0], ys[0], 14),
        mercantile.bounds(xs[-1], ys[-1], 14),
    )
    eps = 1e-6
    return box(
        north_west.west + eps, south_east.south + eps, south_east.east - eps, north_west.north - eps
    )


def _faults() -> Faults:
    return Faults(latency_s=LATENCY_S, rate_limit_per_minute=dict(DOCUMENTED_BUDGETS))


def _client(server: EmulatorServer, store: Path) -> MapillaryClient:
    return MapillaryClient(
        ClientConfig(
            token=Secret(server.token),
            graph_url=server.graph_url,
            tiles_url=server.tiles_url,
            rate_limit_store=store,
        )
    )


async def _our_discovery(server, aoi, root: Path) -> list[str]:
    layout = DataLayout(root)
    async with _client(server, root / "rate.sqlite") as client:
        frames = [
            (await discover_partition(client, aoi, tile, layout))[0]
            for tile in partition_tiles(aoi, 12)
        ]
    return [i for frame in frames for i in frame["image_id"]]


async def _our_metadata(server, ids: list[str], root: Path) -> dict:
    async with _client(server, root / "rate.sqlite") as client:
        result = await fetch_metadata(client, ids)
    return {"rows": len(result.rows), "failures": len(result.failures)}


async def _our_download(server, ids: list[str], root: Path) -> dict:
    async with _client(server, root / "rate.sqlite") as client:
        frame = await download_thumbnails(client, DataLayout(root), ids, size=THUMBNAIL_SIZE)
    return {"files": int((frame["status"] == "ok").sum()), "bytes": int(frame["bytes"].sum())}


def _timed_step(world: World, action) -> dict:
    with EmulatorServer(world, faults=_faults()) as server:
        with Stopwatch() as watch:
            outcome = asyncio.run(action(server))
        stats = server.stats()
    return {
        "seconds": watch.seconds,
        "outcome": outcome,
        "requests": {f: stats[f"family:{f}"] for f in ("tiles", "entity", "search", "cdn")},
        "rate_limited": stats["rate_limited"],
    }


def _ours(world: World, aoi, truth: list[str], root: Path) -> dict:
    """Our three steps, REPEATS times: the last repeat's counts with the median seconds and the spread."""
    runs = []
    for repeat in range(REPEATS):
        base = root / f"ours-{repeat}"
        runs.append(
            {
                "discovery": _timed_step(
                    world, lambda s, base=base: _our_discovery(s, aoi, base / "discovery")
                ),
                "metadata": _timed_step(
                    world, lambda s, base=base: _our_metadata(s, truth, base / "metadata")
                ),
                "download": _timed_step(
                    world, lambda s, base=base: _our_download(s, truth, base / "download")
                ),
            }
        )
    median = {step: statistics.median(r[step]["seconds"] for r in runs) for step in runs[0]}
    last = runs[-1]
    for step in last:
        last[step]["seconds"] = median[step]
        last[step]["spread"] = [round(r[step]["seconds"], 3) for r in runs]
    return last


def _peer(tool: str, world: World, aoi_path: Path, truth: list[str], root: Path) -> dict:
    """The driver's phases for `tool`, or {"unavailable": reason}."""
    if not PEER_PYTHON.exists():
        return {"unavailable": "peer venv missing: run benchmarks/peers/setup.sh"}
    with EmulatorServer(world, faults=_faults()) as server:
        spec = {
            "graph_url": server.graph_url,
            "tiles_url": server.tiles_url,
            "cdn_prefix": server.base_url + "/cdn/",
            "token": server.token,
            "aoi": str(aoi_path),
            "ids": truth,
            "fields": list(DEFAULT_IMAGE_FIELDS),
            "thumbnail_size": THUMBNAIL_SIZE,
        }
        spec_path, result_path, log_path = (
            root / f"{tool}.spec.json",
            root / f"{tool}.json",
            root / f"{tool}.log",
        )
        spec_path.write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAPILLARY_", "PYTHON"))}
        with log_path.open(
            "w"
        ) as log:  # the peers print per-request lines (the SDK's include the token)
            done = subprocess.run(
                [str(PEER_PYTHON), str(DRIVER), tool, str(spec_path), str(result_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=root,
                timeout=1800,
            )
        stats = server.stats()
    if done.returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-300:].strip().splitlines()
        return {
            "unavailable": f"driver exited {done.returncode}: {tail[-1] if tail else 'no output'}"
        }
    result = json.loads(result_path.read_text())["phases"]
    result["emulator"] = stats
    return result


def _completeness(found: list[str], truth: set[str]) -> str:
    found_set = set(found)
    return (
        f"{len(found_set & truth):,}/{len(truth):,} ids, {len(found_set - truth)} not in the AOI, "
        f"{len(found) - len(found_set)} duplicates"
    )


def _errors(phase: dict) -> str:
    listed = dict(phase.get("errors") or {})
    if phase.get("error"):
        listed[phase["error"]] = 1
    return "; ".join(f"{n} x {text}" for text, n in listed.items()) or "no errors"


def _requests(phase: dict, *families: str) -> int:
    return sum(phase.get("requests", {}).get(f, 0) for f in families)


def _peer_figures(tool: str, peer: dict, ours: dict, truth: set[str], context: str) -> list[Figure]:
    label = PEERS[tool]
    if "unavailable" in peer:
        return [
            Figure(
                NAME,
                f"discovery wall time vs {label}",
                ours["discovery"]["seconds"],
                "s",
                notes=f"peer not measured: {peer['unavailable']}",
            )
        ]
    figures = []
    discovery = peer.get("discovery", {})
    our_ids = ours["discovery"]["outcome"]
    our_found, peer_found = len(set(our_ids) & truth), len(set(discovery.get("ids", [])) & truth)
    discovery_note = (
        f"ours: {_completeness(our_ids, truth)}; {label}: {_completeness(discovery.get('ids', []), truth)}"
        f" ({_errors(discovery)})"
    )
    if tool == "sdk" and "discovery_probe_images_in_geojson" in peer:
        discovery_note += (
            f"; the SDK's images_in_geojson on the AOI polygon: "
            f"{_errors(peer['discovery_probe_images_in_geojson'])}, so images_in_shape is used"
        )
    our_tiles, peer_tiles = ours["discovery"]["requests"]["tiles"], _requests(discovery, "tiles")
    figures += [
        Figure(
            NAME,
            f"discovery wall time vs {label}",
            ours["discovery"]["seconds"],
            "s",
            baseline=discovery.get("seconds"),
            baseline_name=label,
            goal="faster at equal completeness",
            met=ours["discovery"]["seconds"] < discovery.get("seconds", 0)
            and our_found >= peer_found,
            notes=f"{context}; ours {ours['discovery']['spread']} s over {REPEATS} repeats",
        ),
        Figure(
            NAME,
            f"discovery tile requests vs {label}",
            our_tiles,
            "requests",
            baseline=peer_tiles,
            baseline_name=label,
            goal="fewer",
            met=our_tiles < peer_tiles,
            notes=f"{discovery_note}; ours = one coverage tile per z12 partition + the z14 tiles coverage shows "
            "to hold images; the peers fetch every z14 tile of the AOI's bounding box, empty or not",
        ),
        Figure(
            NAME,
            f"discovery ids found vs {label}",
            our_found,
            "ids",
            baseline=peer_found,
            baseline_name=label,
            goal=f"= ground truth {len(truth):,}",
            met=our_found == len(truth) and len(set(our_ids)) == len(our_ids),
            notes="ground truth: World.images_in_polygon(AOI)",
        ),
    ]
    metadata = peer.get("metadata", {})
    dropped = metadata.get("fields_dropped") or []
    our_meta, peer_rows = ours["metadata"], metadata.get("rows", 0)
    meta_note = (
        f"{len(truth):,} ids; {label}: {peer_rows:,} rows, {_errors(metadata)}, "
        f"{metadata.get('statuses', {})}; fields of ours its own list refuses: "
        f"{', '.join(dropped) or 'none'}"
    )
    if tool == "sdk":
        meta_note += "; image_from_key sends a validity lookup (all fields) before each fetch: 2 requests per id"
    else:
        meta_note += f"; its lookups also carry thumb_{THUMBNAIL_SIZE}_url, which ours leaves to the download step"
    figures += [
        Figure(
            NAME,
            f"metadata wall time vs {label}",
            our_meta["seconds"],
            "s",
            baseline=metadata.get("seconds"),
            baseline_name=label,
            goal="faster at equal rows",
            met=our_meta["seconds"] < metadata.get("seconds", 0)
            and our_meta["outcome"]["rows"] >= peer_rows,
            notes=f"ours {our_meta['outcome']['rows']:,} rows, {our_meta['outcome']['failures']} failed, "
            f"{our_meta['spread']} s; {meta_note}",
        ),
        Figure(
            NAME,
            f"metadata requests vs {label}",
            our_meta["requests"]["entity"],
            "requests",
            baseline=_requests(metadata, "entity"),
            baseline_name=label,
            goal="fewer",
            met=our_meta["requests"]["entity"] < _requests(metadata, "entity"),
            notes=f"ours: ?ids= batches of 50; rate-limit errors at the documented budget "
            f"({DOCUMENTED_BUDGETS['entity']:,}/min): ours {our_meta['rate_limited']}, "
            f"{label} {sum(v for k, v in metadata.get('statuses', {}).items() if k.endswith(('429', '403')))}",
        ),
    ]
    if tool == "zensvi":
        download = peer.get("download", {})
        ours_download = ours["download"]
        our_requests = ours_download["requests"]["entity"] + ours_download["requests"]["cdn"]
        peer_meta, peer_download = (
            _requests(metadata, "entity"),
            _requests(download, "cdn", "entity"),
        )
        figures += [
            Figure(
                NAME,
                f"thumbnail download wall time vs {label}",
                ours_download["seconds"],
                "s",
                baseline=download.get("seconds"),
                baseline_name=label,
                goal="faster at equal files",
                met=ours_download["seconds"] < download.get("seconds", 0)
                and ours_download["outcome"]["files"] >= download.get("files", 0),
                notes=f"{THUMBNAIL_SIZE} px; ours {ours_download['outcome']['files']:,} files (verified JPEGs, "
                f"atomic writes), {ours_download['spread']} s; {label}: {download.get('files', 0):,} files, "
                f"{download.get('jpeg_files', 0):,} start as JPEG (named .png), {_errors(download)}",
            ),
            Figure(
                NAME,
                f"thumbnail download requests vs {label}",
                our_requests,
                "requests",
                baseline=peer_download,
                baseline_name=label,
                goal="fewer",
                met=our_requests < peer_download,
                notes=("" if our_requests < peer_download else "the peer wins this row: ")
                + f"its thumbnail URLs came with its metadata step, ours resolves "
                f"fresh (signed, expiring) URLs at download time: {ours_download['requests']['entity']} "
                f"?ids= lookups + {ours_download['requests']['cdn']} CDN requests; see the next row",
            ),
            Figure(
                NAME,
                f"metadata + thumbnail requests vs {label}",
                our_meta["requests"]["entity"] + our_requests,
                "requests",
                baseline=peer_meta + peer_download,
                baseline_name=label,
                goal="fewer",
                met=our_meta["requests"]["entity"] + our_requests < peer_meta + peer_download,
                notes=f"ours {our_meta['requests']['entity']} + {our_requests}; {label} {peer_meta} + {peer_download}",
            ),
        ]
    return figures


def run(quick: bool) -> list[Figure]:
    world = World(seed=42, scale=0.01 if quick else 0.02)
    polygon = aoi_polygon()
    truth = sorted(
        record.id for record in world.images_in_polygon(polygon)
    )  # also generates the tiles
    for image_id in truth:  # the emulator's JPEG cache, warm for every tool alike
        thumbnails.thumbnail_bytes(image_id, THUMBNAIL_SIZE, world.is_blurred(image_id))
    xs, ys = AOI_TILES
    nonempty = len(world.nonempty_z14_tiles(polygon))
    context = (
        f"World(seed=42, scale={world.scale}), AOI {len(xs)} x {len(ys)} z14 tiles on Zurich's lake shore "
        f"({nonempty} non-empty), {len(truth):,} images; {LATENCY_S * 1000:.0f} ms per request"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        aoi_path = root / "aoi.geojson"
        aoi_path.write_text(
            json.dumps(
                {
                    "type": "FeatureCollection",
                    "features": [
                        {"type": "Feature", "properties": {}, "geometry": mapping(polygon)}
                    ],
                }
            )
        )
        aoi = load_aoi(aoi_path)
        ours = _ours(world, aoi, truth, root)
        figures = []
        for tool in PEERS:
            peer_root = root / tool
            peer_root.mkdir()
            figures += _peer_figures(
                tool, _peer(tool, world, aoi_path, truth, peer_root), ours, set(truth), context
            )
    return figures


def markdown_section(figures: list[Figure]) -> list[str]:
    """RESULTS.md's peer table: per step and metric, ours beside each peer (same run), ratio ours / peer."""
    rows: dict[str, dict] = {}
    for figure in figures:
        what, _, peer = figure.metric.partition(" vs ")
        row = rows.setdefault(what, {"ours": figure.value, "unit": figure.unit})
        row[peer] = figure
    labels = list(PEERS.values())
    header = (
        "| step, metric | ours | " + " | ".join(f"{label} | ours / peer" for label in labels) + " |"
    )
    lines = [
        "",
        "## Peers: the tools users would pick instead",
        "",
        "`python -m benchmarks.run --only peers` (after `bash benchmarks/peers/setup.sh`); the details of each "
        "figure, ground truth and peer errors are in the `peers` rows above. A ratio below 1 is ours ahead on "
        "time and requests; `(peer wins)` marks a row where it is not.",
        "",
        header,
        "|---|---|" + "---|---|" * len(labels),
    ]
    for what, row in rows.items():
        cells = []
        for label in labels:
            figure = row.get(label)
            if figure is None or figure.baseline is None:
                cells += ["-" if figure is None else "not measured", "-"]
                continue
            lost = figure.met is False
            cells += [
                _cell(figure.baseline, figure.unit),
                (f"{figure.ratio:.3f}" if figure.ratio is not None else "-")
                + (" (peer wins)" if lost else ""),
            ]
        lines.append(f"| {what} | {_cell(row['ours'], row['unit'])} | " + " | ".join(cells) + " |")
    return lines


def _cell(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if abs(value) >= 100 else f"{value:,.3g} {unit}"
