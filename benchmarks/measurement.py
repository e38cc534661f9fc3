"""What the end-to-end benchmarks (bench_full_zurich, bench_country) measure a pipeline run with: the
emulator in its own process, the summed PSS of the pipeline's processes sampled each second, per-job
wall times, per-stage times from the Dagster event log, the GeoPackage as GDAL reads it, and the UI's
GraphQL answers against the run's instance (served by `dagster-webserver`)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.harness import Stopwatch

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES = {  # stage -> asset step keys (from the event log)
    "discovery": ["discovered_images"],
    "chunking": ["sequence_images", "image_chunks"],
    "metadata": ["image_metadata"],
    "downloads": ["thumbnail_downloads"],
    "blur": ["blur_scores"],
    "staging": ["filter_areas", "staging_tables"],
    "geopackage": ["mapillary_geopackage"],
}


def scaled_data_root(scale: float, data_root: Path | None, default_root: str) -> Path:
    """Where a scaled benchmark keeps its data dirs: `data_root`, else `$MAPILLARY_BENCH_DIR` (or
    `default_root`)/scale-<scale>; created."""
    root = (
        data_root or Path(os.environ.get("MAPILLARY_BENCH_DIR", default_root)) / f"scale-{scale:g}"
    )
    root.mkdir(parents=True, exist_ok=True)
    return root


def save_measured(data_root: Path, measured: dict) -> None:
    """The raw measurements beside the run's data (`measured.json`), for figures re-derived later."""
    (data_root / "measured.json").write_text(json.dumps(measured, indent=1, default=str))


IDS_PER_REQUEST = 50  # the Graph API's `?ids=` batch limit


