"""Run one job of the pipeline in a process of its own, and what the reliability tests share.

The subprocess side is a script: a test starts it, lets it work against the emulator, and may SIGKILL
it at any point, or start several at once that compete for the shared rate-limit store:

    MAPILLARY_ACCESS_TOKEN=... python -m mapillary_assets_tests.run_partition \\
        --home DAGSTER_HOME --data-dir DATA --graph-url URL --tiles-url URL \\
        --job process_chunks_job --partition chunk-000000 [--entity-per-minute 20] [--setting chunk_size=200]

The token is read from MAPILLARY_ACCESS_TOKEN only, never from the command line (every local user can
read a process's arguments). Exit status: 0 the run succeeded, 1 it failed (its events are in the
instance), 2 bad arguments.

The parent side (`open_instance`, `emulator_resources`, `execute`, `PartitionProcess`, `fault_free_reference`,
`assert_same_images`, ...) is imported by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FIGURES_ENV = (
    "MAPILLARY_RELIABILITY_FIGURES"  # a JSON-lines file the tests append their measurements to
)
REFERENCE_SEED = 7


# ---------------------------------------------------------------------------------------------
# Dagster plumbing shared by the script and the tests


def open_instance(home: Path):
    """A persistent Dagster instance in `home` configured like the repository's (pools included), so
    several processes can share it the way `dagster dev` run workers do."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text((REPO_ROOT / "dagster.yaml").read_text())
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))


def emulator_resources(
    graph_url: str, tiles_url: str, data_dir: Path, token, *, api: dict | None = None, **settings
) -> dict:
    """The resources of a run against the emulator: `token` is a str or a `dg.EnvVar`; `api` overrides
    MapillaryApiResource fields (rate budgets, retries); `settings` PipelineSettings fields."""
    from mapillary_assets.defs.resources import (
        DataStorageResource,
        MapillaryApiResource,
        PipelineSettings,
    )
    from mapillary_assets.storage import DataLayout

    data_dir = Path(data_dir)
    return {
        "mapillary_api": MapillaryApiResource(
            access_token=token,
            graph_url=graph_url,
            tiles_url=tiles_url,
            rate_limit_store=str(DataLayout(data_dir).rate_limit_store_path),
            **(api or {}),
        ),
        "storage": DataStorageResource(data_dir=str(data_dir)),
        "settings": PipelineSettings(**{"chunk_size": 200, **settings}).validated(),
    }


def execute(defs, instance, job_name: str, partition_keys: Sequence[str] = ()):
    """One run of `job_name` over `partition_keys` (a contiguous range, as the CLI launches them);
    returns Dagster's result (never raises for a failed run)."""
    from dagster._core.storage.tags import (
        ASSET_PARTITION_RANGE_END_TAG,
        ASSET_PARTITION_RANGE_START_TAG,
    )

    tags = {}
    if partition_keys:
        tags = {
            ASSET_PARTITION_RANGE_START_TAG: partition_keys[0],
            ASSET_PARTITION_RANGE_END_TAG: partition_keys[-1],
        }
    return defs.resolve_job_def(job_name).execute_in_process(
        instance=instance, tags=tags, raise_on_error=False
    )


def chunk_keys(instance) -> list[str]:
    from mapillary_assets.defs.partitions import CHUNK_PARTITIONS_NAME

    return sorted(instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME))


def run_discovery_and_chunking(defs, instance) -> list[str]:
    """Discovery of every tile partition, then chunking; the chunk keys."""
    from mapillary_assets.defs.partitions import tile_partitions

    for job, keys in (
        ("discovery_job", tile_partitions().get_partition_keys()),
        ("assign_chunks_job", ()),
    ):
        result = execute(defs, instance, job, keys)
        assert result.success, f"{job} failed: {failure_messages(instance, result.run_id)}"
    return chunk_keys(instance)


def failure_messages(instance, run_id: str) -> list[str]:
    """The messages of a run's failure events, each with the messages of the errors that caused it
    (what a person reads in the UI, without the stack traces)."""
    messages = []
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is not None and event.is_failure:
            error = getattr(event.event_specific_data, "error", None)
            chain = []
            while error is not None:
                chain.append(error.message.strip())
                error = error.cause or error.context
            messages.append("\n".join(chain) if chain else entry.message)
    return messages


# ---------------------------------------------------------------------------------------------
# the script


