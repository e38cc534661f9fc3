"""The whole pipeline on a scaled-out instance: discovery -> chunking -> chunk runs -> publish.

Each stage is a set of runs submitted together (they spread over the workers), and the next stage starts
when every run of this one, retries included, has finished. A failed stage stops the pipeline; what its
runs stored is kept, and a re-run does only what is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import dagster as dg

from mapillary_assets.scaleout.runner import batched, partition_tags


class ClusterPipelineFailed(RuntimeError):
    """Some run of a stage failed (after its retries); the message names the runs."""


def run_cluster_pipeline(instance: dg.DagsterInstance, runner, log: Callable[[str], None] = print,
                         tiles_per_run: int = 64, chunks_per_run: int = 1) -> dict:
    """`runner.run_many(job_name, tag_sets)` runs each tag set as one run (ClusterRunner: on the workers)."""
    from mapillary_assets.defs.partitions import CHUNK_PARTITIONS_NAME, tile_partitions

    started = time.monotonic()
    runs: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}

    def stage(job_name: str, tag_sets: list[dict[str, str]]) -> None:
        log(f"-> {job_name}: {len(tag_sets)} run(s)")
        began = time.monotonic()
        outcomes = runner.run_many(job_name, tag_sets)
        seconds[job_name] = time.monotonic() - began
        log(f"   {job_name}: {len(outcomes)} run(s) finished in {seconds[job_name]:.1f} s")
        runs[job_name] = [run_id for run_id, _ in outcomes]
        failed = [run_id for run_id, ok in outcomes if not ok]
        if failed:
            raise ClusterPipelineFailed(f"{job_name}: {len(failed)} of {len(outcomes)} run(s) failed "
                                        f"({', '.join(failed)}); see their logs in the UI, then re-run")

    stage("discovery_job", [partition_tags(keys) for keys in batched(tile_partitions.get_partition_keys(), tiles_per_run)])
    stage("chunking_job", [{}])
    chunks = sorted(instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME))
    if chunks:
        stage("chunk_job", [partition_tags(keys) for keys in batched(chunks, chunks_per_run)])
    stage("publish_job", [{}])
    return {"chunks": len(chunks), "seconds": time.monotonic() - started, "runs": runs, "stage_seconds": seconds}
