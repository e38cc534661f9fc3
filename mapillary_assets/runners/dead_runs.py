"""Release runs whose process died (SIGKILL, OOM kill, power cut) so they stop holding pool slots.

A killed run stays STARTED and keeps the concurrency-pool slots it claimed; `dagster.yaml` gives the
`gpu`, `duckdb_writer` and `chunk_registry` pools one slot each, so without this every later run of
those assets would wait for the slot forever. (Runs launched by the daemon are also watched by
`run_monitoring`; runs executed in process, as the demo does, are not.)

Pids only mean something on the machine that ran the run. On a shared instance whose runs go to other
machines (deploy/dagster.yaml: CeleryRunLauncher), and for any run that carries a remote launcher's tag,
nothing is judged here: run monitoring asks the launcher about the run's worker instead.
"""

from __future__ import annotations

import dagster as dg

from mapillary_assets.dagster_compat import is_local_launcher, release_pool_slots
from mapillary_assets.process_tree import process_alive

# Tags that remote launchers put on the runs they start (the run's worker is on another machine).
REMOTE_LAUNCHER_TAGS = ("dagster-celery/task_id",)


def release_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark active runs whose worker process on this machine is gone as failed and free their pool
    slots; returns their ids. A run whose pid is unknown or alive is left alone."""
    released = []
    if not is_local_launcher(instance):
        return released  # a cluster instance: its runs' pids belong to other machines
    active = instance.get_runs(
        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING])
    )
    for run in active:
        if any(tag in run.tags for tag in REMOTE_LAUNCHER_TAGS):
            continue
        pid = _run_worker_pid(instance, run.run_id)
        if pid is None or process_alive(pid):
            continue
        instance.report_run_failed(run, f"its process (pid {pid}) is gone: killed or crashed")
        release_pool_slots(instance, run.run_id)
        released.append(run.run_id)
    return released


def _run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid in the run's "Executing steps in process (pid: N)" engine event."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        metadata = getattr(entry.dagster_event.event_specific_data, "metadata", None) or {}
        pid = metadata.get("pid")
        if pid is not None:
            return int(getattr(pid, "value", pid))
    return None