def _parse_setting(text: str) -> tuple[str, object]:
    name, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(raw)
    except ValueError:
        return name, raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_partition", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--home", type=Path, required=True, help="DAGSTER_HOME of the shared instance"
    )
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--graph-url", required=True)
    parser.add_argument("--tiles-url", required=True)
    parser.add_argument("--job", default="process_chunks_job")
    parser.add_argument(
        "--partition", action="append", default=[], help="partition key (repeatable, a range)"
    )
    parser.add_argument(
        "--entity-per-minute", type=int, default=None, help="the client's entity budget"
    )
    parser.add_argument(
        "--setting",
        type=_parse_setting,
        action="append",
        default=[],
        help="PipelineSettings field as NAME=VALUE (repeatable)",
    )
    args = parser.parse_args(argv)
    if not os.environ.get("MAPILLARY_ACCESS_TOKEN"):
        print("run_partition: MAPILLARY_ACCESS_TOKEN is not set", file=sys.stderr)
        return 2

    import dagster as dg

    from mapillary_assets.definitions import build_definitions

    api = {} if args.entity_per_minute is None else {"entity_per_minute": args.entity_per_minute}
    resources = emulator_resources(
        args.graph_url,
        args.tiles_url,
        args.data_dir,
        dg.EnvVar("MAPILLARY_ACCESS_TOKEN"),
        api=api,
        **dict(args.setting),
    )
    defs = build_definitions(resources)
    with open_instance(args.home) as instance:
        result = execute(defs, instance, args.job, args.partition)
        print(
            json.dumps({"run_id": result.run_id, "success": result.success, "pid": os.getpid()}),
            flush=True,
        )
    return 0 if result.success else 1


# ---------------------------------------------------------------------------------------------
# the parent side


@dataclass
class PartitionProcess:
    """One `run_partition` subprocess; its output goes to `log_path`."""

    args: list[str]
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started: float = 0.0

    @classmethod
    def start(
        cls,
        *,
        home: Path,
        data_dir: Path,
        server,
        token: str,
        partitions: Sequence[str],
        log_path: Path,
        job: str = "process_chunks_job",
        entity_per_minute: int | None = None,
        settings: dict | None = None,
    ) -> PartitionProcess:
        args = [
            sys.executable,
            "-m",
            "mapillary_assets_tests.run_partition",
            "--home",
            str(home),
            "--data-dir",
            str(data_dir),
            "--graph-url",
            server.graph_url,
            "--tiles-url",
            server.tiles_url,
            "--job",
            job,
        ]
        for key in partitions:
            args += ["--partition", key]
        if entity_per_minute is not None:
            args += ["--entity-per-minute", str(entity_per_minute)]
        for name, value in (settings or {}).items():
            args += ["--setting", f"{name}={json.dumps(value)}"]
        env = {**os.environ, "MAPILLARY_ACCESS_TOKEN": token, "PYTHONPATH": str(REPO_ROOT)}
        runner = cls(args, Path(log_path), env)
        runner.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(runner.log_path, "wb") as log:
            runner.process = subprocess.Popen(
                args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        runner.started = time.monotonic()
        return runner

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup handler, no finally block runs (a power cut, the OOM killer)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def wait(self, timeout: float = 300.0) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"partition run did not finish in {timeout:.0f} s; log:\n{self.log_tail()}"
            ) from None

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return "(no log)"


