"""`LocalRunner`: the pipeline's runs on this machine, each in its own forked worker process calling
`execute_in_process` on the same instance, at most `max_concurrent` at a time. Per-chunk runs are
what lets stages overlap: the instance's pools (`mapillary_api` 4, `gpu` 1, `duckdb_writer` 1) admit
one chunk's blur step while other chunks' runs download, whereas one ranged run executes every
chunk's download before any blur starts. A chunk is one `process_chunks_job` run here (one process
start per chunk; the pools already overlap the chunks)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Sequence

import dagster as dg

from mapillary_assets.defs.partitions import describe_partitions
from mapillary_assets.errors import PipelineFailed
from mapillary_assets.runners.dead_runs import release_dead_runs

DEFAULT_CONCURRENT_RUNS = 3  # on 2 cores: one blurring chunk beside two downloading ones
_NOT_STARTED = 3  # a worker's exit status when the run was refused before it started


class LocalRunner:
    """Runs on this machine: each run in a forked worker process (`execute_in_process` on `instance`),
    at most `max_concurrent` at once.

    Forked, not spawned, so every run uses the caller's `defs` as built (resources included) without a
    code location to load; a process per run, so downloads and blur use both cores despite the GIL, a
    run's memory is returned when it ends, and a killed run is a dead pid `release_dead_runs` finds."""

    chunk_jobs = ("process_chunks_job",)

    def __init__(
        self,
        instance: dg.DagsterInstance,
        defs: dg.Definitions,
        max_concurrent: int = DEFAULT_CONCURRENT_RUNS,
        log: Callable[[str], None] = print,
    ):
        if instance.is_ephemeral:
            raise ValueError(
                "LocalRunner executes runs in worker processes, which need a persistent Dagster "
                "instance (DAGSTER_HOME, or dg.instance_for_test): an ephemeral one lives in one process"
            )
        self.instance = instance
        self.defs = defs
        self.max_concurrent = max(1, max_concurrent)
        self.log = log

    def run_many(
        self, job_name: str, tag_sets: list[dict[str, str]], then: Sequence[str] = ()
    ) -> list[tuple[str, bool]]:
        chain = [job_name, *then]
        jobs = {
            name: self.defs.resolve_job_def(name) for name in chain
        }  # an unknown job fails here, before any fork
        context = multiprocessing.get_context("fork")
        pending = [(index, 0) for index in range(len(tag_sets))]  # (tag set, position in the chain)
        running: dict[int, tuple[multiprocessing.Process, str, object, int]] = {}
        results: dict[int, tuple[str, bool]] = {}
        not_started: list[str] = []
        while pending or running:
            while pending and len(running) < self.max_concurrent:
                index, position = pending.pop(0)
                run_id = str(uuid.uuid4())
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(
                    target=_execute_run,
                    args=(jobs[chain[position]], self.instance, run_id, tag_sets[index], sender),
                    name=f"{chain[position]}-{run_id[:8]}",
                    daemon=False,
                )
                _fork_sharing_the_heap(process)
                sender.close()
                running[index] = (process, run_id, receiver, position)
            for index, (process, run_id, receiver, position) in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                if process.exitcode == _NOT_STARTED:
                    not_started.append(receiver.recv())
                receiver.close()
                if process.exitcode not in (
                    0,
                    1,
                    _NOT_STARTED,
                ):  # killed: free its pool slots for the others
                    for released in release_dead_runs(self.instance):
                        self.log(
                            f"released run {released}: its process died (exit {process.exitcode})"
                        )
                del running[index]
                if process.exitcode == 0 and position + 1 < len(chain):
                    pending.insert(
                        0, (index, position + 1)
                    )  # a started chunk goes on before new ones start
                    continue
                results[index] = (run_id, process.exitcode == 0)
                if len(tag_sets) > 1:
                    self.log(
                        f"   {chain[position]} {describe_partitions(tag_sets[index])}: "
                        f"{'ok' if results[index][1] else 'FAILED'} ({len(results)}/{len(tag_sets)})"
                    )
            time.sleep(0.1)
        if not_started:  # e.g. a config error: the same for every run, and no run logs to point to
            raise PipelineFailed(f"{' -> '.join(chain)} could not start: {not_started[0]}")
        return [results[index] for index in range(len(tag_sets))]


def _fork_sharing_the_heap(process: multiprocessing.Process) -> None:
    """Start the forked worker with this process's objects frozen out of the garbage collector, so the
    worker's collections do not write to them: otherwise every worker soon holds a private copy of the
    driver's whole heap (copy-on-write), and the summed memory grows with workers x driver size. The
    driver unfreezes at once and collects as before; the worker keeps its inherited objects frozen."""
    gc.freeze()
    try:
        process.start()
    finally:
        gc.unfreeze()


def _execute_run(
    job, instance: dg.DagsterInstance, run_id: str, tags: dict[str, str], errors
) -> None:
    """In the forked worker: a fresh instance from the same ref (the parent's storage connections are
    not shared across a fork), then the run. Exit status 0: succeeded, 1: failed (its logs say why),
    _NOT_STARTED: refused before it ran (e.g. invalid config), with the reason sent on `errors`."""
    code = _NOT_STARTED
    try:
        result = job.execute_in_process(
            instance=dg.DagsterInstance.from_ref(instance.get_ref()),
            run_id=run_id,
            tags=tags,
            raise_on_error=False,
        )
        code = 0 if result.success else 1
    except Exception as exc:
        errors.send(f"{type(exc).__name__}: {exc}"[:4000])  # well under a pipe's buffer
    finally:
        errors.close()
        os._exit(code)  # skip the parent's atexit handlers and inherited threads
