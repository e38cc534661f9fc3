"""`mapillary-assets`: run the whole pipeline on the embedded emulator, serve the emulator, or open the UI.

    mapillary-assets demo      # emulator + every asset, through Dagster, ends with a GeoPackage
    mapillary-assets sample    # the same on the first N ids, in a separate data folder
    mapillary-assets emulator  # the emulator alone (for `dagster dev` or the benchmarks)
    mapillary-assets ui        # emulator + `dagster dev` on 127.0.0.1
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

DEMO_TOKEN = "MLY|emulator-demo|not-a-secret"
POOL_LIMITS = {"mapillary_api": 4}  # other pools (duckdb_writer, gpu, chunk_registry) use dagster.yaml's default 1
REPO_ROOT = Path(__file__).resolve().parent.parent


class PipelineFailed(RuntimeError):
    """A job of the pipeline failed; what it stored is kept, and a re-run does only what is missing."""


def _emulator_env(server, data_dir: Path) -> dict[str, str]:
    return {
        "MAPILLARY_ACCESS_TOKEN": DEMO_TOKEN,
        "MAPILLARY_GRAPH_URL": server.graph_url,
        "MAPILLARY_TILES_URL": server.tiles_url,
        "MAPILLARY_DATA_DIR": str(data_dir),
    }


def _dagster_home(separate_under: Path | None = None) -> Path:
    """The repo root instance (dagster.yaml there), or, for sample runs, a separate instance under
    the sample's data folder so its chunk partitions never mix with the full run's."""
    if separate_under is None:
        home = Path(os.environ.get("DAGSTER_HOME") or REPO_ROOT).resolve()
    else:
        home = (separate_under / "dagster_home").resolve()
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def configure_pools(instance) -> None:
    for pool, limit in POOL_LIMITS.items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)


def run_pipeline(instance, defs=None, log=print, runner=None) -> dict:
    """Every asset through Dagster: `defs/pipeline_runs.run_pipeline` (imported when called, so the CLI's
    other commands start without loading Dagster or the area of interest)."""
    from mapillary_assets.defs import pipeline_runs

    return pipeline_runs.run_pipeline(instance, defs, log=log, runner=runner)


def demo(args: argparse.Namespace) -> int:
    from mapillary_assets.emulator import EmulatorServer, World

    data_dir = Path(args.data_dir).resolve()
    home = _dagster_home(data_dir if args.sample else None)
    world = World(seed=args.seed, scale=args.scale)
    with EmulatorServer(world=world, token=DEMO_TOKEN) as server:
        os.environ.update(_emulator_env(server, data_dir))
        if args.sample:
            os.environ["MAPILLARY_SAMPLE_LIMIT"] = str(args.sample)
        print(f"emulator: {server.base_url} (seed {args.seed}, scale {args.scale})")
        print(f"data: {data_dir}   dagster instance: {home}")
        from dagster import DagsterInstance

        with DagsterInstance.get() as instance:
            configure_pools(instance)
            try:
                summary = run_pipeline(instance)
            except PipelineFailed as failure:
                print(f"error: {failure}", file=sys.stderr)
                return 1
    from mapillary_assets.storage import DataLayout

    gpkg = DataLayout(data_dir).geopackage_path
    print(f"\nDone in {summary['seconds']:.0f} s ({summary['chunks']} chunk(s)).")
    print(f"GeoPackage: {gpkg}\n  inspect: ogrinfo -so {gpkg} images   (or open it in QGIS)")
    print("UI: ./scripts/ui.sh, then open http://127.0.0.1:3000 (asset graph, runs, partitions, backfills)")
    return 0


def ui(args: argparse.Namespace) -> int:
    from mapillary_assets.emulator import EmulatorServer, World

    home = _dagster_home()
    with EmulatorServer(world=World(seed=args.seed, scale=args.scale), token=DEMO_TOKEN, port=args.emulator_port) as server:
        env = {**os.environ, **_emulator_env(server, Path(args.data_dir).resolve())}
        from dagster import DagsterInstance

        with DagsterInstance.get() as instance:
            configure_pools(instance)
        print(f"emulator: {server.base_url}; Dagster UI: http://{args.host}:{args.port} (instance {home})")
        command = [sys.executable, "-m", "dagster", "dev", "-m", "mapillary_assets.definitions",
                   "-h", args.host, "-p", str(args.port)]
        return _serve(command, env)


def _serve(command: list[str], env: dict[str, str]) -> int:
    """Run `dagster dev` until it exits. SIGTERM (`kill`, a service manager) is passed on, so it stops its
    webserver, daemon and run workers before the emulator they talk to goes away; Ctrl-C reaches it from
    the terminal directly, so this process only waits for it."""
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT)
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: process.send_signal(signum))
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                try:
                    return process.wait(60)
                except subprocess.TimeoutExpired:
                    process.terminate()
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*is currently in (beta|preview).*")
    parser = argparse.ArgumentParser(prog="mapillary-assets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("demo", "run the whole pipeline on the embedded emulator"),
                           ("sample", "the whole pipeline on the first N ids, kept apart from full runs"),
                           ("ui", "emulator + dagster dev")):
        command = commands.add_parser(name, help=helptext)
        command.add_argument("--scale", type=float, default=0.005,
                             help="emulator world density: 1.0 ~= 1.2 M images in Zurich (default 0.005)")
        command.add_argument("--seed", type=int, default=42)
        command.add_argument("--data-dir", default=os.environ.get("MAPILLARY_DATA_DIR", "data"))
        if name == "sample":
            command.add_argument("--limit", type=int, default=500, help="number of ids (default 500)")
        if name == "ui":
            command.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1 only)")
            command.add_argument("--port", type=int, default=3000)
            command.add_argument("--emulator-port", type=int, default=8765)
    commands.add_parser("emulator", help="serve the emulator alone", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "emulator":
        from mapillary_assets.emulator.__main__ import main as emulator_main

        return emulator_main(rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.command == "sample":
        args.sample = args.limit
        args.data_dir = str(Path(args.data_dir) / f"sample-{args.limit}")
        return demo(args)
    if args.command == "demo":
        args.sample = 0
        return demo(args)
    return ui(args)


if __name__ == "__main__":
    sys.exit(main())
