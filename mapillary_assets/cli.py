"""`mapillary-assets`: run the whole pipeline against the Mapillary API or the embedded emulator, serve the
emulator, or open the UI.

mapillary-assets run       # every asset against the configured API (MAPILLARY_ACCESS_TOKEN), no emulator
mapillary-assets demo      # emulator + every asset, through Dagster, ends with a GeoPackage
mapillary-assets sample    # the same on the first N ids, in a separate data folder
mapillary-assets emulator  # the emulator alone (for `dagster dev` or the benchmarks)
mapillary-assets ui        # emulator + `dagster dev` on 127.0.0.1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from mapillary_assets.cli_errors import (
    console_without_stack_traces,
    reason_of_failed_run,
    user_error_types,
)
from mapillary_assets.errors import PipelineFailed, UserError
from mapillary_assets.process_tree import serve_until_stopped

DEMO_TOKEN = "MLY|emulator-demo|not-a-secret"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _emulator_env(server, data_dir: Path) -> dict[str, str]:
    env = {
        "MAPILLARY_ACCESS_TOKEN": DEMO_TOKEN,
        "MAPILLARY_GRAPH_URL": server.graph_url,
        "MAPILLARY_TILES_URL": server.tiles_url,
        "MAPILLARY_DATA_DIR": str(data_dir),
    }
    region = server.world.region
    if region.name != "zurich" and not os.environ.get("MAPILLARY_AOI"):
        env["MAPILLARY_AOI"] = str(Path(__file__).resolve().parent / "data" / region.aoi_file)
    return env


def _dagster_home(separate_under: Path | None = None) -> Path:
    """The repo root instance (dagster.yaml there), or, for sample runs, a separate instance under
    the sample's data folder so its chunk partitions never mix with the full run's."""
    from mapillary_assets.runners.instance import prepare_dagster_home

    if separate_under is None:
        home = prepare_dagster_home(Path(os.environ.get("DAGSTER_HOME") or REPO_ROOT))
    else:
        home = prepare_dagster_home(separate_under / "dagster_home")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def demo(args: argparse.Namespace) -> int:
    from mapillary_assets.emulator import EmulatorServer, World

    data_dir = Path(args.data_dir).resolve()
    home = _dagster_home(data_dir if args.sample else None)
    world = World(seed=args.seed, scale=args.scale, region=args.region)
    with EmulatorServer(world=world, token=DEMO_TOKEN) as server:
        os.environ.update(_emulator_env(server, data_dir))
        if args.sample:
            os.environ["MAPILLARY_SAMPLE_LIMIT"] = str(args.sample)
        print(f"emulator: {server.base_url} (seed {args.seed}, scale {args.scale})")
        print(f"data: {data_dir}   dagster instance: {home}")
        return _run_and_summarise(args, data_dir)


def run(args: argparse.Namespace) -> int:
    """The pipeline against the configured API (the real one unless MAPILLARY_GRAPH_URL/TILES_URL say
    otherwise), with the same runner and instance as `demo`."""
    if not os.environ.get("MAPILLARY_ACCESS_TOKEN", "").strip():
        raise UserError(
            "MAPILLARY_ACCESS_TOKEN is not set: export MAPILLARY_ACCESS_TOKEN='MLY|...' (a client token "
            "from https://www.mapillary.com/dashboard/developers), or try `mapillary-assets demo` offline"
        )
    data_dir = Path(args.data_dir).resolve()
    os.environ["MAPILLARY_DATA_DIR"] = str(data_dir)
    if args.aoi:
        os.environ["MAPILLARY_AOI"] = str(Path(args.aoi).resolve())
    home = _dagster_home()
    print(f"api: {os.environ.get('MAPILLARY_GRAPH_URL', 'https://graph.mapillary.com')}")
    print(f"data: {data_dir}   dagster instance: {home}   until: {args.until}")
    return _run_and_summarise(args, data_dir, until=args.until)


def _run_and_summarise(args: argparse.Namespace, data_dir: Path, until: str = "blur") -> int:
    """run_pipeline on the instance in DAGSTER_HOME, its progress shown, then the summary."""
    import pyogrio
    from dagster import DagsterInstance

    from mapillary_assets.progress import ProgressDisplay
    from mapillary_assets.runners.instance import configure_pools
    from mapillary_assets.runners.pipeline import STAGES, run_pipeline
    from mapillary_assets.storage import DataLayout

    layout = DataLayout.at(data_dir)
    stages = STAGES[: STAGES.index(until) + 1]
    with DagsterInstance.get() as instance:
        configure_pools(instance)
        try:
            with (
                contextlib.nullcontext() if args.debug else console_without_stack_traces(),
                # polls the stage files; a bucket only from the runs (see storage.in_fresh_child)
                ProgressDisplay(layout, stages) if layout.is_local else contextlib.nullcontext(),
            ):
                summary = run_pipeline(instance, until=until)
        except PipelineFailed as failure:
            raise UserError(reason_of_failed_run(instance, failure, debug=args.debug)) from failure
    gpkg = layout.geopackage_path
    images = (  # published: the current area's images (the assignment may hold an earlier area's too)
        int(pyogrio.read_info(gpkg, layer="images")["features"]) if gpkg.exists() else 0
    )
    print(
        f"\nDone in {summary['seconds']:.0f} s ({images:,} images in {summary['chunks']} chunk(s))."
    )
    if not images:
        from mapillary_assets.defs.area import current_aoi
        from mapillary_assets.pipeline.aoi import no_images_warning

        print(
            f"warning: {no_images_warning(current_aoi(), os.environ.get('MAPILLARY_TILESET', 'mly1_public'))}",
            file=sys.stderr,
        )
    print(f"GeoPackage: {gpkg}\n  inspect: ogrinfo -so {gpkg} images   (or open it in QGIS)")
    print(
        "UI: ./scripts/ui.sh, then open http://127.0.0.1:3000 (asset graph, runs, partitions, backfills)"
    )
    return 0


def ui(args: argparse.Namespace) -> int:
    from mapillary_assets.emulator import EmulatorServer, World

    home = _dagster_home()
    emulator = EmulatorServer(
        world=World(seed=args.seed, scale=args.scale, region=args.region),
        token=DEMO_TOKEN,
        port=args.emulator_port,
    )
    try:
        emulator.start()
    except OSError as error:
        raise UserError(
            f"the emulator cannot listen on 127.0.0.1:{args.emulator_port} ({error.strerror}): "
            "stop what uses that port or pass another --emulator-port"
        ) from None
    with emulator as server:
        os.environ.update(_emulator_env(server, Path(args.data_dir).resolve()))
        from dagster import DagsterInstance

        from mapillary_assets.definitions import build_definitions
        from mapillary_assets.runners.instance import configure_pools

        build_definitions()  # a bad AOI or setting fails here, as `error: ...`
        with DagsterInstance.get() as instance:
            configure_pools(instance)
        print(
            f"emulator: {server.base_url}; Dagster UI: http://{args.host}:{args.port} (instance {home})"
        )
        command = [
            sys.executable,
            "-m",
            "dagster",
            "dev",
            "-m",
            "mapillary_assets.definitions",
            "-h",
            args.host,
            "-p",
            str(args.port),
        ]
        return serve_until_stopped(command, dict(os.environ), cwd=REPO_ROOT, name="dagster dev")


def plan_command(args: argparse.Namespace) -> int:
    """`mapillary-assets plan`: print the area's plan (MAPILLARY_ACCESS_TOKEN and the API URLs from
    the environment; the partition zoom as discovery chooses it)."""
    import asyncio

    from mapillary_assets.api.client import MapillaryClient
    from mapillary_assets.api.client_config import ClientConfig
    from mapillary_assets.defs.area import partition_zoom
    from mapillary_assets.pipeline.aoi import load_aoi
    from mapillary_assets.pipeline.plan import plan_area
    from mapillary_assets.storage import DataLayout

    aoi = load_aoi(args.aoi)
    zoom = partition_zoom(aoi)
    tileset = os.environ.get("MAPILLARY_TILESET") or "mly1_public"

    async def planned():
        settings = ClientConfig.from_env()
        async with MapillaryClient(settings) as client:
            return await plan_area(
                client,
                aoi,
                DataLayout.at(args.data_dir),
                zoom,
                tileset,
                tiles_per_day=settings.tiles_per_day,
                entity_per_minute=settings.entity_per_minute,
            )

    plan = asyncio.run(planned())
    print(f"plan for {aoi.source} ({aoi.area_km2:,.0f} km2, partition zoom {zoom})")
    print(plan.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*is currently in (beta|preview).*")
    parser = argparse.ArgumentParser(
        prog="mapillary-assets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    debug_help = "show the full traceback of an error (by default: `error: <message>` alone)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    commands = parser.add_subparsers(dest="command", required=True)
    run_command = commands.add_parser(
        "run", help="the whole pipeline against the configured Mapillary API (no emulator)"
    )
    run_command.add_argument(
        "--aoi",
        help="GeoJSON polygon of the area (default: MAPILLARY_AOI, else the shipped Zurich one)",
    )
    run_command.add_argument(
        "--until",
        choices=("metadata", "thumbnails", "blur"),
        default="blur",
        help="stop the per-image work after this stage (default blur: all); the GeoPackage holds what exists",
    )
    run_command.add_argument("--data-dir", default=os.environ.get("MAPILLARY_DATA_DIR", "data"))
    run_command.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help
    )
    for name, helptext in (
        ("demo", "run the whole pipeline on the embedded emulator"),
        ("sample", "the whole pipeline on the first N ids, kept apart from full runs"),
        ("ui", "emulator + dagster dev"),
    ):
        command = commands.add_parser(name, help=helptext)
        command.add_argument(
            "--scale",
            type=float,
            default=0.005,
            help="emulator world density: 1.0 ~= 1.2 M images in Zurich (default 0.005)",
        )
        command.add_argument("--seed", type=int, default=42)
        command.add_argument(
            "--region",
            choices=("zurich", "switzerland"),
            default="zurich",
            help="emulator world: zurich, or switzerland (>= 10 M images at scale 1.0; the AOI "
            "defaults to its outline)",
        )
        command.add_argument("--data-dir", default=os.environ.get("MAPILLARY_DATA_DIR", "data"))
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help
        )
        if name == "sample":
            command.add_argument(
                "--limit", type=int, default=500, help="number of ids (default 500)"
            )
        if name == "ui":
            command.add_argument(
                "--host", default="127.0.0.1", help="bind address (default 127.0.0.1 only)"
            )
            command.add_argument("--port", type=int, default=3000)
            command.add_argument("--emulator-port", type=int, default=8765)
    commands.add_parser("emulator", help="serve the emulator alone", add_help=False)
    plan = commands.add_parser("plan", help="what an area costs, from coverage tiles only")
    plan.add_argument("--aoi", default=os.environ.get("MAPILLARY_AOI"), help="GeoJSON polygon file")
    plan.add_argument("--data-dir", default=os.environ.get("MAPILLARY_DATA_DIR", "data"))

    args, rest = parser.parse_known_args(argv)
    try:
        return _dispatch(parser, args, rest)
    except Exception as error:
        if args.debug or not isinstance(error, user_error_types()):
            raise  # a bug, or --debug: the traceback is what helps
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            "interrupted: what was stored is kept; a re-run does only what is missing",
            file=sys.stderr,
        )
        return 130


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
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
    if args.command == "run":
        return run(args)
    if args.command == "plan":
        return plan_command(args)
    return ui(args)


if __name__ == "__main__":
    sys.exit(main())