def chunk_sizes(layout) -> list[int]:
    """Ids per chunk of a data dir's chunk assignment."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    chunks = pq.read_table(layout.chunk_assignment_path, columns=["chunk"])["chunk"]
    return pc.value_counts(chunks).field("counts").to_pylist()


def metadata_request_floor(sizes: list[int]) -> int:
    """`?ids=` requests the chunks need at least: each chunk asks for its ids 50 at a time."""
    return sum(-(-size // IDS_PER_REQUEST) for size in sizes)


class Emulator:
    """`python -m mapillary_assets.emulator` in its own process on a free port."""

    def __init__(self, scale: float, seed: int, token: str, region: str = "zurich"):
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mapillary_assets.emulator",
                "--port",
                "0",
                "--scale",
                str(scale),
                "--seed",
                str(seed),
                "--region",
                region,
                "--token",
                token,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        urls = {}
        for line in self.process.stdout:
            key, sep, value = line.strip().partition("=")
            if sep and key in ("MAPILLARY_GRAPH_URL", "MAPILLARY_TILES_URL"):
                urls[key] = value
            if len(urls) == 2:
                break
        if len(urls) != 2:
            raise RuntimeError(f"the emulator did not start (exit {self.process.poll()})")
        self.graph_url, self.tiles_url = urls["MAPILLARY_GRAPH_URL"], urls["MAPILLARY_TILES_URL"]
        self.base_url = self.graph_url.rsplit("/graph", 1)[0]
        threading.Thread(
            target=self.process.stdout.read, daemon=True
        ).start()  # keep its pipe drained

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.base_url}/_emulator/stats", timeout=30) as answer:
            return json.loads(answer.read())

    def reset_stats(self) -> None:
        request = urllib.request.Request(
            f"{self.base_url}/_emulator/reset_stats", data=b"", method="POST"
        )
        urllib.request.urlopen(request, timeout=30).close()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    children = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        return []
    return children + [grandchild for child in children for grandchild in _descendants(child)]


class MemorySampler(threading.Thread):
    """Summed PSS of this process and its descendants (the emulator's tree apart), once a second,
    keeping the peak per label (the job running) and the emulator's own peak; and the 1-minute load
    average, since a busy machine makes every figure indicative."""

    def __init__(self, emulator_pid: int):
        super().__init__(daemon=True)
        self.emulator_pid = emulator_pid
        self.label = "start"
        self.peaks: dict[str, int] = {}
        self.driver_peaks: dict[str, int] = {}  # this process alone (the pipeline's driver)
        self.emulator_peak = 0
        self.load_averages: list[float] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            emulator = {self.emulator_pid, *_descendants(self.emulator_pid)}
            pids = [os.getpid(), *(pid for pid in _descendants(os.getpid()) if pid not in emulator)]
            sizes = [_pss_bytes(pid) for pid in pids]
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), sum(sizes))
            self.driver_peaks[self.label] = max(self.driver_peaks.get(self.label, 0), sizes[0])
            self.emulator_peak = max(self.emulator_peak, sum(_pss_bytes(pid) for pid in emulator))
            self.load_averages.append(os.getloadavg()[0])


class TimedRunner:
    """The default LocalRunner, labelling memory samples and timing each job."""

    def __init__(self, local, sampler: MemorySampler, log):
        self.local, self.sampler, self.log = local, sampler, log
        self.job_seconds: dict[str, float] = {}
        self.chunk_jobs = local.chunk_jobs

    def run_many(self, job_name, tag_sets, then=()):
        self.sampler.label = job_name
        with Stopwatch() as watch:
            results = self.local.run_many(job_name, tag_sets, then)
        self.job_seconds[job_name] = watch.seconds
        self.log(f"   {job_name}: {watch.seconds:,.0f} s")
        return results


def step_intervals(instance) -> dict[str, list[tuple[str, float, float]]]:
    """Per stage: (chunk, start, end) of every step of it that ended, over every run, from the Dagster
    event log; the chunk is the run's partitions (`describe_partitions`)."""
    import dagster as dg

    from mapillary_assets.defs.partitions import describe_partitions

    kinds = {
        dg.DagsterEventType.STEP_START,
        dg.DagsterEventType.STEP_SUCCESS,
        dg.DagsterEventType.STEP_FAILURE,
    }
    result: dict[str, list[tuple[str, float, float]]] = {}
    for run in instance.get_runs():
        spans: dict[str, list[float]] = {}
        for entry in instance.all_logs(run.run_id, of_type=kinds):
            spans.setdefault(entry.step_key, []).append(entry.timestamp)
        chunk = describe_partitions(run.tags)
        for stage, steps in STAGES.items():
            for step in steps:
                times = spans.get(step, [])
                if len(times) >= 2:
                    result.setdefault(stage, []).append((chunk, min(times), max(times)))
    return result


def stage_times(
    intervals: dict[str, list[tuple[str, float, float]]],
) -> dict[str, dict[str, float]]:
    """Per stage: wall (first step start .. last step end, over every run) and summed step seconds."""
    result = {}
    for stage, spans in intervals.items():
        result[stage] = {
            "wall_s": max(end for _, _, end in spans) - min(start for _, start, _ in spans),
            "step_s": sum(end - start for _, start, end in spans),
            "steps": len(spans),
        }
    return result


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values) or [float("nan")]
    return {"median": ordered[len(ordered) // 2], "max": ordered[-1]}


def ogrinfo_summary(path: Path) -> dict:
    """What GDAL's `ogrinfo` (a QGIS-style reader) sees: feature count, spatial index, read time."""
    if not shutil.which("ogrinfo"):
        return {"available": False, "rtree": geopackage_has_rtree(path)}
    with Stopwatch() as watch:
        summary = subprocess.run(
            ["ogrinfo", "-ro", "-so", str(path), "images"], capture_output=True, text=True
        )
    window = ["-spat", "8.54", "47.37", "8.55", "47.38"]  # a map view's read, through the R-tree
    with Stopwatch() as window_read:
        subprocess.run(
            ["ogrinfo", "-ro", "-q", *window, str(path), "images"], capture_output=True, text=True
        )
    count = next(
        (
            int(line.split(":")[1])
            for line in summary.stdout.splitlines()
            if line.startswith("Feature Count:")
        ),
        -1,
    )
    return {
        "available": True,
        "rc": summary.returncode,
        "features": count,
        "rtree": geopackage_has_rtree(path),
        "summary_s": watch.seconds,
        "window_read_s": window_read.seconds,
        "stderr": summary.stderr.strip()[:300],
    }


def geopackage_has_rtree(path: Path) -> bool:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        return (
            con.execute(
                "SELECT count(*) FROM gpkg_extensions WHERE extension_name = 'gpkg_rtree_index' "
                "AND table_name = 'images'"
            ).fetchone()[0]
            > 0
        )


def geopackage_rows(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        return con.execute("SELECT count(*) FROM images").fetchone()[0]


# The UI's partition pages: every asset's partition counts (the asset list), one asset's partition
# health bar, the runs list with tags.
UI_QUERIES = {
    "partition stats of every asset": """{ assetNodes { assetKey { path }
        partitionStats { numMaterialized numPartitions numFailed numMaterializing } } }""",
    "partition health bar of image_metadata": """{
        assetNodes(assetKeys: [{path: ["image_metadata"]}]) { assetPartitionStatuses {
        ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } } } }""",
    "partition health bar of discovered_images": """{
        assetNodes(assetKeys: [{path: ["discovered_images"]}]) { assetPartitionStatuses {
        ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } } } }""",
    "runs list, 300 runs with tags": """{ runsOrError(limit: 300) { ... on Runs {
        results { runId status tags { key value } } } } }""",
}


def ui_graphql_seconds(home: Path, env: dict[str, str], repeats: int = 3) -> dict[str, float]:
    """Median seconds of each UI_QUERIES answer, from `dagster-webserver` serving the instance at
    `home` with the pipeline's definitions (`env`: the run's environment)."""
    from mapillary_assets.net import free_port
    from mapillary_assets.process_tree import stop_group

    port = free_port()
    log = open(home / "webserver.log", "w")  # noqa: SIM115 (closed after the server stops)
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster-webserver"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-m",
            "mapillary_assets.definitions",
        ],
        env={**env, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_code_location(port, server)
        return {
            name: statistics.median(_timed_query(port, query) for _ in range(repeats))
            for name, query in UI_QUERIES.items()
        }
    finally:
        stop_group(server.pid, reap=server.poll)
        log.close()


def _graphql(port: int, query: str, timeout: float = 300.0) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        body = json.loads(answer.read())
    if body.get("errors"):
        raise RuntimeError(f"GraphQL errors: {body['errors']}")
    return body["data"]


def _timed_query(port: int, query: str) -> float:
    with Stopwatch() as watch:
        _graphql(port, query)
    return watch.seconds


def _wait_for_code_location(port: int, server: subprocess.Popen, timeout_s: float = 300.0) -> None:
    query = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name } } } }"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"dagster-webserver exited ({server.returncode}): see webserver.log")
        try:
            if _graphql(port, query, timeout=5)["repositoriesOrError"].get("nodes"):
                return
        except (OSError, ValueError, KeyError, RuntimeError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"dagster-webserver did not load the definitions within {timeout_s:.0f} s")
