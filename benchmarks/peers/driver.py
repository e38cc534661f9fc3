"""Runs one peer tool against the emulator, inside benchmarks/.peers-venv (see setup.sh).

    .peers-venv/bin/python benchmarks/peers/driver.py TOOL SPEC.json RESULT.json

TOOL is `sdk` (Meta's `mapillary` package) or `zensvi` (ZenSVI's MLYDownloader). SPEC holds the
emulator's graph/tiles URLs, the token, the AOI GeoJSON path, the ids to look up and the fields.

The peers hard-code https://graph.mapillary.com and https://tiles.mapillary.com inside f-strings (no
constant to patch), so the driver rewrites those hosts where every request passes: requests'
HTTPAdapter.send. The peer's own code builds each URL, chooses the auth method (its check is on the
real host name) and parses each answer. The SDK's live token check (a request to a fixed real image
id) is patched out. Each request is counted by family and status; each phase is timed.
This file imports only the peers and the standard library: it never imports mapillary_assets.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import requests
import requests.adapters

REAL_GRAPH = "https://graph.mapillary.com"
REAL_TILES = "https://tiles.mapillary.com"


class Traffic:
    """Requests by family ("tiles", "entity", "cdn") and HTTP status, across the peer's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.statuses: collections.Counter = collections.Counter()

    def record(self, family: str, status: int) -> None:
        with self.lock:
            self.counts[family] += 1
            self.statuses[f"{family}:{status}"] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": dict(self.counts), "statuses": dict(self.statuses)}


def install_redirect(graph_url: str, tiles_url: str, cdn_prefix: str, traffic: Traffic) -> None:
    original_send = requests.adapters.HTTPAdapter.send

    def send(self, request, **kwargs):
        url = request.url
        if url.startswith(REAL_GRAPH):
            family, request.url = "entity", graph_url + url[len(REAL_GRAPH) :]
        elif url.startswith(REAL_TILES):
            family, request.url = "tiles", tiles_url + url[len(REAL_TILES) :]
        elif url.startswith(cdn_prefix):
            # The real CDN is https; ZenSVI passes a random entry of its bundled proxies.csv, whose "http"
            # entries apply only to http:// URLs, i.e. to the emulator's and never to the real CDN's.
            family, kwargs["proxies"] = "cdn", {}
        else:
            raise RuntimeError(f"peer requested an unexpected host: {url.split('?')[0]}")
        response = original_send(self, request, **kwargs)
        traffic.record(family, response.status_code)
        return response

    requests.adapters.HTTPAdapter.send = send


