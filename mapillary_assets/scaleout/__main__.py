"""`python -m mapillary_assets.scaleout run`: the whole pipeline on the scaled-out stack.

Run it with the stack's environment (`source .stack/env.sh`, or the same variables on any machine
that reaches Postgres and Redis): runs are queued in the instance and executed by the workers.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mapillary_assets.scaleout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=("run",))
    parser.add_argument(
        "--chunks-per-run", type=int, default=1, help="chunk partitions per run (default 1)"
    )
    parser.add_argument(
        "--tiles-per-run", type=int, default=64, help="tile partitions per discovery run"
    )
    parser.add_argument(
        "--until",
        choices=("metadata", "thumbnails", "blur"),
        default="blur",
        help="stop the chunks' work after this stage (default blur: all); the GeoPackage holds what exists",
    )
    args = parser.parse_args(argv)
    if not os.environ.get("DAGSTER_HOME") or not os.environ.get("MAPILLARY_CELERY_BROKER"):
        print(
            "error: no scaled-out instance configured (DAGSTER_HOME, MAPILLARY_CELERY_BROKER): "
            "run `source .stack/env.sh` after scripts/stack.sh start, or set the variables of README's "
            "'Scaling beyond one machine'",
            file=sys.stderr,
        )
        return 2
    import dagster as dg

    from mapillary_assets.errors import PipelineFailed
    from mapillary_assets.runners.cluster import DEFAULT_DAGSTER_URL, ClusterRunner
    from mapillary_assets.runners.pipeline import run_pipeline

    with dg.DagsterInstance.get() as instance:
        try:
            summary = run_pipeline(
                instance,
                runner=ClusterRunner(
                    instance,
                    dagster_url=os.environ.get("MAPILLARY_DAGSTER_URL", DEFAULT_DAGSTER_URL),
                ),
                tiles_per_run=args.tiles_per_run,
                chunks_per_run=args.chunks_per_run,
                until=args.until,
            )
        except PipelineFailed as failure:
            print(f"error: {failure}", file=sys.stderr)
            return 1
    for stage, seconds in summary["stage_seconds"].items():
        print(f"{stage}: {len(summary['runs'][stage])} run(s) finished in {seconds:.1f} s")
    print(f"done in {summary['seconds']:.0f} s ({summary['chunks']} chunk(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