def wait_until(
    condition, timeout: float, interval: float = 0.01, message: str = "condition"
) -> float:
    """Poll `condition()` until true; returns the seconds waited, AssertionError after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)
    return time.monotonic() - started


def temporary_leftovers(root: Path) -> list[Path]:
    from mapillary_assets.storage import TEMP_MARKER

    return sorted(path for path in Path(root).rglob(f"*{TEMP_MARKER}*"))


def busiest_window(times: Sequence[float], window_s: float = 60.0) -> int:
    """The most requests in any `window_s`-second sliding window (closed, as a budget counts them)."""
    ordered = sorted(times)
    busiest, start = 0, 0
    for end, moment in enumerate(ordered):
        while moment - ordered[start] > window_s:
            start += 1
        busiest = max(busiest, end - start + 1)
    return busiest


def record_figure(scenario: str, **values) -> None:
    """Print a measurement and, when MAPILLARY_RELIABILITY_FIGURES names a file, append it there
    (RELIABILITY.md is filled from those lines)."""
    line = json.dumps({"scenario": scenario, **values}, default=str, sort_keys=True)
    print(f"reliability figure: {line}")
    target = os.environ.get(FIGURES_ENV)
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def shared_temp_root(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this session sees (the per-worker base's parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


# ---------------------------------------------------------------------------------------------
# runs against the emulator, and the fault-free reference


@dataclass
class Reference:
    """A complete fault-free run of the test world: its data folder, its GeoPackage `images` layer and
    what it cost (emulator requests by kind, wall seconds)."""

    data_dir: Path
    requests: dict[str, int]
    seconds: float
    busiest_minute: dict[str, int]  # most requests in any 60 s, by rate-limit family
    images: object = field(repr=False, default=None)  # GeoDataFrame, loaded lazily

    def load_images(self):
        if self.images is None:
            self.images = read_images(self.data_dir)
        return self.images


def read_images(data_dir: Path):
    import geopandas as gpd

    from mapillary_assets.storage import DataLayout

    return gpd.read_file(
        DataLayout(Path(data_dir)).geopackage_path, layer="images", engine="pyogrio"
    )


def reference_world():
    from mapillary_assets.emulator import World
    from mapillary_assets_tests.harness import TEST_SCALE

    return World(seed=REFERENCE_SEED, scale=TEST_SCALE)


def fault_free_reference(root: Path) -> Reference:
    """Build the reference once per test session (under a file lock, so parallel workers share it)."""
    from filelock import FileLock

    folder = Path(root) / "reliability-reference"
    summary = folder / "summary.json"
    with FileLock(str(folder) + ".lock"):
        if not summary.exists():
            if folder.exists():
                shutil.rmtree(folder)
            _build_reference(folder)
    figures = json.loads(summary.read_text())
    return Reference(
        folder / "data", figures["requests"], figures["seconds"], figures["busiest_minute"]
    )


def _build_reference(folder: Path) -> None:
    from mapillary_assets.definitions import build_definitions
    from mapillary_assets.emulator import EmulatorServer
    from mapillary_assets.runners.pipeline import run_pipeline
    from mapillary_assets_tests.harness import TEST_TOKEN

    with (
        EmulatorServer(reference_world(), token=TEST_TOKEN) as server,
        open_instance(folder / "home") as instance,
    ):
        defs = build_definitions(
            emulator_resources(server.graph_url, server.tiles_url, folder / "data", TEST_TOKEN)
        )
        started = time.monotonic()
        run_pipeline(instance, defs, log=lambda *_: None)
        seconds = time.monotonic() - started
        requests = server.stats()
        peaks = {
            family: busiest_window(server.request_times(family)) for family in ("tiles", "entity")
        }
    (folder / "summary.json").write_text(
        json.dumps({"requests": requests, "seconds": seconds, "busiest_minute": peaks})
    )


@contextlib.contextmanager
def emulated_run(
    folder: Path,
    faults=None,
    token: str | None = None,
    server_token: str | None = None,
    api: dict | None = None,
    **settings,
) -> Iterator[EmulatedRun]:
    """An emulator of the reference world (with `faults`) and a persistent instance + data folder in
    `folder`, wired together (the client's token may differ from the server's: `server_token`)."""
    from mapillary_assets.definitions import build_definitions
    from mapillary_assets.emulator import EmulatorServer
    from mapillary_assets_tests.harness import TEST_TOKEN

    token = token or TEST_TOKEN
    folder = Path(folder)
    with (
        EmulatorServer(
            reference_world(), faults=faults, token=server_token or TEST_TOKEN
        ) as server,
        open_instance(folder / "home") as instance,
    ):
        resources = emulator_resources(
            server.graph_url, server.tiles_url, folder / "data", token, api=api, **settings
        )
        yield EmulatedRun(
            server, instance, build_definitions(resources), folder / "data", folder / "home"
        )


@dataclass
class EmulatedRun:
    server: object
    instance: object
    defs: object
    data_dir: Path
    home: Path

    @property
    def layout(self):
        from mapillary_assets.storage import DataLayout

        return DataLayout(self.data_dir)

    def execute(self, job_name: str, partition_keys: Sequence[str] = ()):
        return execute(self.defs, self.instance, job_name, partition_keys)

    def run_pipeline(self) -> None:
        """Every stage, as `mapillary-assets demo` runs them; raises errors.PipelineFailed on a failed job."""
        from mapillary_assets.runners.pipeline import run_pipeline

        run_pipeline(self.instance, self.defs, log=lambda *_: None)

    def run_until_complete(self, attempts: int = 3) -> int:
        """Run the pipeline again after each failure (a "backfill of failed partitions": each re-run
        does only what is missing), at most `attempts` times; returns the runs it took."""
        from mapillary_assets.errors import PipelineFailed

        for attempt in range(1, attempts + 1):
            try:
                self.run_pipeline()
                return attempt
            except PipelineFailed:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def images(self):
        return read_images(self.data_dir)


# ---------------------------------------------------------------------------------------------
# comparing final data


def assert_same_images(actual, expected, ignore: Sequence[str] = ()) -> None:
    """Same ids (each once) and the same value in every column of the GeoPackage `images` layer."""
    import numpy as np
    import pandas as pd

    assert actual["image_id"].is_unique, "an image id appears twice in the GeoPackage"
    assert set(actual["image_id"]) == set(expected["image_id"]), (
        f"ids differ: {len(set(expected['image_id']) - set(actual['image_id']))} missing, "
        f"{len(set(actual['image_id']) - set(expected['image_id']))} unexpected"
    )
    left = actual.sort_values("image_id").reset_index(drop=True)
    right = expected.sort_values("image_id").reset_index(drop=True)
    assert np.allclose(
        np.c_[left.geometry.x, left.geometry.y],
        np.c_[right.geometry.x, right.geometry.y],
        rtol=0,
        atol=1e-9,
    )
    columns = [c for c in right.columns if c != "geometry" and c not in ignore]
    pd.testing.assert_frame_equal(
        pd.DataFrame(left[columns]), pd.DataFrame(right[columns]), check_like=True
    )


if __name__ == "__main__":
    sys.exit(main())