def _error_site(exc: BaseException) -> str:
    """Exception type and the file:line (inside site-packages) that raised it."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    if frame is None:
        return type(exc).__name__
    parts = Path(frame.filename).parts
    inside = parts[parts.index("site-packages") + 1 :] if "site-packages" in parts else parts[-1:]
    return f"{type(exc).__name__} at {'/'.join(inside)}:{frame.lineno}"


def _error(exc: BaseException) -> str:
    return f"{_error_site(exc)}: {' '.join(str(exc).split())[:160]}"


class Phases:
    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        self.results: dict[str, dict] = {}

    def run(self, name: str, action):
        before = self.traffic.snapshot()
        started = time.perf_counter()
        outcome: dict = {}
        try:
            outcome = action() or {}
        except Exception as exc:  # the peer's failure is a result, reported in its row
            outcome = {"error": _error(exc)}
        seconds = time.perf_counter() - started
        after = self.traffic.snapshot()
        self.results[name] = {
            "seconds": seconds,
            "requests": _diff(after["requests"], before["requests"]),
            "statuses": _diff(after["statuses"], before["statuses"]),
            **outcome,
        }


def _diff(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _per_id(lookup, ids: list[str]) -> dict:
    """Looks every id up in turn; errors grouped by type and raising line, one example message each."""
    rows, errors, examples = 0, collections.Counter(), {}
    for image_id in ids:
        try:
            lookup(image_id)
            rows += 1
        except Exception as exc:
            site = _error_site(exc)
            errors[site] += 1
            examples.setdefault(site, _error(exc))
    return {"rows": rows, "errors": {examples[k]: n for k, n in errors.items()}}


def run_sdk(spec: dict, phases: Phases) -> None:
    import mapillary.interface as mly
    from mapillary.config.api.entities import Entities
    from mapillary.models.client import Client

    Client._Client__check_token_validity = staticmethod(lambda token: None)
    mly.set_access_token(spec["token"])
    geojson = json.loads(Path(spec["aoi"]).read_text())
    found: list[str] = []

    def discover() -> dict:
        features = mly.images_in_shape(geojson).to_dict()["features"]
        found.extend(str(f["properties"]["id"]) for f in features)
        return {"ids": found}

    # images_in_geojson is the documented call for a GeoJSON, but its GeoJSON model reads every geometry
    # as a point; the probe records what it does with a polygon, images_in_shape does the timed run.
    phases.run(
        "discovery_probe_images_in_geojson",
        lambda: {"features": len(mly.images_in_geojson(geojson).to_dict()["features"])},
    )
    phases.run("discovery", discover)
    # The SDK refuses fields missing from its own list (is_pano among them): the probe records that,
    # the timed run asks for the fields of ours that the SDK accepts.
    fields, dropped = _accepted_fields(spec["fields"], Entities.get_image_fields())
    for field in dropped:
        phases.run(
            f"metadata_probe_{field}",
            lambda field=field: _per_id(
                lambda i: mly.image_from_key(i, fields=[field]), spec["ids"][:1]
            ),
        )
    phases.run(
        "metadata",
        lambda: {
            **_per_id(lambda i: mly.image_from_key(i, fields=list(fields)), spec["ids"]),
            "fields_dropped": dropped,
        },
    )


def _accepted_fields(wanted: list[str], accepted: list[str]) -> tuple[list[str], list[str]]:
    return [f for f in wanted if f in accepted], [f for f in wanted if f not in accepted]


def run_zensvi(spec: dict, phases: Phases) -> None:
    from zensvi.download import MLYDownloader
    from zensvi.download.mapillary.config.api.entities import Entities
    from zensvi.download.mapillary.models.client import Client

    Client._Client__check_token_validity = staticmethod(lambda token: None)
    downloader = MLYDownloader(mly_api_key=spec["token"], verbosity=0)
    out = Path(
        tempfile.mkdtemp(prefix="zensvi-", dir=Path.cwd())
    )  # the benchmark runs us in its temp dir
    # download_svi runs discovery, URL lookup (metadata) and download one after another; each stage is
    # one method, timed separately by wrapping it on the instance.
    for method, phase in (
        ("_get_pids", "discovery"),
        ("_get_urls_mly", "metadata"),
        ("_download_images_mly", "download"),
    ):
        original = getattr(downloader, method)

        def timed(*args, _original=original, _phase=phase, **kwargs):
            phases.run(_phase, lambda: _original(*args, **kwargs))

        setattr(downloader, method, timed)
    # Its own field list lacks creator and is_pano; each lookup adds the thumbnail URL field itself.
    fields, dropped = _accepted_fields(
        [f for f in spec["fields"] if f != "id"], Entities.get_image_fields()
    )
    phases.run(
        "download_svi",
        lambda: downloader.download_svi(
            str(out),
            input_shp_file=spec["aoi"],
            resolution=spec["thumbnail_size"],
            additional_fields=fields,
        ),
    )
    phases.results.setdefault("metadata", {})["fields_dropped"] = dropped
    pids = out / "mly_pids.csv"
    urls = out / "pids_urls.csv"
    if pids.exists():
        phases.results.setdefault("discovery", {})["ids"] = _csv_ids(pids)
    if urls.exists():
        phases.results.setdefault("metadata", {})["rows"] = len(_csv_ids(urls))
    images = sorted((out / "mly_svi").rglob("*.png"))
    phases.results.setdefault("download", {}).update(
        files=len(images),
        bytes=sum(p.stat().st_size for p in images),
        jpeg_files=sum(p.read_bytes()[:2] == b"\xff\xd8" for p in images),
    )


def _csv_ids(path: Path) -> list[str]:
    import csv

    with path.open(newline="") as handle:
        return [row["id"] for row in csv.DictReader(handle)]


def main(argv: list[str]) -> int:
    tool, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    traffic = Traffic()
    install_redirect(spec["graph_url"], spec["tiles_url"], spec["cdn_prefix"], traffic)
    phases = Phases(traffic)
    {"sdk": run_sdk, "zensvi": run_zensvi}[tool](spec, phases)
    Path(result_path).write_text(json.dumps({"tool": tool, "phases": phases.results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
