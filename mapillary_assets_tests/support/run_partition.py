"""Run one job of the pipeline in a process of its own (started by `partition_process.PartitionProcess`).

A test starts it, lets it work against the emulator, and may SIGKILL it at any point, or start several
at once that compete for the shared rate-limit store:

    MAPILLARY_ACCESS_TOKEN=... python -m mapillary_assets_tests.support.run_partition \\
        --home DAGSTER_HOME --data-dir DATA --graph-url URL --tiles-url URL \\
        --job process_chunks_job --partition chunk-000000 [--entity-per-minute 20] [--setting chunk_size=200]

The token is read from MAPILLARY_ACCESS_TOKEN only, never from the command line (every local user can
read a process's arguments). Exit status: 0 the run succeeded, 1 it failed (its events are in the
instance), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


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
    from mapillary_assets.defs.resources import api_resources
    from mapillary_assets.runners.instance import open_instance
    from mapillary_assets_tests.support.emulated_runs import execute
    from mapillary_assets_tests.support.world import TEST_CHUNK_SIZE

    resources = api_resources(
        graph_url=args.graph_url,
        tiles_url=args.tiles_url,
        data_dir=args.data_dir,
        access_token=dg.EnvVar("MAPILLARY_ACCESS_TOKEN"),
        api={} if args.entity_per_minute is None else {"entity_per_minute": args.entity_per_minute},
        settings={"chunk_size": TEST_CHUNK_SIZE, **dict(args.setting)},
    )
    with open_instance(args.home) as instance:
        result = execute(build_definitions(resources), instance, args.job, args.partition)
        print(
            json.dumps({"run_id": result.run_id, "success": result.success, "pid": os.getpid()}),
            flush=True,
        )
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
